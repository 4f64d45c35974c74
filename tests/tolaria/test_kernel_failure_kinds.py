"""Only the compiler's verdict fails a kernel for the whole run; an outage's failures are retried.

The trainer reads a finished Tezzeret job: FAILED with an INVALID artifact is deterministic
(CompileFailed: the kernel goes on the run-long failed list); FAILED without one ("could not store
the result in Urza: UNAVAILABLE", a crashed worker), TIMED_OUT and CANCELLED may pass
(KernelUnavailable: asked again, and its seeds are not counted against max_adaptations).
"""

from __future__ import annotations

import pytest

from esper.tolaria.adaptation import CompileFailed, KernelUnavailable
from esper.tolaria.adaptation.outbox import KernelFailed
from esper.tolaria.adaptation.pipeline import _job_done
from esper.v1 import common_pb2, tezzeret_pb2

T = tezzeret_pb2


def _job(state: int, error: str = "", artifact_status: int = 0) -> T.CompileJob:
    job = T.CompileJob(job_id="job-1", state=state, error=error)
    if artifact_status:
        job.artifact.status = artifact_status
    return job


def test_store_failure_after_an_urza_outage_is_not_a_compile_failure():
    job = _job(T.COMPILE_JOB_STATE_FAILED, "could not store the result in Urza: Urza at 127.0.0.1:1 did not "
                                           "answer (UNAVAILABLE)")
    with pytest.raises(KernelUnavailable, match="UNAVAILABLE"):
        _job_done(job)


@pytest.mark.parametrize("state", [T.COMPILE_JOB_STATE_TIMED_OUT, T.COMPILE_JOB_STATE_CANCELLED])
def test_timeouts_and_cancellations_may_pass(state):
    with pytest.raises(KernelUnavailable):
        _job_done(_job(state, "worker killed"))


def test_an_invalid_artifact_is_the_compilers_verdict():
    job = _job(T.COMPILE_JOB_STATE_FAILED, "artifact INVALID: function preservation failed",
               common_pb2.ARTIFACT_STATUS_INVALID)
    with pytest.raises(CompileFailed, match="preservation"):
        _job_done(job)


def test_running_and_succeeded_jobs():
    assert _job_done(_job(T.COMPILE_JOB_STATE_SUCCEEDED)) is True
    assert _job_done(_job(T.COMPILE_JOB_STATE_RUNNING)) is False


def test_kernel_failed_defaults_to_deterministic_only_when_said():
    assert KernelFailed("k", "r").deterministic
    assert not KernelFailed("k", "r", deterministic=False).deterministic
