"""The shipped catalog of blueprints, written as data (BlueprintSpec messages)."""

from __future__ import annotations

from esper.kasmina.blueprints.spec import FEATURES, IMAGE, SEQUENCE, BlueprintLayerSpec, BlueprintSpec, Op

ANY = 0  # SEED_INPUT_KIND_UNSPECIFIED: every input kind (pointwise blueprints)


def _layer(op: int, **fields) -> BlueprintLayerSpec:
    return BlueprintLayerSpec(op=op, **fields)


def _spec(blueprint_id: str, family: str, description: str, kind: int, layers, tags, min_chunk: int = 1):
    return BlueprintSpec(
        blueprint_id=blueprint_id,
        version=1,
        family=family,
        description=description,
        input_kind=kind,
        layers=layers,
        tags=tags,
        min_chunk_size=min_chunk,
    )


_L = Op.BLUEPRINT_OP_LINEAR
_C1 = Op.BLUEPRINT_OP_CONV1D
_C2 = Op.BLUEPRINT_OP_CONV2D

_BLUEPRINTS = [
    _spec(
        "residual_mlp", "mlp", "Pointwise two-layer MLP (expand x2, GELU, project back) added to the chunk.",
        ANY,
        [_layer(_L, width_multiplier=2.0, bias=True), _layer(Op.BLUEPRINT_OP_GELU),
         _layer(_L, width_multiplier=1.0, bias=True)],
        ["residual", "pointwise"],
    ),
    _spec(
        "norm_mlp", "mlp", "LayerNorm then a ReLU MLP (expand x4): a transformer-style feed-forward block.",
        FEATURES,
        [_layer(Op.BLUEPRINT_OP_LAYER_NORM), _layer(_L, width_multiplier=4.0, bias=True),
         _layer(Op.BLUEPRINT_OP_RELU), _layer(_L, width_multiplier=1.0, bias=True)],
        ["residual", "feed_forward"],
    ),
    _spec(
        "lora_adapter", "adapter", "Low-rank adapter: down-project to rank 4, up-project (zero-init).",
        ANY,
        [_layer(_L, width=4), _layer(_L, width_multiplier=1.0)],
        ["adapter", "low_rank", "cheap"],
        min_chunk=4,
    ),
    _spec(
        "conv1x1", "conv", "A single 1x1 convolution on the chunk's channels.",
        IMAGE,
        [_layer(_C2, kernel_size=1, width_multiplier=1.0, bias=True)],
        ["conv", "cheap"],
    ),
    _spec(
        "conv3x3", "conv", "3x3 conv, BatchNorm, ReLU, 3x3 conv (zero-init): a residual conv branch.",
        IMAGE,
        [_layer(_C2, kernel_size=3, width_multiplier=1.0), _layer(Op.BLUEPRINT_OP_BATCH_NORM),
         _layer(Op.BLUEPRINT_OP_RELU), _layer(_C2, kernel_size=3, width_multiplier=1.0, bias=True)],
        ["conv", "residual"],
    ),
    _spec(
        "depthwise_separable", "conv", "Depthwise 3x3 conv, BatchNorm, ReLU, pointwise 1x1 conv.",
        IMAGE,
        [_layer(_C2, kernel_size=3, groups=-1, width_multiplier=1.0), _layer(Op.BLUEPRINT_OP_BATCH_NORM),
         _layer(Op.BLUEPRINT_OP_RELU), _layer(_C2, kernel_size=1, width_multiplier=1.0, bias=True)],
        ["conv", "efficient"],
    ),
    _spec(
        "bottleneck", "conv", "ResNet bottleneck: 1x1 reduce to 1/4, 3x3, 1x1 expand back, BN+ReLU between.",
        IMAGE,
        [_layer(_C2, kernel_size=1, width_multiplier=0.25), _layer(Op.BLUEPRINT_OP_BATCH_NORM),
         _layer(Op.BLUEPRINT_OP_RELU), _layer(_C2, kernel_size=3, width_multiplier=0.25),
         _layer(Op.BLUEPRINT_OP_BATCH_NORM), _layer(Op.BLUEPRINT_OP_RELU),
         _layer(_C2, kernel_size=1, width_multiplier=1.0, bias=True)],
        ["conv", "residual", "bottleneck"],
        min_chunk=4,
    ),
    _spec(
        "squeeze_excitation", "attention",
        "Squeeze-excitation channel gate (reduction 4) followed by a zero-initialised 1x1 projection.",
        ANY,
        [_layer(Op.BLUEPRINT_OP_SQUEEZE_EXCITE, reduction=4, bias=True), _layer(_L, width_multiplier=1.0, bias=True)],
        ["attention", "channel_gate"],
        min_chunk=4,
    ),
    _spec(
        "sequence_self_attention", "attention",
        "LayerNorm then multi-head self-attention over the length axis (output projection zero-init).",
        SEQUENCE,
        [_layer(Op.BLUEPRINT_OP_LAYER_NORM), _layer(Op.BLUEPRINT_OP_SELF_ATTENTION, num_heads=2, bias=True)],
        ["attention", "sequence"],
        min_chunk=2,
    ),
    _spec(
        "conv1d_k3", "conv", "1D conv k=3, BatchNorm, ReLU, 1D conv k=3 (zero-init): a residual sequence branch.",
        SEQUENCE,
        [_layer(_C1, kernel_size=3, width_multiplier=1.0), _layer(Op.BLUEPRINT_OP_BATCH_NORM),
         _layer(Op.BLUEPRINT_OP_RELU), _layer(_C1, kernel_size=3, width_multiplier=1.0, bias=True)],
        ["conv", "sequence", "residual"],
    ),
    _spec(
        "depthwise_separable_1d", "conv", "Depthwise 1D conv k=5, GroupNorm, SiLU, pointwise conv.",
        SEQUENCE,
        [_layer(_C1, kernel_size=5, groups=-1, width_multiplier=1.0), _layer(Op.BLUEPRINT_OP_GROUP_NORM, num_heads=1),
         _layer(Op.BLUEPRINT_OP_SILU), _layer(_C1, kernel_size=1, width_multiplier=1.0, bias=True)],
        ["conv", "sequence", "efficient"],
    ),
]

CATALOG: dict[str, BlueprintSpec] = {spec.blueprint_id: spec for spec in _BLUEPRINTS}


def catalog_ids() -> list[str]:
    """Ids of the shipped blueprints, in catalog order."""
    return list(CATALOG)


def get_blueprint(blueprint_id: str) -> BlueprintSpec:
    """A copy of the catalog blueprint `blueprint_id`; KeyError listing the known ids otherwise."""
    try:
        spec = CATALOG[blueprint_id]
    except KeyError:
        raise KeyError(f"unknown blueprint {blueprint_id!r}; the catalog has {sorted(CATALOG)}") from None
    copy = BlueprintSpec()
    copy.CopyFrom(spec)
    return copy
