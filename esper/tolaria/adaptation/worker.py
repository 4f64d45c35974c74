"""`AdaptationWorker`: the one background thread (and asyncio loop) that does all network work of
adaptation, so that nothing inside a training step waits on the network. The training thread only
submits coroutines (never awaits them)."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import sys
import threading
from collections.abc import Callable, Coroutine
from typing import Any

log = logging.getLogger("esper.tolaria.adaptation")

# GIL switch interval while the worker runs (CPython's default is 5 ms): the longest the training
# thread waits for the GIL when the worker thread is busy with Python work.
SWITCH_INTERVAL_S = 0.0005


class AdaptationWorker:
    """A daemon thread running an asyncio loop; `submit` coroutines from any thread."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread: threading.Thread | None = None
        self._switch_interval = sys.getswitchinterval()
        self.stopping = threading.Event()

    @property
    def running(self) -> bool:
        return self._thread is not None and not self.stopping.is_set()

    def start(self) -> None:
        self._switch_interval = sys.getswitchinterval()
        sys.setswitchinterval(min(self._switch_interval, SWITCH_INTERVAL_S))
        self._thread = threading.Thread(target=self._run, name="esper-adaptation", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    def submit(self, coro: Coroutine[Any, Any, Any]) -> concurrent.futures.Future:
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def call_soon(self, fn: Callable[..., Any], *args: Any) -> None:
        """Run `fn(*args)` on the worker's loop (while it runs; dropped after stop)."""
        if self.running:
            self.loop.call_soon_threadsafe(fn, *args)

    def stop(self, flush: Callable[[], Coroutine[Any, Any, None]], close: Callable[[], Coroutine[Any, Any, None]],
             timeout: float) -> None:
        """Run `flush()` (bounded by `timeout`), cancel every other task, run `close()`, stop the thread."""
        if self.stopping.is_set():
            return
        self.stopping.set()
        if self._thread is None:
            return

        async def shutdown() -> None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(flush(), timeout)
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await close()

        try:
            self.submit(shutdown()).result(timeout + 5)
        except (concurrent.futures.TimeoutError, RuntimeError) as exc:
            log.warning("adaptation worker did not shut down cleanly: %s", exc)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=5)
        sys.setswitchinterval(self._switch_interval)
