"""`KernelPipeline`: the way from a kernel id to a loaded kernel, on the adaptation worker thread:
find (Urza) -> compile (Tezzeret, if Urza has no VALIDATED artifact) -> wait for kernel-ready
(Oona; the job's own stream reports failures, a poll covers a missed event) -> download (Urza)
-> verify (SHA-256) -> keep the bytes in the run directory -> load (`torch.export.load`, in the
slices the training thread grants, `StepSlices`) -> warm up -> kernel cache.

Each kernel id goes through it once per run at a time; the result reaches the training thread
through the outbox (`KernelLoaded` or `KernelFailed`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

import torch

from esper.clients import AsyncUrzaClient, OonaClient, ServiceLink, TezzeretClient, is_outage
from esper.clients.tezzeret import FAILED_JOB_STATES
from esper.clients.topics import KERNEL_READY_TOPIC
from esper.errors import DataLossError, EsperError, FailedPreconditionError, NotFoundError
from esper.kasmina import seed_from_kernel
from esper.tolaria.adaptation.kernels import KernelStore
from esper.tolaria.adaptation.outbox import KernelFailed, KernelLoaded, Note, Outbox
from esper.tolaria.services_config import ServicesConfig
from esper.tolaria.slices import StepSlices
from esper.v1 import common_pb2, tezzeret_pb2

log = logging.getLogger("esper.tolaria.adaptation")

# Share of a training step's duration a kernel load may run for at each step boundary (StepSlices).
LOAD_SHARE = 0.25
# The shortest slice a load gets at a boundary, however short the steps are: on sub-millisecond
# steps a quarter of a step would make a load of a few hundred ms take thousands of steps.
MIN_LOAD_SLICE_S = 0.002
DOWNLOAD_ATTEMPTS = 3
SUBSCRIBE_DEADLINE_S = 3600.0


# A kernel whose compile or download fails for a reason other than the compiler's verdict (a
# worker crash, a timeout, Urza unavailable past Tezzeret's store retries, bad bytes) is asked for
# again this many times, with the links' backoff between attempts, before its seeds are cancelled.
KERNEL_ATTEMPTS = 4


class CompileFailed(RuntimeError):
    """The compiler rejected the kernel: an INVALID artifact (the blueprint does not fit, a failed
    function-preservation check). Deterministic: asking again gives the same answer."""


class KernelUnavailable(RuntimeError):
    """The kernel did not arrive for a reason that may pass (a failed or timed-out job without an
    INVALID artifact, a cancelled job, bytes that never verified): worth asking again."""


def _job_done(job: tezzeret_pb2.CompileJob) -> bool:
    """True once the job succeeded; False while it runs. A failed job raises CompileFailed when its
    artifact is INVALID (the compiler's verdict), else KernelUnavailable."""
    if job.state == tezzeret_pb2.COMPILE_JOB_STATE_SUCCEEDED:
        return True
    if job.state in FAILED_JOB_STATES:
        reason = job.error or tezzeret_pb2.CompileJobState.Name(job.state)
        if job.artifact.status == common_pb2.ARTIFACT_STATUS_INVALID:
            raise CompileFailed(reason)
        raise KernelUnavailable(reason)
    return False


class KernelPipeline:
    """Obtains kernels for the run (see module doc). Coroutines run on the worker's loop."""

    def __init__(self, settings: ServicesConfig, store: KernelStore, device: torch.device, outbox: Outbox, *,
                 urza: ServiceLink[AsyncUrzaClient] | None, tezzeret: ServiceLink[TezzeretClient] | None,
                 oona: ServiceLink[OonaClient] | None, submit: Callable, stopping: Callable[[], bool]):
        self.settings = settings
        self.store = store
        self.device = device
        self.outbox = outbox
        self.urza = urza
        self.tezzeret = tezzeret
        self.oona = oona
        self._submit = submit
        self._stopping = stopping
        # Kernel loads hold the GIL: they run in slices the training thread grants between steps.
        self.slices = StepSlices(share=LOAD_SHARE, min_slice_s=MIN_LOAD_SLICE_S)
        self.loaded: dict[str, tuple[torch.nn.Module, str]] = {}
        self.spares: dict[str, torch.nn.Module] = {}
        self._fetching: set[str] = set()
        self._shapes: dict[str, list[int]] = {}
        self._ready: dict[str, asyncio.Event] = {}
        # Set by the worker thread, read by the training thread (plain ints: no lock needed).
        self.compiles_in_flight = 0
        self.loads_in_flight = 0

    def _note(self, line: str) -> None:
        self.outbox.put(Note(line))

    def request(self, kernel_id: str, spec: common_pb2.BlueprintSpec, shape: list[int], device: int,
                dtype: int) -> None:
        """Start obtaining `kernel_id` unless that is under way already (training thread)."""
        if kernel_id in self._fetching:
            return
        self._fetching.add(kernel_id)
        self._shapes[kernel_id] = list(shape)
        self._submit(self._obtain(kernel_id, spec, shape, device, dtype))

    def phase(self) -> str:
        """What kernel work runs now: "load" (in this process), "compile" (in Tezzeret) or ""."""
        return "load" if self.loads_in_flight else "compile" if self.compiles_in_flight else ""

    async def _obtain(self, kernel_id: str, spec, shape, device, dtype) -> None:
        try:
            if self.urza is None or self.tezzeret is None:
                raise KernelUnavailable("the run has no Urza or Tezzeret address")
            for attempt in range(1, KERNEL_ATTEMPTS + 1):
                try:
                    module, via = await self._obtain_once(kernel_id, spec, shape, device, dtype)
                    break
                except KernelUnavailable as exc:
                    if attempt == KERNEL_ATTEMPTS or self._stopping():
                        raise
                    wait = min(self.settings.retry_max_s, self.settings.retry_initial_s * 2 ** attempt)
                    self._note(f"kernel {kernel_id} did not arrive ({exc}); asking again in {wait:g} s "
                               f"(attempt {attempt + 1} of {KERNEL_ATTEMPTS})")
                    await asyncio.sleep(wait)
            self.loaded[kernel_id] = (module, via)
            self.outbox.put(KernelLoaded(kernel_id))
        except CompileFailed as exc:
            self.outbox.put(KernelFailed(kernel_id, str(exc), deterministic=True))
        except KernelUnavailable as exc:
            self.outbox.put(KernelFailed(kernel_id, str(exc), deterministic=False))
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a bug: this kernel fails for now, training goes on
            log.exception("obtaining kernel %s failed", kernel_id)
            self.outbox.put(KernelFailed(kernel_id, f"{type(exc).__name__}: {exc}", deterministic=False))
        finally:
            self._fetching.discard(kernel_id)

    async def _obtain_once(self, kernel_id: str, spec, shape, device, dtype) -> tuple[torch.nn.Module, str]:
        """Find or compile, download, load: the kernel and how it came (raises on failure)."""
        via = "urza"
        artifact = await self.urza.call(lambda c: c.find_artifact(kernel_id, timeout=self.settings.call_timeout_s))
        if artifact is None or artifact.status != common_pb2.ARTIFACT_STATUS_VALIDATED:
            if artifact is not None and artifact.status == common_pb2.ARTIFACT_STATUS_INVALID:
                raise CompileFailed(artifact.status_reason or "artifact is INVALID in Urza")
            self.compiles_in_flight += 1
            try:
                via = await self._compile(kernel_id, spec, shape, device, dtype)
            finally:
                self.compiles_in_flight -= 1
        self.loads_in_flight += 1
        try:
            artifact, data = await self._download(kernel_id)
            module = await asyncio.to_thread(self.slices.run, self._load, kernel_id, spec, data, artifact.sha256)
        finally:
            self.loads_in_flight -= 1
        return module, via

    async def _compile(self, kernel_id: str, spec, shape, device, dtype) -> str:
        """Request the compile and wait until kernel-ready arrives on Oona or the job ends; the path."""
        ready = self._ready.setdefault(kernel_id, asyncio.Event())
        timeout = self.settings.call_timeout_s
        job = None
        while True:
            if job is None:
                job = await self.tezzeret.call(lambda c: c.compile(
                    spec, shape, device, dtype, timeout_seconds=self.settings.compile_timeout_s, timeout=timeout))
                self._note(f"compile requested: {kernel_id} (job {job.job_id[:8]}{', reused' if job.reused else ''})")
            if _job_done(job):
                return "poll"
            # Success arrives as kernel-ready on Oona; a failure only in the job's own stream (or
            # at the next poll when the stream is unavailable).
            announced = asyncio.ensure_future(ready.wait())
            failure = asyncio.ensure_future(self._watch_failure(job.job_id))
            try:
                await asyncio.wait((announced, failure), timeout=self.settings.poll_s,
                                   return_when=asyncio.FIRST_COMPLETED)
            finally:
                announced.cancel()
                failure.cancel()
            if ready.is_set():
                return "oona"
            if failure.done() and not failure.cancelled():
                _job_done(failure.result())  # a failed job: raises CompileFailed or KernelUnavailable
            try:
                job = await self.tezzeret.call(lambda c, job_id=job.job_id: c.get_compile_job(job_id, timeout=timeout))
            except NotFoundError:
                self._note(f"Tezzeret lost compile job for {kernel_id} (restarted?); requesting it again")
                job = None

    async def _watch_failure(self, job_id: str) -> tezzeret_pb2.CompileJob:
        """The job once Tezzeret's WatchCompileJob stream shows it failed; otherwise it waits until
        cancelled (success arrives as kernel-ready; a broken stream is covered by the caller's poll)."""
        if self.tezzeret.up:
            try:
                async for job in self.tezzeret.client().watch_compile_job(job_id, timeout=self.settings.poll_s + 1.0):
                    if job.state in FAILED_JOB_STATES:
                        return job
            except EsperError:
                pass
        await asyncio.Event().wait()  # never set: the caller cancels this at its poll deadline
        raise AssertionError("unreachable")

    async def _download(self, kernel_id: str) -> tuple[common_pb2.KernelArtifact, bytes]:
        """The artifact's bytes, checked against its SHA-256 (a mismatch is retried, then fails)."""
        link = self.urza
        for attempt in range(DOWNLOAD_ATTEMPTS):
            await link.wait_turn()
            try:
                result = await link.client().download_artifact(
                    kernel_id, timeout=max(30.0, self.settings.call_timeout_s))
            except DataLossError as exc:
                link.ok()
                log.warning("kernel %s: %s (attempt %d)", kernel_id, exc, attempt + 1)
                continue
            except EsperError as exc:
                if is_outage(exc):
                    await link.failed(exc)
                    continue
                if isinstance(exc, FailedPreconditionError) and exc.reason == "ARTIFACT_INVALID":
                    # INVALID in Urza: the compiler's verdict
                    raise CompileFailed(f"Urza refused the download of {kernel_id}: {exc}") from None
                raise KernelUnavailable(f"Urza download of {kernel_id} failed: {exc}") from None
            link.ok()
            return result
        raise KernelUnavailable(f"kernel {kernel_id}: downloaded bytes never matched their SHA-256")

    def _load(self, kernel_id: str, spec: common_pb2.BlueprintSpec, data: bytes, sha256: str) -> torch.nn.Module:
        """Worker thread, in slices granted between training steps (`StepSlices`): verify, keep the
        bytes in the run directory, load (`torch.export.load`), run it once, cache it."""
        from esper.tezzeret import load_kernel_artifact

        module = load_kernel_artifact(data, expected_sha256=sha256).to(self.device)
        self.store.save_bytes(kernel_id, data)
        dtype = next((p.dtype for p in module.parameters()), torch.float32)
        # The first forward/backward of a loaded graph is slow (lazy set-up); pay it here, off the
        # training thread, not in the first training step of the seed.
        shape = self._shapes.get(kernel_id)
        if shape is not None:
            x = torch.zeros((2, *shape[1:]), device=self.device, dtype=dtype, requires_grad=True)
            module(x).sum().backward()
            for p in module.parameters():
                p.grad = None
        self.store.put(kernel_id, self.device, dtype, module, len(data))
        # The first seed's own copy is made here too, not on the training thread at attach time.
        self.spares[kernel_id] = seed_from_kernel(module, spec)
        return module

    async def listen_kernel_ready(self) -> None:
        """Subscribe to kernel-ready from now on; wake the waiter of each announced kernel id."""
        link = self.oona
        if link is None:
            return
        while not self._stopping():
            if not link.up:
                await asyncio.sleep(max(0.05, link.next_try - time.monotonic()))
            started = time.monotonic()
            try:
                # A long deadline (streams need one); the loop re-subscribes when it expires.
                async for envelope in link.client().subscribe(KERNEL_READY_TOPIC, timeout=SUBSCRIBE_DEADLINE_S):
                    link.ok()
                    event = common_pb2.KernelReadyEvent.FromString(envelope.payload)
                    self._ready.setdefault(event.artifact.kernel_id, asyncio.Event()).set()
            except EsperError as exc:
                if time.monotonic() - started < SUBSCRIBE_DEADLINE_S:
                    await link.failed(exc)
            else:
                await asyncio.sleep(0.05)  # the server ended the stream (shutting down): subscribe again
