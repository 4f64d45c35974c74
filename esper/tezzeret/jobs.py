"""Compile jobs: validation, reuse, scheduling on the worker pool, storing results in the library.

`CompileJobs` runs on an asyncio loop and talks to the kernel library (Urza) and the event bus
(Oona) through the small async interfaces below, so it holds no network code itself.
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import logging
import time
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Protocol, TypeVar

from google.protobuf.timestamp_pb2 import Timestamp

from esper.errors import (
    AlreadyExistsError,
    DeadlineExceededError,
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
    UnavailableError,
    bounded,
    quoted,
)
from esper.tezzeret.compiler import ARTIFACT_FORMAT, CompileOutcome, compile_blueprint
from esper.tezzeret.kernel_ids import kernel_id_for
from esper.tezzeret.limits import CompileLimits, check_compile_limits
from esper.tezzeret.pool import TaskOutcome, WorkerPool
from esper.v1 import common_pb2, tezzeret_pb2

log = logging.getLogger("esper.tezzeret")
_R = TypeVar("_R")
# Urza's limit on status_reason (esper.urza.library.MAX_STATUS_REASON_CHARS), kept in step by a test.
MAX_STATUS_REASON_CHARS = 16384

S = tezzeret_pb2
FINAL_STATES = frozenset({S.COMPILE_JOB_STATE_SUCCEEDED, S.COMPILE_JOB_STATE_FAILED,
                          S.COMPILE_JOB_STATE_TIMED_OUT, S.COMPILE_JOB_STATE_CANCELLED})
MAX_ELEMENTS_PER_SAMPLE = 1 << 24
DEFAULT_PAGE_SIZE = 100
MAX_PAGE_SIZE = 1000
# A ListCompileJobs page stops at this many bytes whatever page_size asked (half a 4 MiB message).
MAX_LIST_RESPONSE_BYTES = 2 * 1024 * 1024


class KernelLibrary(Protocol):
    """What Tezzeret needs from Urza."""

    async def get_blueprint(self, blueprint_id: str, version: int) -> common_pb2.BlueprintSpec: ...

    async def register_blueprint(self, spec: common_pb2.BlueprintSpec) -> common_pb2.BlueprintSpec: ...

    async def find_artifact(self, kernel_id: str) -> common_pb2.KernelArtifact | None: ...

    async def store_artifact(self, artifact: common_pb2.KernelArtifact, data: bytes) -> common_pb2.KernelArtifact: ...

    async def record_artifact(self, artifact: common_pb2.KernelArtifact) -> common_pb2.KernelArtifact: ...


class KernelEventPublisher(Protocol):
    """Where kernel-ready events go (Oona topic ``esper.kernel.ready``)."""

    async def publish_kernel_ready(self, event: common_pb2.KernelReadyEvent) -> None: ...


def _now() -> Timestamp:
    ts = Timestamp()
    ts.GetCurrentTime()
    return ts


def _state_name(state: int) -> str:
    return S.CompileJobState.Name(state)


@dataclass
class _Entry:
    seq: int
    job: tezzeret_pb2.CompileJob
    spec: common_pb2.BlueprintSpec
    watchers: set[asyncio.Queue] = field(default_factory=set)
    storing: bool = False


def validate_compile_request(request: tezzeret_pb2.CompileRequest, *, max_timeout_s: float) -> None:
    """Field checks that need no library; InvalidArgumentError names the field."""
    if not request.blueprint_id and not request.HasField("blueprint"):
        raise InvalidArgumentError("set blueprint_id (a registered blueprint) or blueprint (an inline spec)",
                                   field="blueprint_id")
    if request.HasField("blueprint") and request.blueprint_id and \
            request.blueprint_id != request.blueprint.blueprint_id:
        raise InvalidArgumentError(
            f"blueprint_id {quoted(request.blueprint_id)} disagrees with blueprint.blueprint_id "
            f"{quoted(request.blueprint.blueprint_id)}; set one of them", field="blueprint_id")
    if request.blueprint_version < 0:
        raise InvalidArgumentError(f"blueprint_version must be >= 0 (0 for the latest), got {request.blueprint_version}",
                                   field="blueprint_version")
    dims = list(request.input_shape.dims)
    if not 2 <= len(dims) <= 4 or dims[0] != -1 or any(d < 1 for d in dims[1:]):
        raise InvalidArgumentError(
            "input_shape.dims must be [-1, C], [-1, C, L] or [-1, C, H, W] (dynamic batch -1, then positive "
            f"sizes), got {dims}", field="input_shape.dims")
    elements = 1
    for d in dims[1:]:
        elements *= d
    if elements > MAX_ELEMENTS_PER_SAMPLE:
        raise InvalidArgumentError(f"input_shape.dims {dims} has {elements} elements per sample; at most "
                                   f"{MAX_ELEMENTS_PER_SAMPLE} are supported", field="input_shape.dims")
    if request.device not in (common_pb2.DEVICE_TYPE_CPU, common_pb2.DEVICE_TYPE_CUDA):
        raise InvalidArgumentError("device must be DEVICE_TYPE_CPU or DEVICE_TYPE_CUDA", field="device")
    if request.dtype not in (common_pb2.D_TYPE_FLOAT32, common_pb2.D_TYPE_FLOAT64, common_pb2.D_TYPE_FLOAT16,
                             common_pb2.D_TYPE_BFLOAT16):
        raise InvalidArgumentError("dtype must be one of D_TYPE_FLOAT32, D_TYPE_FLOAT64, D_TYPE_FLOAT16, "
                                   "D_TYPE_BFLOAT16", field="dtype")
    if not 0 <= request.timeout_seconds <= max_timeout_s:
        raise InvalidArgumentError(f"timeout_seconds must be in [0, {max_timeout_s:g}] (0 for the server default), "
                                   f"got {request.timeout_seconds:g}", field="timeout_seconds")


class CompileJobs:
    """The job table of one Tezzeret server."""

    def __init__(self, pool: WorkerPool, library: KernelLibrary, publisher: KernelEventPublisher | None = None,
                 *, default_timeout_s: float = 120.0, max_timeout_s: float = 3600.0, cuda_available: bool = False,
                 max_finished_jobs: int = 10_000, latency_budget_s: float = 0.5,
                 limits: CompileLimits | None = None, store_retry_s: float = 300.0,
                 store_backoff_s: tuple[float, float] = (0.5, 10.0)):
        self.pool = pool
        self.library = library
        self.publisher = publisher
        self.default_timeout_s = default_timeout_s
        self.max_timeout_s = max_timeout_s
        self.cuda_available = cuda_available
        self.max_finished_jobs = max_finished_jobs
        self.latency_budget_s = latency_budget_s
        self.limits = limits or CompileLimits()
        # A compiled result is worth keeping through an Urza restart: storing it is retried on
        # UNAVAILABLE / DEADLINE_EXCEEDED for this long, with exponential backoff (first, cap).
        self.store_retry_s = store_retry_s
        self.store_backoff_s = store_backoff_s
        self._jobs: OrderedDict[str, _Entry] = OrderedDict()
        self._active_by_kernel: dict[str, _Entry] = {}
        self._seq = itertools.count(1)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._background: set[asyncio.Task] = set()

    # -- requests -----------------------------------------------------------------------------

    async def compile(self, request: tezzeret_pb2.CompileRequest) -> tezzeret_pb2.CompileJob:
        """Start a job, join an identical running one, or reuse a stored artifact."""
        self._loop = asyncio.get_running_loop()
        validate_compile_request(request, max_timeout_s=self.max_timeout_s)
        if request.device == common_pb2.DEVICE_TYPE_CUDA and not self.cuda_available:
            raise FailedPreconditionError("this Tezzeret has no CUDA device; compile for DEVICE_TYPE_CPU or use a "
                                          "Tezzeret running on a GPU machine", reason="NO_CUDA_DEVICE")
        if request.HasField("blueprint"):
            spec = await self.library.register_blueprint(request.blueprint)
        else:
            spec = await self.library.get_blueprint(request.blueprint_id, request.blueprint_version)
        dims = list(request.input_shape.dims)
        check_compile_limits(spec, dims, request.dtype, self.limits)
        kernel_id = kernel_id_for(spec, dims, request.device, request.dtype)
        running = self._active_by_kernel.get(kernel_id)
        if running is not None:
            return self._snapshot(running)
        timeout = request.timeout_seconds or self.default_timeout_s
        job = tezzeret_pb2.CompileJob(
            job_id=f"job-{uuid.uuid4().hex[:16]}", blueprint_id=spec.blueprint_id, blueprint_version=spec.version,
            input_shape=common_pb2.TensorShape(dims=dims), device=request.device, dtype=request.dtype,
            state=S.COMPILE_JOB_STATE_QUEUED, kernel_id=kernel_id, timeout_seconds=timeout, create_time=_now())
        entry = _Entry(next(self._seq), job, spec)
        existing = await self.library.find_artifact(kernel_id)
        if existing is not None and existing.status in (common_pb2.ARTIFACT_STATUS_VALIDATED,
                                                        common_pb2.ARTIFACT_STATUS_INVALID):
            job.reused = True
            job.artifact.CopyFrom(existing)
            job.start_time.CopyFrom(job.create_time)
            job.end_time.CopyFrom(job.create_time)
            if existing.status == common_pb2.ARTIFACT_STATUS_VALIDATED:
                job.state = S.COMPILE_JOB_STATE_SUCCEEDED
            else:
                job.state = S.COMPILE_JOB_STATE_FAILED
                job.error = f"artifact {kernel_id} is INVALID: {existing.status_reason}"
            self._add(entry)
            return self._snapshot(entry)
        running = self._active_by_kernel.get(kernel_id)  # another request may have started it meanwhile
        if running is not None:
            return self._snapshot(running)
        self._add(entry)
        self._active_by_kernel[kernel_id] = entry
        loop = self._loop
        self.pool.submit(
            job.job_id, compile_blueprint,
            (spec.SerializeToString(deterministic=True), dims, request.device, request.dtype),
            timeout_s=timeout,
            on_start=lambda pid: loop.call_soon_threadsafe(self._on_start, entry, pid),
            on_done=lambda outcome: loop.call_soon_threadsafe(self._on_done, entry, outcome))
        return self._snapshot(entry)

    def get(self, job_id: str) -> tezzeret_pb2.CompileJob:
        return self._snapshot(self._entry(job_id))

    async def watch(self, job_id: str) -> AsyncIterator[tezzeret_pb2.CompileJob]:
        """The job now, then every change, ending after a final state."""
        entry = self._entry(job_id)
        updates: asyncio.Queue = asyncio.Queue()
        entry.watchers.add(updates)
        try:
            snapshot = self._snapshot(entry)
            yield snapshot
            while snapshot.state not in FINAL_STATES:
                snapshot = await updates.get()
                yield snapshot
        finally:
            entry.watchers.discard(updates)

    def list(self, state: int = 0, page_size: int = 0, page_token: str = "") -> tuple[list[tezzeret_pb2.CompileJob], str]:
        """Jobs in creation order, optionally of one state; (page, next_page_token)."""
        if state not in S.CompileJobState.values():
            raise InvalidArgumentError(f"state {state} is not a CompileJobState", field="state")
        if page_size < 0:
            raise InvalidArgumentError(f"page_size must be >= 0, got {page_size}", field="page_size")
        size = min(page_size or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)
        after = 0
        if page_token:
            try:
                after = int(base64.urlsafe_b64decode(page_token.encode()).decode())
            except ValueError:
                raise InvalidArgumentError(f"page_token {quoted(page_token)} is not a token this server returned",
                                           field="page_token") from None
        matches = [e for e in self._jobs.values() if e.seq > after and (not state or e.job.state == state)]
        page: list[_Entry] = []
        total = 0
        for entry in matches[:size]:
            total += entry.job.ByteSize() + 8
            if page and total > MAX_LIST_RESPONSE_BYTES:
                break  # a failed job carries its reason (up to 16 KiB): bound the page by bytes too
            page.append(entry)
        more = len(matches) > len(page)
        token = base64.urlsafe_b64encode(str(page[-1].seq).encode()).decode() if more else ""
        return [self._snapshot(e) for e in page], token

    def counts_by_state(self) -> dict[str, int]:
        """Jobs in the table by state name (every state, zeros included), for monitoring."""
        counts = {v.name: 0 for v in S.CompileJobState.DESCRIPTOR.values if not v.name.endswith("_UNSPECIFIED")}
        for entry in list(self._jobs.values()):
            name = _state_name(entry.job.state)
            counts[name] = counts.get(name, 0) + 1
        return counts

    async def cancel(self, job_id: str) -> tezzeret_pb2.CompileJob:
        """Cancel a queued or running job (its worker is killed and replaced)."""
        entry = self._entry(job_id)
        if entry.job.state in FINAL_STATES:
            raise FailedPreconditionError(f"job {job_id} already finished ({_state_name(entry.job.state)})",
                                          reason="JOB_FINISHED", metadata={"job_id": job_id})
        if entry.storing:
            raise FailedPreconditionError(f"job {job_id} compiled and is storing its artifact; it can no longer be "
                                          "cancelled", reason="JOB_STORING", metadata={"job_id": job_id})
        if not self.pool.cancel(job_id):
            raise FailedPreconditionError(f"job {job_id} is finishing and can no longer be cancelled",
                                          reason="JOB_FINISHING", metadata={"job_id": job_id})
        # The pool reports the cancellation through on_done; wait for it so the reply is final.
        async for snapshot in self.watch(job_id):
            if snapshot.state in FINAL_STATES:
                return snapshot
        return self._snapshot(entry)

    async def close(self) -> None:
        """Stop the pool (cancelling queued and running jobs) and wait for result handling."""
        await asyncio.to_thread(self.pool.shutdown)
        await asyncio.sleep(0)  # let the loop run pool callbacks scheduled during shutdown
        if self._background:
            await asyncio.wait(self._background, timeout=30)

    # -- internals ----------------------------------------------------------------------------

    def _entry(self, job_id: str) -> _Entry:
        if not job_id:
            raise InvalidArgumentError("job_id is required", field="job_id")
        entry = self._jobs.get(job_id)
        if entry is None:
            raise NotFoundError(f"compile job {quoted(job_id)} not found", reason="JOB_NOT_FOUND",
                                metadata={"job_id": job_id})
        return entry

    def _add(self, entry: _Entry) -> None:
        self._jobs[entry.job.job_id] = entry
        finished = [k for k, e in self._jobs.items() if e.job.state in FINAL_STATES]
        for job_id in finished[: max(0, len(finished) - self.max_finished_jobs)]:
            del self._jobs[job_id]

    @staticmethod
    def _snapshot(entry: _Entry) -> tezzeret_pb2.CompileJob:
        copy = tezzeret_pb2.CompileJob()
        copy.CopyFrom(entry.job)
        return copy

    def _notify(self, entry: _Entry) -> None:
        snapshot = self._snapshot(entry)
        for watcher in entry.watchers:
            watcher.put_nowait(snapshot)

    def _on_start(self, entry: _Entry, pid: int) -> None:
        if entry.job.state != S.COMPILE_JOB_STATE_QUEUED:
            return
        entry.job.state = S.COMPILE_JOB_STATE_RUNNING
        entry.job.start_time.CopyFrom(_now())
        log.info("job %s (%s) running in worker %d", entry.job.job_id, entry.job.kernel_id, pid)
        self._notify(entry)

    def _on_done(self, entry: _Entry, outcome: TaskOutcome) -> None:
        task = asyncio.ensure_future(self._finish(entry, outcome))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def _final(self, entry: _Entry, state: int, error: str = "") -> None:
        entry.job.state = state
        entry.job.error = error
        entry.job.end_time.CopyFrom(_now())
        if not entry.job.HasField("start_time"):
            entry.job.start_time.CopyFrom(entry.job.end_time)
        entry.storing = False
        if self._active_by_kernel.get(entry.job.kernel_id) is entry:
            del self._active_by_kernel[entry.job.kernel_id]
        log.info("job %s -> %s%s", entry.job.job_id, _state_name(state), f": {error}" if error else "")
        self._notify(entry)

    async def _finish(self, entry: _Entry, outcome: TaskOutcome) -> None:
        try:
            if outcome.kind == "ok":
                entry.storing = True
                await self._store(entry, outcome.value)
            elif outcome.kind == "timeout":
                self._final(entry, S.COMPILE_JOB_STATE_TIMED_OUT, f"compile {outcome.error}")
            elif outcome.kind == "cancelled":
                self._final(entry, S.COMPILE_JOB_STATE_CANCELLED, outcome.error)
            elif outcome.kind == "crashed":
                self._final(entry, S.COMPILE_JOB_STATE_FAILED, outcome.error)
            else:
                self._final(entry, S.COMPILE_JOB_STATE_FAILED, f"compiler error: {outcome.error.strip()[:4000]}")
        except Exception as exc:
            log.exception("job %s: storing the result failed", entry.job.job_id)
            self._final(entry, S.COMPILE_JOB_STATE_FAILED, f"could not store the result in Urza: {exc}")

    def _artifact(self, entry: _Entry, result: CompileOutcome) -> common_pb2.KernelArtifact:
        job = entry.job
        return common_pb2.KernelArtifact(
            kernel_id=job.kernel_id, blueprint_id=job.blueprint_id, blueprint_version=job.blueprint_version,
            input_shape=job.input_shape, device=job.device, dtype=job.dtype,
            parameter_count=result.parameter_count, flops_per_sample=result.flops_per_sample,
            latency_us=result.latency_us, preservation_error=result.preservation_error, tags=list(entry.spec.tags))

    async def _store(self, entry: _Entry, result: CompileOutcome) -> None:
        artifact = self._artifact(entry, result)
        if result.valid:
            artifact.status = common_pb2.ARTIFACT_STATUS_VALIDATED
            artifact.format = ARTIFACT_FORMAT
            artifact.sha256 = result.sha256
            artifact.size_bytes = len(result.artifact)
        else:
            artifact.status = common_pb2.ARTIFACT_STATUS_INVALID
            artifact.status_reason = bounded(result.reason, MAX_STATUS_REASON_CHARS)
        try:
            if result.valid:
                stored = await self._retrying(entry, lambda: self.library.store_artifact(artifact, result.artifact))
            else:
                stored = await self._retrying(entry, lambda: self.library.record_artifact(artifact))
        except AlreadyExistsError:
            # Another compile of the same kernel id (another server, or a request that raced this
            # one) stored its result first; artifacts are immutable, so that one stands.
            existing = await self.library.find_artifact(entry.job.kernel_id)
            if existing is None or existing.status not in (common_pb2.ARTIFACT_STATUS_VALIDATED,
                                                           common_pb2.ARTIFACT_STATUS_INVALID):
                raise
            entry.job.reused = True
            stored = existing
        entry.job.artifact.CopyFrom(stored)
        if stored.status == common_pb2.ARTIFACT_STATUS_VALIDATED:
            self._final(entry, S.COMPILE_JOB_STATE_SUCCEEDED)
        else:
            self._final(entry, S.COMPILE_JOB_STATE_FAILED, f"artifact INVALID: {stored.status_reason}")
        if not entry.job.reused:
            await self._publish(entry, stored)

    async def _retrying(self, entry: _Entry, store: Callable[[], Awaitable[_R]]) -> _R:
        """`await store()`, again after a transport or availability failure until store_retry_s has
        passed (the artifact is content-addressed and immutable, so a repeat is harmless)."""
        deadline = time.monotonic() + self.store_retry_s
        delay, cap = self.store_backoff_s
        attempt = 1
        while True:
            try:
                return await store()
            except (UnavailableError, DeadlineExceededError) as exc:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise
                wait = min(delay, cap, left)
                log.warning("job %s: storing in Urza failed (attempt %d: %s); retrying in %.1f s",
                            entry.job.job_id, attempt, exc, wait)
                await asyncio.sleep(wait)
                delay *= 2
                attempt += 1

    async def _publish(self, entry: _Entry, artifact: common_pb2.KernelArtifact) -> None:
        if self.publisher is None:
            return
        try:
            await self.publisher.publish_kernel_ready(
                common_pb2.KernelReadyEvent(job_id=entry.job.job_id, artifact=artifact))
        except Exception as exc:  # the artifact is stored; a lost event must not fail the job
            log.warning("job %s: could not publish the kernel-ready event: %s", entry.job.job_id, exc)
