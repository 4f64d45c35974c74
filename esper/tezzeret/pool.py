"""A pool of worker processes that can kill a job on timeout or cancel and replace the worker.

`concurrent.futures.ProcessPoolExecutor` cannot stop one running task (killing a worker breaks
the whole pool), so each slot here owns one `spawn`-started process and a thread that feeds it
one task at a time over a pipe, watches the deadline, and kills and replaces the process when a
task times out, is cancelled, or the process dies. The outcome of every task is reported through
its `on_done` callback exactly once (called from a pool thread).
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import multiprocessing.connection
import os
import queue
import signal
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

log = logging.getLogger("esper.tezzeret.pool")

OutcomeKind = Literal["ok", "error", "timeout", "crashed", "cancelled"]


@dataclass
class TaskOutcome:
    """How a task ended: ``ok`` (value set), ``error`` (exception text), ``timeout`` (worker killed),
    ``crashed`` (the worker process died), ``cancelled``."""

    kind: OutcomeKind
    value: Any = None
    error: str = ""
    worker_pid: int | None = None
    duration_s: float = 0.0


@dataclass
class _Task:
    task_id: str
    fn: Callable[..., Any]
    args: tuple
    timeout_s: float
    on_start: Callable[[int], None]
    on_done: Callable[[TaskOutcome], None]
    lock: threading.Lock = field(default_factory=threading.Lock)
    started: bool = False
    finished: bool = False
    cancel_requested: bool = False

    def finish(self, outcome: TaskOutcome) -> None:
        with self.lock:
            if self.finished:
                return
            self.finished = True
        try:
            self.on_done(outcome)
        except Exception:
            log.exception("on_done callback of task %s failed", self.task_id)


def _worker_main(conn: multiprocessing.connection.Connection, initializer: Callable[..., None] | None,
                 initargs: tuple) -> None:
    # Ctrl-C in a terminal reaches the whole process group; the pool stops workers itself.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        if initializer is not None:
            initializer(*initargs)
    except BaseException:
        conn.send(("init_error", traceback.format_exc()))
        return
    conn.send(("ready", os.getpid()))
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):
            return
        if message is None:
            return
        fn, args = message
        try:
            result = fn(*args)
            conn.send(("ok", result))
        except BaseException as exc:
            conn.send(("error", f"{type(exc).__name__}: {exc}\n{traceback.format_exc(limit=8)}"))


class _Worker:
    def __init__(self, ctx, initializer, initargs, ready_timeout: float, stopping: threading.Event):
        self.conn, child = ctx.Pipe()
        self.process = ctx.Process(target=_worker_main, args=(child, initializer, initargs), daemon=True,
                                   name="tezzeret-worker")
        self.process.start()
        child.close()
        try:
            deadline = time.monotonic() + ready_timeout
            # Poll in short steps so a pool shutdown does not wait for a slow start.
            while not self.conn.poll(0.1):
                if stopping.is_set():
                    raise RuntimeError("the worker pool is shutting down")
                if time.monotonic() > deadline:
                    raise RuntimeError(f"worker process did not become ready within {ready_timeout} s")
            kind, payload = self.conn.recv()
        except (EOFError, OSError) as exc:
            self.kill()
            raise RuntimeError(f"worker process died while starting (exit code {self.process.exitcode})") from exc
        except RuntimeError:
            self.kill()
            raise
        if kind != "ready":
            self.kill()
            raise RuntimeError(f"worker process failed to initialise:\n{payload}")
        self.pid: int = payload

    def alive(self) -> bool:
        return self.process.is_alive()

    def kill(self) -> None:
        if self.process.is_alive():
            self.process.kill()
        self.process.join(10)
        self.conn.close()

    def stop(self, timeout: float = 5.0) -> None:
        with contextlib.suppress(OSError):
            self.conn.send(None)
        self.process.join(timeout)
        self.kill()


class WorkerPool:
    """`num_workers` spawn-started processes; `submit` queues a task, `cancel` stops one."""

    def __init__(self, num_workers: int, *, initializer: Callable[..., None] | None = None,
                 initargs: tuple = (), ready_timeout: float = 120.0, start_method: str = "spawn"):
        if num_workers < 1:
            raise ValueError(f"num_workers must be >= 1, got {num_workers}")
        self.num_workers = num_workers
        self._ctx = multiprocessing.get_context(start_method)
        self._initializer = initializer
        self._initargs = initargs
        self._ready_timeout = ready_timeout
        self._queue: queue.Queue[_Task | None] = queue.Queue()
        self._tasks: dict[str, _Task] = {}
        self._lock = threading.Lock()
        self._workers: list[_Worker | None] = [None] * num_workers
        self._threads: list[threading.Thread] = []
        self._stopping = threading.Event()
        self.replacements = 0

    def start(self) -> None:
        """Start every worker (in parallel) and return when all are ready; RuntimeError otherwise."""
        errors: list[BaseException] = []

        def boot(slot: int) -> None:
            try:
                self._workers[slot] = self._spawn()
            except BaseException as exc:
                errors.append(exc)

        boots = [threading.Thread(target=boot, args=(i,)) for i in range(self.num_workers)]
        for t in boots:
            t.start()
        for t in boots:
            t.join()
        if errors:
            self.shutdown()
            raise RuntimeError(f"could not start the worker pool: {errors[0]}") from errors[0]
        for slot in range(self.num_workers):
            thread = threading.Thread(target=self._run_slot, args=(slot,), name=f"tezzeret-slot-{slot}",
                                      daemon=True)
            thread.start()
            self._threads.append(thread)

    def _spawn(self) -> _Worker:
        return _Worker(self._ctx, self._initializer, self._initargs, self._ready_timeout, self._stopping)

    @property
    def worker_pids(self) -> list[int]:
        """Pids of the current worker processes (they change when workers are replaced)."""
        return [w.pid for w in self._workers if w is not None]

    def submit(self, task_id: str, fn: Callable[..., Any], args: tuple, *, timeout_s: float,
               on_start: Callable[[int], None], on_done: Callable[[TaskOutcome], None]) -> None:
        """Queue `fn(*args)` (a picklable module-level function) to run in a worker within `timeout_s`."""
        if self._stopping.is_set():
            raise RuntimeError("the worker pool is shut down")
        task = _Task(task_id, fn, args, timeout_s, on_start, on_done)
        with self._lock:
            if task_id in self._tasks:
                raise ValueError(f"task {task_id!r} is already queued or running")
            self._tasks[task_id] = task
        self._queue.put(task)

    def cancel(self, task_id: str) -> bool:
        """Cancel a queued or running task (a running one's worker is killed and replaced).
        False when the task is unknown or already finished."""
        with self._lock:
            task = self._tasks.get(task_id)
        if task is None:
            return False
        with task.lock:
            if task.finished:
                return False
            task.cancel_requested = True
            started = task.started
        if not started:
            task.finish(TaskOutcome("cancelled", error="cancelled before it started"))
            self._forget(task)
        return True

    def _forget(self, task: _Task) -> None:
        with self._lock:
            self._tasks.pop(task.task_id, None)

    def _replace(self, slot: int) -> _Worker | None:
        old = self._workers[slot]
        if old is not None:
            old.kill()
        self._workers[slot] = None
        while not self._stopping.is_set():
            try:
                worker = self._spawn()
            except Exception:  # keep trying: a slot without a worker would stall the queue
                if self._stopping.is_set():
                    return None
                log.exception("could not start a replacement worker; retrying in 1 s")
                time.sleep(1)
                continue
            self._workers[slot] = worker
            self.replacements += 1
            log.info("worker slot %d: replaced pid %s with pid %d", slot, old.pid if old else "?", worker.pid)
            return worker
        return None

    def _run_slot(self, slot: int) -> None:
        while not self._stopping.is_set():
            try:
                task = self._queue.get(timeout=0.5)
            except queue.Empty:
                # An idle worker that died (OOM killer, operator) is replaced now, not at the next task.
                idle = self._workers[slot]
                if idle is not None and not idle.alive() and not self._stopping.is_set():
                    self._replace(slot)
                continue
            if task is None:
                return
            with task.lock:
                if task.finished or task.cancel_requested:
                    continue
                task.started = True
            worker = self._workers[slot]
            if worker is None or not worker.alive():
                worker = self._replace(slot)
                if worker is None:
                    task.finish(TaskOutcome("cancelled", error="the worker pool is shutting down"))
                    return
            try:
                outcome = self._execute(worker, task)
            except Exception as exc:  # never let a slot thread die
                log.exception("slot %d failed running task %s", slot, task.task_id)
                worker.kill()
                outcome = TaskOutcome("error", error=f"pool error: {exc}", worker_pid=worker.pid)
            self._forget(task)
            # Report first, then replace a dead worker (starting one takes seconds).
            task.finish(outcome)
            if not worker.alive() and not self._stopping.is_set():
                self._replace(slot)

    def _execute(self, worker: _Worker, task: _Task) -> TaskOutcome:
        """Run one task; on timeout, cancellation or death the worker is left killed."""
        started = time.monotonic()
        deadline = started + task.timeout_s
        task.on_start(worker.pid)
        worker.conn.send((task.fn, task.args))
        pid = worker.pid
        while True:
            remaining = deadline - time.monotonic()
            ready = multiprocessing.connection.wait([worker.conn, worker.process.sentinel],
                                                    timeout=max(0.0, min(0.1, remaining)))
            elapsed = time.monotonic() - started
            if worker.conn in ready or worker.conn.poll():
                try:
                    kind, payload = worker.conn.recv()
                except (EOFError, OSError):
                    ready = [worker.process.sentinel]
                else:
                    if kind == "ok":
                        return TaskOutcome("ok", value=payload, worker_pid=pid, duration_s=elapsed)
                    return TaskOutcome("error", error=payload, worker_pid=pid, duration_s=elapsed)
            if worker.process.sentinel in ready or not worker.alive():
                worker.process.join(5)
                code = worker.process.exitcode
                worker.kill()
                how = f"killed by signal {-code}" if code is not None and code < 0 else f"exit code {code}"
                return TaskOutcome("crashed", error=f"worker process {pid} died ({how}) while running the task; "
                                   "it is being replaced", worker_pid=pid, duration_s=elapsed)
            if task.cancel_requested or self._stopping.is_set():
                worker.kill()
                return TaskOutcome("cancelled", error=f"cancelled while running; worker {pid} was stopped",
                                   worker_pid=pid, duration_s=elapsed)
            if remaining <= 0:
                worker.kill()
                return TaskOutcome("timeout", error=f"exceeded its timeout of {task.timeout_s:g} s; worker {pid} "
                                   "was killed and is being replaced", worker_pid=pid, duration_s=elapsed)

    def shutdown(self) -> None:
        """Stop accepting tasks, cancel queued and running ones, stop every worker."""
        self._stopping.set()
        with self._lock:
            pending = list(self._tasks.values())
        for task in pending:
            with task.lock:
                started = task.started
            if not started:
                task.finish(TaskOutcome("cancelled", error="the worker pool is shutting down"))
        for _ in self._threads:
            self._queue.put(None)
        for thread in self._threads:
            thread.join(15)
        for worker in self._workers:
            if worker is not None:
                worker.stop()
        self._workers = [None] * self.num_workers
