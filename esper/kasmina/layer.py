"""`KasminaLayer`: one host module plus `num_seeds` seed slots that really run in its forward pass.

Seed `i` owns output channels `[i*C/S, (i+1)*C/S)` (dim 1) of the host output `h` ([N, C, *]).

Forward, by the state of each slot (see esper/kasmina/lifecycle.py for the transitions):

- no slot active (DORMANT, GERMINATED, CULLED, ...): `forward` checks one Python int and returns
  the host output object itself -- no op call, no allocation, no hook.
- TRAINING: `s = seed(h_chunk.detach())`; `ops.seed_blend` returns `h` exactly on that chunk but
  routes the task gradient into the seed (straight-through), so the seed learns while the host's
  function and gradients are untouched.
- GRAFTING / FINE_TUNING / FOSSILIZED: `out = h + alpha * s`, `s = seed(h_chunk)`; host and seed train.
- STABILIZATION / EVALUATING: `out = h + alpha * s` with the seed run under `no_grad` (frozen).
- Non-finite seed values are replaced by 0 inside `ops.seed_blend`, so they never reach the host.
- A layer with one slot (the seed owns every channel) blends with `ops.seed_blend_whole`: the same
  values and gradients in native ops, without the custom op's Python autograd wrapper.

Telemetry (activation mean/variance/dead fraction via `ops.telemetry_accumulate_`, gradient norm via
`ops.grad_telemetry_accumulate_` from a tensor hook) is gathered on the host output while any seed
is active, or on every layer inside `telemetry_probe(model)`, and read once per epoch by
`seed_table()`. In TRAINING the layer also accumulates the seed's gradient alignment (sum of
<dL/dh, s>, |dL/dh|^2, |s|^2) that the TRAINING gate uses.

Trainer-facing API (stable): `germinate`, `attach_kernel`, `cull`, `cancel`, `rollback`,
`transition`, `seed_table`, `seed_disabled` (context manager forcing alpha = 0 for counterfactual
evaluation), `seed_parameters`, `add_listener`, `state_of`, `seed_dtype`, and for a resume with
compiled kernels `checkpointed_kernels` / `preload_seed`. Use `esper.kasmina.wrap` to build
layers and `esper.kasmina.LifecycleDriver` to run the gates.

Growth modes (`esper.kasmina.growth`): a seed module with `blends_elsewhere = True` (a width or
depth seed) occupies a slot -- its state, alpha, gates and checkpoint -- but adds its output to
another module through hooks, so this layer skips it in its own blend. `seed_builders[family]`
rebuilds such seeds from their spec on a checkpoint load, `release_merged` frees the slot of a
fossilized seed once it is merged into the host (FOSSILIZED -> DORMANT), and `set_host` swaps in
a wider host module.

Checkpoints: `state_dict()` holds the state table (buffers under `table.`), the seed modules'
parameters (under `seeds.<i>.`) and, as extra state, the germinated blueprint specs; loading it into
a freshly wrapped model rebuilds the grown seeds before their parameters are loaded.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from google.protobuf import json_format
from torch import nn

from esper.kasmina import ops
from esper.kasmina.blueprints import (
    BlueprintSpec,
    build_seed_module,
    get_blueprint,
    input_kind_for_rank,
    validate_blueprint,
)
from esper.kasmina.lifecycle import (
    ACTIVE_STATES,
    FROZEN_STATES,
    AlignmentWindow,
    LifecycleEvent,
    LifecycleListener,
    check_transition,
)
from esper.kasmina.state_table import SeedStateTable
from esper.lifecycle import SeedLifecycleState as S
from esper.v1 import common_pb2

_EXTRA_STATE_VERSION = 1


class LifecycleClock:
    """Where training is (global step, epoch); shared by a driver and its layers for event records."""

    def __init__(self) -> None:
        self.global_step = 0
        self.epoch = 0


@dataclass
class SeedRow:
    """One row of a layer's seed table, read from the device in one go."""

    layer: str
    seed: int
    state: S
    alpha: float
    blueprint_id: str
    kernel_id: str
    steps_in_state: int
    epochs_in_state: int
    embargo_epochs_left: int
    last_contribution: float | None
    chunk_size: int
    parameter_count: int
    telemetry: dict[str, float] = field(default_factory=dict)

    def to_proto(self) -> common_pb2.SeedSlot:
        """The row as an `esper.v1.SeedSlot` message."""
        t = self.telemetry
        return common_pb2.SeedSlot(
            layer_name=self.layer,
            seed_index=self.seed,
            state=int(self.state),
            alpha=self.alpha,
            blueprint_id=self.blueprint_id,
            kernel_id=self.kernel_id,
            epochs_in_state=self.epochs_in_state,
            steps_in_state=self.steps_in_state,
            embargo_epochs_left=self.embargo_epochs_left,
            telemetry=common_pb2.SeedTelemetry(
                activation_mean=t.get("mean", 0.0),
                activation_variance=t.get("variance", 0.0),
                dead_fraction=t.get("dead_fraction", 0.0),
                gradient_norm=t.get("gradient_norm", 0.0),
                samples=int(t.get("samples", 0)),
                gradient_alignment=t.get("alignment", 0.0),
                has_gradient_alignment="alignment" in t,
            ),
            last_contribution=self.last_contribution if self.last_contribution is not None else 0.0,
            has_contribution=self.last_contribution is not None,
            chunk_size=self.chunk_size,
            parameter_count=self.parameter_count,
        )


