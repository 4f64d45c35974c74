"""The worker pool: real spawned processes, killed and replaced on timeout, crash and cancel."""

from __future__ import annotations

import multiprocessing
import os
import signal
import threading
import time

import pool_tasks
import pytest

from esper.tezzeret import TaskOutcome, WorkerPool

pytestmark = pytest.mark.integration


class Results:
    """Collects outcomes delivered by pool threads."""

    def __init__(self):
        self.outcomes: dict[str, TaskOutcome] = {}
        self.started: dict[str, int] = {}
        self._cond = threading.Condition()

    def on_start(self, task_id):
        def record(pid: int) -> None:
            with self._cond:
                self.started[task_id] = pid
                self._cond.notify_all()
        return record

    def on_done(self, task_id):
        def record(outcome: TaskOutcome) -> None:
            with self._cond:
                assert task_id not in self.outcomes, "on_done must be called exactly once"
                self.outcomes[task_id] = outcome
                self._cond.notify_all()
        return record

    def wait(self, task_id: str, timeout: float = 60) -> TaskOutcome:
        with self._cond:
            assert self._cond.wait_for(lambda: task_id in self.outcomes, timeout), f"{task_id} never finished"
            return self.outcomes[task_id]

    def wait_started(self, task_id: str, timeout: float = 60) -> int:
        with self._cond:
            assert self._cond.wait_for(lambda: task_id in self.started, timeout), f"{task_id} never started"
            return self.started[task_id]


@pytest.fixture(scope="module")
def pool():
    pool = WorkerPool(2)
    pool.start()
    yield pool
    pool.shutdown()


def submit(pool, results, task_id, fn, *args, timeout_s=30.0):
    pool.submit(task_id, fn, args, timeout_s=timeout_s, on_start=results.on_start(task_id),
                on_done=results.on_done(task_id))


def test_runs_tasks_in_other_processes_and_reports_errors(pool):
    results = Results()
    submit(pool, results, "add", pool_tasks.add, 2, 3)
    submit(pool, results, "pid", pool_tasks.pid_of_worker)
    submit(pool, results, "err", pool_tasks.raise_value_error, "bad input 42")
    assert results.wait("add").kind == "ok" and results.outcomes["add"].value == 5
    pid = results.wait("pid").value
    assert pid != os.getpid() and pid in pool.worker_pids
    err = results.wait("err")
    assert err.kind == "error" and "ValueError: bad input 42" in err.error
    with pytest.raises(ValueError, match="already queued"):
        pool.submit("dup", pool_tasks.sleep_then_return, (1.0, "x"), timeout_s=5, on_start=lambda p: None,
                    on_done=lambda o: None)
        pool.submit("dup", pool_tasks.add, (1, 1), timeout_s=5, on_start=lambda p: None, on_done=lambda o: None)


def _wait_replaced(pool, old_pid, timeout=60):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        pids = pool.worker_pids
        if old_pid not in pids and len(pids) == pool.num_workers:
            return pids
        time.sleep(0.05)
    raise AssertionError(f"worker {old_pid} was not replaced: {pool.worker_pids}")


def test_timeout_kills_and_replaces_the_worker(pool):
    results = Results()
    before = pool.replacements
    submit(pool, results, "slow", pool_tasks.sleep_then_return, 60.0, "never", timeout_s=0.5)
    pid = results.wait_started("slow")
    started = time.monotonic()
    outcome = results.wait("slow")
    assert outcome.kind == "timeout" and "timeout of 0.5 s" in outcome.error
    assert time.monotonic() - started < 5
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)  # the process is gone
    _wait_replaced(pool, pid)
    assert pool.replacements == before + 1
    submit(pool, results, "after", pool_tasks.add, 1, 1)
    assert results.wait("after").value == 2


def test_a_worker_killed_from_outside_is_reported_and_replaced(pool):
    results = Results()
    submit(pool, results, "victim", pool_tasks.sleep_then_return, 60.0, "never")
    pid = results.wait_started("victim")
    os.kill(pid, signal.SIGKILL)
    outcome = results.wait("victim")
    assert outcome.kind == "crashed" and "killed by signal 9" in outcome.error
    _wait_replaced(pool, pid)
    submit(pool, results, "suicide", pool_tasks.die_by_sigkill)
    assert results.wait("suicide").kind == "crashed"
    submit(pool, results, "fine", pool_tasks.add, 20, 22)
    assert results.wait("fine").value == 42


def test_cancel_queued_and_running_tasks(pool):
    results = Results()
    submit(pool, results, "busy1", pool_tasks.sleep_then_return, 60.0, "x")
    submit(pool, results, "busy2", pool_tasks.sleep_then_return, 60.0, "y")
    submit(pool, results, "queued", pool_tasks.add, 1, 2)
    pid = results.wait_started("busy1")
    results.wait_started("busy2")
    assert pool.cancel("queued")
    assert results.wait("queued").kind == "cancelled"
    assert pool.cancel("busy1")
    assert results.wait("busy1").kind == "cancelled"
    assert pool.cancel("busy2")
    assert results.wait("busy2").kind == "cancelled"
    assert not pool.cancel("busy1") and not pool.cancel("unknown")
    assert "queued" not in results.started, "a cancelled queued task must never run"
    _wait_replaced(pool, pid)
    submit(pool, results, "after-cancel", pool_tasks.add, 3, 4)
    assert results.wait("after-cancel").value == 7


def test_shutdown_cancels_pending_work():
    results = Results()
    pool = WorkerPool(1)
    pool.start()
    submit(pool, results, "running", pool_tasks.sleep_then_return, 60.0, "x")
    submit(pool, results, "waiting", pool_tasks.add, 1, 1)
    results.wait_started("running")
    pids = pool.worker_pids
    pool.shutdown()
    assert results.wait("running").kind == "cancelled"
    assert results.wait("waiting").kind == "cancelled"
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    with pytest.raises(RuntimeError, match="shut down"):
        pool.submit("late", pool_tasks.add, (1, 1), timeout_s=1, on_start=lambda p: None, on_done=lambda o: None)


def test_an_idle_worker_that_dies_is_replaced_without_waiting_for_a_task(pool):
    results = Results()
    submit(pool, results, "warm", pool_tasks.add, 0, 0)
    results.wait("warm")
    victim = pool.worker_pids[0]
    os.kill(victim, signal.SIGKILL)
    _wait_replaced(pool, victim)
    submit(pool, results, "after-idle-death", pool_tasks.add, 2, 2)
    assert results.wait("after-idle-death").value == 4


def test_a_replacement_killed_while_starting_is_retried():
    results = Results()
    pool = WorkerPool(1, initializer=pool_tasks.slow_init, initargs=(1.5,))
    pool.start()
    try:
        first = pool.worker_pids[0]
        submit(pool, results, "crash", pool_tasks.die_by_sigkill)
        assert results.wait("crash").kind == "crashed"
        # the replacement is now starting (1.5 s initializer): kill it mid-start
        deadline = time.monotonic() + 10
        booting = []
        while not booting and time.monotonic() < deadline:
            booting = [p.pid for p in multiprocessing.active_children()
                       if p.name == "tezzeret-worker" and p.pid != first and p.pid not in pool.worker_pids]
            time.sleep(0.02)
        assert booting, "no replacement worker was started"
        os.kill(booting[0], signal.SIGKILL)
        replacement = _wait_replaced(pool, first)
        assert booting[0] not in replacement
        submit(pool, results, "works", pool_tasks.add, 5, 5)
        assert results.wait("works").value == 10
    finally:
        pool.shutdown()
