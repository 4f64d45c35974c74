"""Asynchronous adaptation through the services (``services.mode`` local or remote).

`RemoteController` stands where the in-process `esper.tolaria.controllers.PolicyController`
stands (the `Controller` given to `Morphogenesis`), but nothing it does waits on the network inside a training step. All gRPC
work runs on one background thread with its own asyncio loop (`worker`); the training thread only
hands it work and drains a typed outbox of results at step boundaries (`outbox`).

The cycle of one adaptation:

1. epoch boundary: `decide(graph)` sends the `ModelGraphState` to Tamiyo (deadline
   ``services.decision_timeout_s``) and returns no decision at once; the reply is applied at the
   next step boundary (a decision for a slot that is no longer free is dropped with a note);
2. a GERMINATE decision: the kernel id of (blueprint, seed chunk shape, device, dtype) is looked
   up in the `KernelCache` (warm: the seed gets its module at once); else the slot goes
   GERMINATED (awaiting its kernel) and the kernel pipeline (`pipeline`) looks the kernel up in
   Urza and, if absent, asks Tezzeret to compile it; training goes on;
3. the kernel-ready event on Oona (``esper.kernel.ready``; polling the compile job covers a
   missed event and reports failures) makes the pipeline download the artifact from Urza, verify
   its SHA-256, keep a copy in the run directory (``kernels/<kernel id>.pt2``, for resume) and
   load it with `torch.export.load` (no pickle) into the Kasmina `KernelCache` (`kernels`), in
   slices between training steps (`esper.tolaria.slices`);
4. next step boundary: the seed gets a fresh copy of the loaded module and goes on through its
   lifecycle; its parameters join the optimizer;
5. a kernel the compiler rejects (an INVALID artifact: the blueprint does not fit, a failed
   preservation check) cancels the seed with the reason (GERMINATED seeds cannot be culled: they
   never touched the host) and that kernel id is not tried again in this run. Any other failure
   (a crashed or timed-out job, Urza unavailable past Tezzeret's store retries, bytes that never
   verify) is asked again with backoff (`pipeline.KERNEL_ATTEMPTS`); only then are its seeds
   cancelled, reported as ADAPTATION_OUTCOME_SERVICE_UNAVAILABLE (Tamiyo does not count them
   against max_adaptations), and a later decision may try the kernel again. A kernel that has not
   arrived ``services.germination_timeout_s`` seconds (or ``lifecycle.germination_timeout_epochs``
   epochs) after the decision cancels the seed too, but time and epochs spent while Urza or
   Tezzeret was down do not count: germination waits for a restarting service;
6. lifecycle transitions, decisions and epoch metrics are published on Oona; the outcome of every
   germination is reported to Tamiyo as a `FieldReport` (`reporting`).

Degradation: each service has a `esper.clients.ServiceLink` with exponential backoff. A failed call
marks the service down (a warning, ``adaptation_paused`` with the reason); until its backoff
expires no call is made to it, then a fresh channel is tried; when it answers, adaptation resumes.
Outcome reports and publishes wait in bounded queues until their service is back. Pending
kernels are retried until they arrive or their seed is cancelled.
"""

from esper.tolaria.adaptation.controller import RemoteController
from esper.tolaria.adaptation.kernels import KernelStore
from esper.tolaria.adaptation.links import channel_config
from esper.tolaria.adaptation.pipeline import CompileFailed, KernelPipeline, KernelUnavailable

__all__ = ["CompileFailed", "KernelPipeline", "KernelStore", "KernelUnavailable", "RemoteController", "channel_config"]