def infer_channels(module: nn.Module) -> int | None:
    """Output channel count of nn.Linear / nn.Conv* / any module exposing `out_channels`."""
    if isinstance(module, nn.Linear):
        return module.out_features
    for attr in ("out_channels", "out_features"):
        value = getattr(module, attr, None)
        if isinstance(value, int):
            return value
    return None


def infer_spatial_dims(module: nn.Module) -> int | None:
    """0 for Linear, 1 for Conv1d, 2 for Conv2d; for a block, that of its last Linear/Conv submodule."""
    kinds = {nn.Linear: 0, nn.Conv1d: 1, nn.Conv2d: 2}
    found = None
    for sub in module.modules():
        for cls, dims in kinds.items():
            if type(sub) is cls:
                found = dims
    return found


class KasminaLayer(nn.Module):
    """Wraps one host module whose output is [N, C, *] and gives it `num_seeds` seed slots.

    Args:
        host: the wrapped module (nn.Linear, nn.Conv1d, nn.Conv2d, a residual block, ...).
        num_seeds: number of seed slots; each owns C / num_seeds output channels.
        channels: C; inferred for Linear/Conv and modules with an `out_channels` attribute.
        spatial_dims: trailing dims after C (0 features, 1 sequence, 2 image); inferred from the
            host's last Linear/Conv when not given.
        name: the layer's name in the model (used in events and seed tables).
    """

    def __init__(
        self,
        host: nn.Module,
        num_seeds: int = 1,
        channels: int | None = None,
        spatial_dims: int | None = None,
        name: str = "",
    ) -> None:
        super().__init__()
        if isinstance(host, KasminaLayer):
            raise TypeError(f"layer {name!r} is already a KasminaLayer; wrap a host module only once")
        channels = channels if channels is not None else infer_channels(host)
        if channels is None:
            raise ValueError(
                f"cannot infer the output channel count of {name or type(host).__name__} "
                f"({type(host).__name__}); pass channels=C (its output is [N, C, *])"
            )
        if num_seeds < 1 or channels % num_seeds:
            raise ValueError(
                f"layer {name!r}: num_seeds must be >= 1 and divide the {channels} output channels, got {num_seeds}"
            )
        spatial_dims = spatial_dims if spatial_dims is not None else infer_spatial_dims(host)
        if spatial_dims not in (0, 1, 2):
            raise ValueError(
                f"layer {name!r}: cannot tell whether {type(host).__name__} outputs features, sequences or "
                f"images; pass spatial_dims=0, 1 or 2 (got {spatial_dims})"
            )
        self.host = host
        self.layer_name = name
        self.channels = channels
        self.num_seeds = num_seeds
        self.chunk_size = channels // num_seeds
        self.spatial_dims = spatial_dims
        self.input_kind = input_kind_for_rank(spatial_dims + 2)
        reference = next(host.parameters(), None)
        device = reference.device if reference is not None else None
        self.table = SeedStateTable(num_seeds, device=device)
        self.seeds = nn.ModuleDict()
        self.embargo_epochs = 2
        self.dead_threshold = 0.0
        self.clock = LifecycleClock()
        self._listeners: list[LifecycleListener] = []
        self._specs: dict[int, BlueprintSpec] = {}
        self._kernel_ids: dict[int, str] = {}
        # Cosine of the last alignment window the TRAINING gate read, per seed: exported in the
        # seed table as telemetry for learned policies (the accumulators are reset by each read).
        self._last_alignment: dict[int, float] = {}
        self._blueprint_ids: list[str] = []
        self._probe = False
        # Bumped whenever a seed module or the host module is replaced, added or dropped: what
        # the model computes per sample can only change then (Morphogenesis caches FLOPs on it).
        self.structure_version = 0
        # Seed modules built by something other than a blueprint (e.g. width seeds), by spec family:
        # builder(spec, slot index) -> module.
        self.seed_builders: dict[str, Callable[[BlueprintSpec, int], nn.Module]] = {}
        self._sync_mirrors()
        self._register_load_state_dict_pre_hook(self._before_load)
        self.register_load_state_dict_post_hook(KasminaLayer._after_load)

    # ---------------------------------------------------------------- forward

    def forward(self, *args, **kwargs):
        h = self.host(*args, **kwargs)
        if self._live == 0:
            return h
        return self._forward_live(h)

    def _forward_live(self, h: torch.Tensor) -> torch.Tensor:
        if h.dim() != self.spatial_dims + 2 or h.shape[1] != self.channels:
            raise ValueError(
                f"layer {self.layer_name!r}: host output has shape {list(h.shape)}, expected "
                f"[N, {self.channels}{', *' * self.spatial_dims}]"
            )
        out = h
        if self._num_active:
            out = self._blend_whole(h) if self.num_seeds == 1 else self._blend_chunks(h)
        if self.training:
            # No no_grad() context here or in the hook: the op reads a detached tensor and writes a
            # buffer, so autograd has nothing to record, and the two context switches were a
            # third of the telemetry's cost per layer and step on small hosts.
            ops.telemetry_accumulate_(h.detach(), self.table.telemetry, self.dead_threshold)
            if out.requires_grad and torch.is_grad_enabled():
                out.register_hook(self._grad_telemetry_hook)
        return out

    def _seed_output(self, i: int, state: S, x: torch.Tensor) -> torch.Tensor:
        seed = self.seeds[str(i)]
        if state in FROZEN_STATES:
            with torch.no_grad():
                return seed(x.detach())
        if state == S.TRAINING:
            s = seed(x.detach())
            if s.requires_grad and torch.is_grad_enabled():
                s.register_hook(functools.partial(self._alignment_hook, i, s.detach()))
            return s
        return seed(x)

    def _blend_whole(self, h: torch.Tensor) -> torch.Tensor:
        # One slot owning every channel (the common case): no chunking, and the blend in native
        # ops (ops.seed_blend_whole).
        state = self._states[0]
        if getattr(self.seeds._modules.get("0"), "blends_elsewhere", False):
            return h  # a width or depth seed adds to the consumer of this layer, not to this output
        s = self._seed_output(0, state, h)
        return ops.seed_blend_whole(h, s.to(h.dtype), state, self.table.state, self.table.alpha)

    def _blend_chunks(self, h: torch.Tensor) -> torch.Tensor:
        c = self.chunk_size
        pieces = []
        for i, state in enumerate(self._states):
            if state not in ACTIVE_STATES or getattr(self.seeds[str(i)], "blends_elsewhere", False):
                # Inactive, or a width seed that adds to the consumer of this layer, not to this output.
                pieces.append(None)
                continue
            pieces.append(self._seed_output(i, state, h[:, i * c : (i + 1) * c]))
        template = next((p for p in pieces if p is not None), None)
        if template is None:
            return h
        filled = [p if p is not None else template.new_zeros(template.shape) for p in pieces]
        seed_out = filled[0] if len(filled) == 1 else torch.cat(filled, dim=1)
        return ops.seed_blend(h, seed_out.to(h.dtype), self.table.state, self.table.alpha)

    def _grad_telemetry_hook(self, grad: torch.Tensor) -> None:
        # The gradient only requires grad in a double backward (create_graph=True).
        ops.grad_telemetry_accumulate_(grad.detach() if grad.requires_grad else grad, self.table.telemetry)

    def _alignment_hook(self, index: int, seed_out: torch.Tensor, grad: torch.Tensor) -> None:
        with torch.no_grad():
            # Three BLAS dot products over flat views (one pass each, no float64 copies of the
            # activations): this hook runs every TRAINING step and was ~1/3 of the seed's forward.
            g = grad.reshape(-1)
            s = torch.nan_to_num(seed_out.reshape(-1).to(g.dtype), nan=0.0, posinf=0.0, neginf=0.0)
            sums = torch.stack([torch.dot(g, s), torch.dot(g, g), torch.dot(s, s)])
            self.table.alignment[index] += sums.to(self.table.alignment.dtype)

    # ---------------------------------------------------------------- mirrors

    def _sync_mirrors(self) -> None:
        """Rebuild the Python-side mirrors of the state table (after init or a checkpoint load)."""
        self._states = [S(v) for v in self.table.state.tolist()]
        self._steps = [int(v) for v in self.table.steps_in_state.tolist()]
        self._epochs = [int(v) for v in self.table.epochs_in_state.tolist()]
        self._embargo = [int(v) for v in self.table.embargo.tolist()]
        self._recount()

    def _recount(self) -> None:
        self._num_active = sum(1 for s in self._states if s in ACTIVE_STATES)
        self._num_live_slots = sum(1 for s in self._states if s not in (S.DORMANT, S.UNSPECIFIED))
        # The one counter the forward checks: seeds to run, plus the telemetry probe.
        self._live = self._num_active + (1 if self._probe else 0)

    # ---------------------------------------------------------------- queries

    def state_of(self, index: int) -> S:
        """Lifecycle state of slot `index` (from the Python mirror: no device sync)."""
        return self._states[self._check_index(index)]

    def steps_in_state(self, index: int) -> int:
        return self._steps[self._check_index(index)]

    def epochs_in_state(self, index: int) -> int:
        return self._epochs[self._check_index(index)]

    @property
    def num_active(self) -> int:
        """Number of slots whose seed runs in the forward pass."""
        return self._num_active

    @property
    def num_live_slots(self) -> int:
        """Number of slots that are not DORMANT (their counters advance each step)."""
        return self._num_live_slots

    def blueprint_of(self, index: int) -> BlueprintSpec | None:
        return self._specs.get(self._check_index(index))

    def seed_parameters(self, index: int | None = None) -> list[nn.Parameter]:
        """Parameters of seed `index` (or of every seed); host parameters are never included."""
        if index is None:
            return [p for m in self.seeds.values() for p in m.parameters()]
        module = self._module_of(self._check_index(index))
        return list(module.parameters()) if module is not None else []

    def _module_of(self, index: int) -> nn.Module | None:
        # nn.ModuleDict has no .get()
        return self.seeds._modules.get(str(index))

    def _check_index(self, index: int) -> int:
        if not 0 <= index < self.num_seeds:
            raise IndexError(f"layer {self.layer_name!r} has seeds 0..{self.num_seeds - 1}, got seed index {index}")
        return index

    # ---------------------------------------------------------------- lifecycle

    def add_listener(self, listener: LifecycleListener) -> None:
        """Call `listener(event)` on every transition of this layer's seeds."""
        self._listeners.append(listener)

    def remove_listener(self, listener: LifecycleListener) -> None:
        self._listeners.remove(listener)

    def germinate(
        self,
        seed_index: int,
        spec_or_id: BlueprintSpec | str,
        module: nn.Module | None = None,
        *,
        await_kernel: bool = False,
        kernel_id: str = "",
        reason: str = "",
    ) -> None:
        """Plant a blueprint in a DORMANT slot.

        With `module` (e.g. an artifact loaded from the kernel cache) or by default (the seed is
        built here with `build_seed_module`) the slot goes DORMANT -> GERMINATED -> TRAINING at once;
        with `await_kernel=True` it stays GERMINATED until `attach_kernel`. Raises BlueprintError if
        the blueprint does not fit this layer, IllegalTransitionError if the slot is not DORMANT.
        """
        index = self._check_index(seed_index)
        spec = get_blueprint(spec_or_id) if isinstance(spec_or_id, str) else spec_or_id
        check_transition(self._states[index], S.GERMINATED, self._where(index))
        if spec.family not in self.seed_builders:
            validate_blueprint(spec, self.chunk_size, self.input_kind)
        self._specs[index] = spec
        self._kernel_ids[index] = kernel_id
        if spec.blueprint_id not in self._blueprint_ids:
            self._blueprint_ids.append(spec.blueprint_id)
        self.table.blueprint_index[index] = self._blueprint_ids.index(spec.blueprint_id)
        self.transition(index, S.GERMINATED, reason or f"germinated blueprint {spec.blueprint_id!r}")
        if module is not None or not await_kernel:
            self.attach_kernel(index, module)

    def attach_kernel(self, seed_index: int, module: nn.Module | None = None, kernel_id: str = "") -> None:
        """Give a GERMINATED slot its seed module (built here when `module` is None) -> TRAINING."""
        index = self._check_index(seed_index)
        check_transition(self._states[index], S.TRAINING, self._where(index))
        spec = self._specs[index]
        if module is None:
            module = self._build(spec, index)
        else:
            module = module.to(device=self.table.state.device, dtype=self.seed_dtype())
        if kernel_id:
            self._kernel_ids[index] = kernel_id
        self.seeds[str(index)] = module
        self.structure_version += 1
        how = "built locally" if not self._kernel_ids.get(index) else f"kernel {self._kernel_ids[index]}"
        self.transition(index, S.TRAINING, f"seed module attached ({how})")

    def cull(self, seed_index: int, reason: str) -> None:
        """Remove a seed (TRAINING..FINE_TUNING); the slot is embargoed, then DORMANT again."""
        self.transition(seed_index, S.CULLED, reason)

    def cancel(self, seed_index: int, reason: str) -> None:
        """Abandon a seed before it touched the host (GERMINATED/TRAINING); the slot is DORMANT at once."""
        self.transition(seed_index, S.CANCELLED, reason)
        self.transition(seed_index, S.DORMANT, "slot freed after cancellation")

    def rollback(self, seed_index: int, reason: str) -> None:
        """The governor rolled this seed's adaptation back; the slot is DORMANT at once."""
        self.transition(seed_index, S.ROLLED_BACK, reason)
        self.transition(seed_index, S.DORMANT, "slot freed after rollback")

    def transition(self, seed_index: int, to_state: S, reason: str) -> LifecycleEvent:
        """Move slot `seed_index` to `to_state` (legal moves only) and emit a LifecycleEvent."""
        index = self._check_index(seed_index)
        to_state = S(to_state)
        from_state = self._states[index]
        check_transition(from_state, to_state, self._where(index))
        if to_state == S.TRAINING and str(index) not in self.seeds:
            raise RuntimeError(f"{self._where(index)}: cannot enter TRAINING without a seed module (attach_kernel)")
        return self._enter(index, to_state, reason)

    def release_merged(self, seed_index: int, reason: str) -> LifecycleEvent:
        """FOSSILIZED -> DORMANT for a seed whose units were merged into the host (width growth).

        The only way out of FOSSILIZED: the seed no longer exists as a seed (its capacity is now
        plain host weights), so the slot is free for the next growth. Raises for any other seed.
        """
        index = self._check_index(seed_index)
        module = self._module_of(index)
        if self._states[index] != S.FOSSILIZED or not getattr(module, "blends_elsewhere", False):
            raise RuntimeError(f"{self._where(index)}: only a FOSSILIZED width seed can be released after a "
                               f"merge (state {self._states[index].name}, module {type(module).__name__})")
        telemetry = self.table.telemetry[index].clone()  # still describes the (now wider) host site
        event = self._enter(index, S.DORMANT, reason)
        self.table.telemetry[index].copy_(telemetry)
        return event

    def set_host(self, module: nn.Module) -> None:
        """Replace the host module by a resized one (width growth merged into it)."""
        channels = infer_channels(module)
        if channels is None or channels % self.num_seeds:
            raise ValueError(f"layer {self.layer_name!r}: new host must have output channels divisible by "
                             f"{self.num_seeds} seeds, got {channels}")
        if channels != self.channels and any(s in ACTIVE_STATES and not getattr(self._module_of(i), "blends_elsewhere", False)
                                             for i, s in enumerate(self._states)):
            raise RuntimeError(f"layer {self.layer_name!r}: cannot resize the host from {self.channels} to {channels} "
                               "channels while a residual seed is active on it")
        self.host = module
        self.structure_version += 1
        self.channels = channels
        self.chunk_size = channels // self.num_seeds

    def _drop_module(self, key: str) -> None:
        release = getattr(self.seeds[key], "release", None)
        if release is not None:
            release()
        del self.seeds[key]
        self.structure_version += 1

    def _enter(self, index: int, to_state: S, reason: str) -> LifecycleEvent:
        from_state = self._states[index]
        table = self.table
        if to_state == S.GRAFTING:
            table.alpha[index] = 0.0
        elif to_state in (S.STABILIZATION, S.EVALUATING, S.FINE_TUNING, S.FOSSILIZED):
            table.alpha[index] = 1.0
        elif to_state in (S.CULLED, S.CANCELLED, S.ROLLED_BACK, S.DORMANT):
            table.alpha[index] = 0.0
            if str(index) in self.seeds:
                self._drop_module(str(index))
        if to_state == S.TRAINING:
            table.alignment[index] = 0.0
        if to_state == S.CULLED:
            table.embargo[index] = self.embargo_epochs
            self._embargo[index] = self.embargo_epochs
        if to_state == S.DORMANT:
            table.embargo[index] = 0
            self._embargo[index] = 0
            table.blueprint_index[index] = -1
            table.contribution[index] = math.nan
            table.alignment[index] = 0.0
            ops.telemetry_reset_(table.telemetry[index : index + 1])
            self._specs.pop(index, None)
            self._kernel_ids.pop(index, None)
            self._last_alignment.pop(index, None)
        table.state[index] = int(to_state)
        table.steps_in_state[index] = 0
        table.epochs_in_state[index] = 0
        self._states[index] = to_state
        self._steps[index] = 0
        self._epochs[index] = 0
        self._recount()
        event = LifecycleEvent(
            layer=self.layer_name,
            seed=index,
            from_state=from_state,
            to_state=to_state,
            step=self.clock.global_step,
            epoch=self.clock.epoch,
            reason=reason,
        )
        for listener in list(self._listeners):
            listener(event)
        return event

    def advance(self, alpha_step: float) -> None:
        """One training step for the whole table: one `ops.lifecycle_advance_` call (skipped when all DORMANT)."""
        if self._num_live_slots == 0:
            return
        t = self.table
        ops.lifecycle_advance_(t.state, t.alpha, t.steps_in_state, alpha_step)
        for i, s in enumerate(self._states):
            if s not in (S.DORMANT, S.UNSPECIFIED):
                self._steps[i] += 1

    def end_epoch(self) -> list[LifecycleEvent]:
        """Epoch boundary: epochs_in_state += 1 for live slots; embargoes count down and expire."""
        if self._num_live_slots == 0:
            return []
        t = self.table
        live = (t.state != int(S.DORMANT)) & (t.state != int(S.UNSPECIFIED))
        t.epochs_in_state += live.long()
        culled = t.state == int(S.CULLED)
        t.embargo.sub_(culled.long()).clamp_(min=0)
        events = []
        for i, s in enumerate(self._states):
            if s in (S.DORMANT, S.UNSPECIFIED):
                continue
            self._epochs[i] += 1
            if s == S.CULLED:
                self._embargo[i] = max(0, self._embargo[i] - 1)
                if self._embargo[i] == 0:
                    events.append(self.transition(i, S.DORMANT, "embargo over"))
        return events

    def read_alignment(self, seed_index: int) -> AlignmentWindow:
        """The seed's gradient alignment accumulated since the last read (one device sync); resets it."""
        index = self._check_index(seed_index)
        gs, gg, ss = self.table.alignment[index].tolist()
        self.table.alignment[index] = 0.0
        window = AlignmentWindow(gs, gg, ss)
        self._last_alignment[index] = window.cosine
        return window

    def record_contribution(self, seed_index: int, contribution: float) -> None:
        self.table.contribution[self._check_index(seed_index)] = float(contribution)

    @contextlib.contextmanager
    def seed_disabled(self, seed_index: int) -> Iterator[None]:
        """Force alpha = 0 for one seed (counterfactual evaluation); restores alpha on exit."""
        index = self._check_index(seed_index)
        saved = self.table.alpha[index].clone()
        self.table.alpha[index] = 0.0
        try:
            yield
        finally:
            self.table.alpha[index].copy_(saved)

    def structure_changed(self) -> None:
        """Records that what this site computes changed outside its own modules (e.g. a width or
        depth seed's hooks were installed on other modules of the model)."""
        self.structure_version += 1

    def set_telemetry_probe(self, enabled: bool) -> None:
        """Collect telemetry even when no seed is active (turns the dormant fast path off)."""
        self._probe = bool(enabled)
        self._recount()

    # ---------------------------------------------------------------- tables

    def seed_table(self) -> list[SeedRow]:
        """One row per slot with state, alpha, blueprint, counters, contribution and telemetry."""
        t = self.table
        readout = ops.telemetry_readout(t.telemetry)
        names = list(readout)
        # One device->host copy for the whole table.
        columns = [readout[k].double() for k in names] + [
            t.alpha.double(), t.contribution, t.steps_in_state.double(), t.epochs_in_state.double(),
            t.embargo.double(),
        ]
        values = torch.stack(columns).tolist()
        readout = dict(zip(names, values[: len(names)], strict=True))
        alpha, contribution, steps, epochs, embargo = values[len(names) :]
        rows = []
        for i in range(self.num_seeds):
            spec = self._specs.get(i)
            module = self._module_of(i)
            rows.append(
                SeedRow(
                    layer=self.layer_name,
                    seed=i,
                    state=self._states[i],
                    alpha=float(alpha[i]),
                    blueprint_id=spec.blueprint_id if spec is not None else "",
                    kernel_id=self._kernel_ids.get(i, ""),
                    steps_in_state=int(steps[i]),
                    epochs_in_state=int(epochs[i]),
                    embargo_epochs_left=int(embargo[i]),
                    last_contribution=None if math.isnan(contribution[i]) else float(contribution[i]),
                    chunk_size=self.chunk_size,
                    parameter_count=sum(p.numel() for p in module.parameters()) if module is not None else 0,
                    telemetry={k: float(v[i]) for k, v in readout.items()}
                    | ({"alignment": self._last_alignment[i]} if i in self._last_alignment else {}),
                )
            )
        return rows

    def reset_telemetry(self) -> None:
        ops.telemetry_reset_(self.table.telemetry)

    # ---------------------------------------------------------------- building and checkpoints

    def seed_dtype(self) -> torch.dtype:
        """The dtype seeds of this layer run in: the host's floating-point dtype (float32 otherwise)."""
        reference = next(self.host.parameters(), None)
        return reference.dtype if reference is not None and reference.is_floating_point() else torch.float32

    def checkpointed_kernels(self, state_dict: dict, prefix: str = "") -> dict[int, tuple[str, BlueprintSpec]]:
        """Seed index -> (kernel id, blueprint spec) of the seeds that ran a compiled kernel and are
        active in a checkpoint's `state_dict` of this layer (keys under `prefix`)."""
        extra = state_dict.get(prefix + "_extra_state") or {}
        states = state_dict.get(prefix + "table.state")
        found = {}
        for index, kernel_id in (extra.get("kernel_ids") or {}).items():
            if states is None or not kernel_id or S(int(states[int(index)])) not in ACTIVE_STATES:
                continue
            found[int(index)] = (kernel_id, json_format.Parse(extra["specs"][index], BlueprintSpec()))
        return found

    def preload_seed(self, seed_index: int, module: nn.Module) -> None:
        """Before a checkpoint loads: use `module` (e.g. the compiled kernel the seed ran) as slot
        `seed_index`'s seed; loading keeps a module whose `blueprint_id` matches the checkpoint's."""
        self.seeds[str(self._check_index(seed_index))] = module
        self.structure_version += 1

    def _build(self, spec: BlueprintSpec, index: int) -> nn.Module:
        if spec.family in self.seed_builders:
            return self.seed_builders[spec.family](spec, index)
        shape = (-1, self.chunk_size) + (1,) * self.spatial_dims
        return build_seed_module(spec, self.chunk_size, shape, self.seed_dtype(), self.table.state.device)

    def _where(self, index: int) -> str:
        return f"layer {self.layer_name!r} seed {index}"

    def seed_metadata(self) -> dict:
        """The seeds' specs, kernel ids and blueprint ids as plain JSON-able data (what a checkpoint
        stores beside the state table; also what replicas compare across ranks)."""
        return self.get_extra_state()

    def get_extra_state(self) -> dict:
        return {
            "version": _EXTRA_STATE_VERSION,
            "specs": {str(i): json_format.MessageToJson(spec) for i, spec in self._specs.items()},
            "kernel_ids": {str(i): k for i, k in self._kernel_ids.items()},
            "blueprint_ids": list(self._blueprint_ids),
        }

    def set_extra_state(self, state: dict) -> None:
        # Applied by _before_load (seed modules must exist before their parameters load).
        pass

    def _before_load(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        extra = state_dict.get(prefix + "_extra_state")
        if extra is None:
            return
        if extra.get("version") != _EXTRA_STATE_VERSION:
            error_msgs.append(f"{prefix}: unsupported KasminaLayer checkpoint version {extra.get('version')!r}")
            return
        states = state_dict.get(prefix + "table.state")
        specs = {int(i): json_format.Parse(text, BlueprintSpec()) for i, text in extra["specs"].items()}
        self._specs = specs
        self._kernel_ids = {int(i): k for i, k in extra["kernel_ids"].items()}
        self._blueprint_ids = list(extra["blueprint_ids"])
        wanted = {
            i for i in specs if states is not None and S(int(states[i])) in ACTIVE_STATES
        }
        for key in list(self.seeds.keys()):
            if int(key) not in wanted:
                self._drop_module(key)
        for i in sorted(wanted):
            current = self._module_of(i)
            if current is None or getattr(current, "blueprint_id", None) != specs[i].blueprint_id:
                if current is not None:
                    self._drop_module(str(i))
                self.seeds[str(i)] = self._build(specs[i], i)
                self.structure_version += 1

    @staticmethod
    def _after_load(module: KasminaLayer, incompatible_keys) -> None:
        module._sync_mirrors()

    def extra_repr(self) -> str:
        return (
            f"name={self.layer_name!r}, channels={self.channels}, num_seeds={self.num_seeds}, "
            f"chunk_size={self.chunk_size}, active={self._num_active}"
        )
