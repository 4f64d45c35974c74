"""Validation of `BlueprintSpec` messages against a chunk size and an input kind."""

from __future__ import annotations

from esper.v1 import common_pb2

BlueprintSpec = common_pb2.BlueprintSpec
BlueprintLayerSpec = common_pb2.BlueprintLayerSpec
Op = common_pb2.BlueprintOp
SeedInputKind = common_pb2.SeedInputKind

FEATURES = common_pb2.SEED_INPUT_KIND_FEATURES
SEQUENCE = common_pb2.SEED_INPUT_KIND_SEQUENCE
IMAGE = common_pb2.SEED_INPUT_KIND_IMAGE

# Tensor rank of a chunk of each input kind: [N, C], [N, C, L], [N, C, H, W].
RANK_OF_KIND = {FEATURES: 2, SEQUENCE: 3, IMAGE: 4}
KIND_OF_RANK = {rank: kind for kind, rank in RANK_OF_KIND.items()}

# Ops that may change the width (and so read width / width_multiplier).
WIDTH_OPS = {Op.BLUEPRINT_OP_LINEAR, Op.BLUEPRINT_OP_CONV1D, Op.BLUEPRINT_OP_CONV2D}
# Ops with parameters, i.e. candidates for the zero-initialised last layer.
PARAMETRIC_OPS = WIDTH_OPS | {
    Op.BLUEPRINT_OP_BATCH_NORM,
    Op.BLUEPRINT_OP_LAYER_NORM,
    Op.BLUEPRINT_OP_GROUP_NORM,
    Op.BLUEPRINT_OP_SQUEEZE_EXCITE,
    Op.BLUEPRINT_OP_SELF_ATTENTION,
}
# A multiplicative gate cannot be zero-initialised into a zero delta, so it may not end a blueprint.
NOT_ZERO_INITIALISABLE = {Op.BLUEPRINT_OP_SQUEEZE_EXCITE}
# Input kinds each op accepts (missing: every kind).
OP_KINDS = {
    Op.BLUEPRINT_OP_CONV1D: {SEQUENCE},
    Op.BLUEPRINT_OP_CONV2D: {IMAGE},
    Op.BLUEPRINT_OP_SELF_ATTENTION: {SEQUENCE},
}
KNOWN_OPS = set(Op.values()) - {Op.BLUEPRINT_OP_UNSPECIFIED}


class BlueprintError(ValueError):
    """A blueprint that cannot be planted; the message names the blueprint id and the field."""

    def __init__(self, blueprint_id: str, field: str, problem: str) -> None:
        self.blueprint_id = blueprint_id
        self.field = field
        self.problem = problem
        super().__init__(f"blueprint {blueprint_id!r}: {field}: {problem}")


def kind_name(kind: int) -> str:
    try:
        return SeedInputKind.Name(kind)
    except ValueError:
        return f"<unknown input kind {kind}>"


def op_name(op: int) -> str:
    try:
        return Op.Name(op)
    except ValueError:
        return f"<unknown op {op}>"


def input_kind_for_rank(rank: int) -> int:
    """The SeedInputKind of a chunk tensor of this rank (2, 3 or 4), else ValueError."""
    if rank not in KIND_OF_RANK:
        raise ValueError(
            f"a seed input must have rank 2 [N, C], 3 [N, C, L] or 4 [N, C, H, W], got rank {rank}"
        )
    return KIND_OF_RANK[rank]


def _out_width(layer: BlueprintLayerSpec, in_width: int, chunk_size: int) -> int:
    if layer.op not in WIDTH_OPS:
        return in_width
    if layer.width > 0:
        return int(layer.width)
    if layer.width_multiplier > 0:
        return max(1, round(layer.width_multiplier * chunk_size))
    return in_width


def layer_widths(spec: BlueprintSpec, chunk_size: int) -> list[tuple[int, int]]:
    """(in, out) width of every layer at this chunk size (no validation)."""
    widths = []
    width = chunk_size
    for layer in spec.layers:
        out = _out_width(layer, width, chunk_size)
        widths.append((width, out))
        width = out
    return widths


def last_parametric_index(spec: BlueprintSpec) -> int:
    """Index of the last layer with parameters, -1 if there is none."""
    for i in range(len(spec.layers) - 1, -1, -1):
        if spec.layers[i].op in PARAMETRIC_OPS:
            return i
    return -1


