"""Tezzeret: compiles (blueprint, input shape, device, dtype) into validated kernel artifacts.

    from esper.tezzeret import compile_blueprint, load_kernel_artifact, kernel_id_for
    outcome = compile_blueprint(spec.SerializeToString(), [-1, 32], DEVICE_TYPE_CPU, D_TYPE_FLOAT32)
    seed = load_kernel_artifact(outcome.artifact)        # nn.Module: chunk [N, 32] -> delta [N, 32]

    # the trainer, with an artifact compiled by the Tezzeret server and stored in Urza:
    artifact, data = esper.clients.UrzaClient(urza_address).download_artifact(kernel_id)
    seed = load_kernel_artifact(data, expected_sha256=artifact.sha256)

`WorkerPool` runs compiles in spawn-started processes with per-job timeouts (a stuck worker is
killed and replaced); `CompileJobs` is the job table behind the gRPC server `services.tezzeret`
(console script ``esper-tezzeret``), storing results in Urza and announcing them on Oona.
"""

from esper.tezzeret.compiler import (
    ARTIFACT_FORMAT,
    CompileOutcome,
    ExportedSeed,
    compile_blueprint,
    load_kernel_artifact,
    warm_up_compiler,
)
from esper.tezzeret.jobs import CompileJobs, KernelEventPublisher, KernelLibrary, validate_compile_request
from esper.tezzeret.kernel_ids import kernel_id_for
from esper.tezzeret.limits import CompileLimits, check_compile_limits
from esper.tezzeret.pool import TaskOutcome, WorkerPool

__all__ = [
    "ARTIFACT_FORMAT",
    "CompileJobs",
    "CompileLimits",
    "CompileOutcome",
    "ExportedSeed",
    "KernelEventPublisher",
    "KernelLibrary",
    "TaskOutcome",
    "WorkerPool",
    "check_compile_limits",
    "compile_blueprint",
    "kernel_id_for",
    "load_kernel_artifact",
    "validate_compile_request",
    "warm_up_compiler",
]