def validate_blueprint(spec: BlueprintSpec, chunk_size: int, input_kind: int) -> None:
    """Check that `spec` can be planted on chunks of `chunk_size` channels of kind `input_kind`.

    Raises BlueprintError naming the blueprint id and the offending field (unknown op, an op
    that does not accept this input kind, widths that do not come back to the chunk size, even or
    non-positive kernel sizes, groups or heads that do not divide the width, a bad dropout, no
    zero-initialisable last layer, ...).
    """
    bid = spec.blueprint_id or "<no id>"
    if not isinstance(spec, BlueprintSpec):
        raise TypeError(f"expected an esper.v1.BlueprintSpec, got {type(spec).__name__}")
    if not spec.blueprint_id:
        raise BlueprintError(bid, "blueprint_id", "must be a non-empty lower_snake_case id")
    if input_kind not in RANK_OF_KIND:
        raise BlueprintError(
            bid, "input_kind", f"the site's input kind {kind_name(input_kind)} is not FEATURES, SEQUENCE or IMAGE"
        )
    if spec.input_kind != common_pb2.SEED_INPUT_KIND_UNSPECIFIED and spec.input_kind != input_kind:
        raise BlueprintError(
            bid,
            "input_kind",
            f"blueprint takes {kind_name(spec.input_kind)} inputs, the site provides {kind_name(input_kind)}",
        )
    if chunk_size < 1:
        raise BlueprintError(bid, "chunk_size", f"must be >= 1, got {chunk_size}")
    if chunk_size < spec.min_chunk_size:
        raise BlueprintError(
            bid, "min_chunk_size", f"needs chunks of at least {spec.min_chunk_size} channels, got {chunk_size}"
        )
    if not spec.layers:
        raise BlueprintError(bid, "layers", "a blueprint needs at least one layer")
    width = chunk_size
    for i, layer in enumerate(spec.layers):
        where = f"layers[{i}]"
        if layer.op not in KNOWN_OPS:
            raise BlueprintError(bid, f"{where}.op", f"unknown op {op_name(layer.op)} (value {layer.op})")
        name = op_name(layer.op)
        allowed = OP_KINDS.get(layer.op)
        if allowed is not None and input_kind not in allowed:
            raise BlueprintError(
                bid,
                f"{where}.op",
                f"{name} needs {' or '.join(kind_name(k) for k in sorted(allowed))} inputs, "
                f"the site provides {kind_name(input_kind)}",
            )
        if layer.op not in WIDTH_OPS and (layer.width != 0 or layer.width_multiplier != 0):
            field = "width" if layer.width != 0 else "width_multiplier"
            raise BlueprintError(bid, f"{where}.{field}", f"{name} keeps its input width; leave {field} unset")
        if layer.width < 0:
            raise BlueprintError(bid, f"{where}.width", f"must be >= 0, got {layer.width}")
        if layer.width_multiplier < 0:
            raise BlueprintError(bid, f"{where}.width_multiplier", f"must be >= 0, got {layer.width_multiplier}")
        out = _out_width(layer, width, chunk_size)
        if layer.op in (Op.BLUEPRINT_OP_CONV1D, Op.BLUEPRINT_OP_CONV2D):
            k = layer.kernel_size
            if k < 1 or k % 2 == 0:
                raise BlueprintError(
                    bid, f"{where}.kernel_size", f"must be a positive odd number ('same' padding), got {k}"
                )
            if layer.groups == -1:
                if out != width:
                    raise BlueprintError(
                        bid, f"{where}.groups", f"depthwise (-1) needs out width == in width, got {width} -> {out}"
                    )
            elif layer.groups < -1:
                raise BlueprintError(bid, f"{where}.groups", f"must be -1, 0 or a positive divisor, got {layer.groups}")
            elif layer.groups > 1 and (width % layer.groups or out % layer.groups):
                raise BlueprintError(
                    bid, f"{where}.groups", f"{layer.groups} groups must divide in width {width} and out width {out}"
                )
        elif layer.kernel_size not in (0, 1) and layer.op != Op.BLUEPRINT_OP_LINEAR:
            raise BlueprintError(bid, f"{where}.kernel_size", f"{name} has no kernel; leave it unset")
        elif layer.op == Op.BLUEPRINT_OP_LINEAR and layer.kernel_size not in (0, 1):
            raise BlueprintError(bid, f"{where}.kernel_size", f"LINEAR is pointwise; got kernel_size {layer.kernel_size}")
        if layer.op == Op.BLUEPRINT_OP_GROUP_NORM:
            g = layer.num_heads
            if g < 1 or width % g:
                raise BlueprintError(
                    bid, f"{where}.num_heads", f"group-norm groups must be >= 1 and divide width {width}, got {g}"
                )
        if layer.op == Op.BLUEPRINT_OP_SELF_ATTENTION:
            h = layer.num_heads
            if h < 1 or width % h:
                raise BlueprintError(
                    bid, f"{where}.num_heads", f"attention heads must be >= 1 and divide width {width}, got {h}"
                )
        if layer.op == Op.BLUEPRINT_OP_SQUEEZE_EXCITE and layer.reduction < 1:
            raise BlueprintError(bid, f"{where}.reduction", f"must be >= 1, got {layer.reduction}")
        if layer.op == Op.BLUEPRINT_OP_DROPOUT and not 0.0 <= layer.dropout < 1.0:
            raise BlueprintError(bid, f"{where}.dropout", f"must be in [0, 1), got {layer.dropout}")
        width = out
    if width != chunk_size:
        raise BlueprintError(
            bid,
            f"layers[{len(spec.layers) - 1}].width",
            f"the blueprint ends at width {width}, expected the chunk size {chunk_size}",
        )
    last = last_parametric_index(spec)
    if last < 0:
        raise BlueprintError(bid, "layers", "needs at least one parametric layer (a seed must be able to learn)")
    if spec.layers[last].op in NOT_ZERO_INITIALISABLE:
        raise BlueprintError(
            bid,
            f"layers[{last}].op",
            f"{op_name(spec.layers[last].op)} cannot be the last parametric layer: function preservation "
            "needs a zero-initialisable layer (linear, conv, norm or attention) last",
        )
