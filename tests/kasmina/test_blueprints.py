"""Blueprint catalog, validation errors, seed builder (function preservation, export) and costs."""

import pytest
import torch

from esper.kasmina.blueprints import (
    CATALOG,
    BlueprintError,
    BlueprintSpec,
    blueprint_cost,
    build_seed_module,
    get_blueprint,
    validate_blueprint,
)
from esper.kasmina.blueprints.spec import FEATURES, IMAGE, SEQUENCE, BlueprintLayerSpec, Op

SHAPES = {FEATURES: (6, 16), SEQUENCE: (6, 16, 10), IMAGE: (6, 16, 5, 5)}


def _fits(spec, kind, chunk=16):
    try:
        validate_blueprint(spec, chunk, kind)
    except BlueprintError:
        return False
    return True


def _cases():
    return [
        pytest.param(bid, kind, id=f"{bid}-{kind}")
        for bid, spec in CATALOG.items()
        for kind in SHAPES
        if _fits(spec, kind)
    ]


def test_catalog_has_required_families():
    assert len(CATALOG) >= 8
    for bid in ("residual_mlp", "conv1x1", "conv3x3", "depthwise_separable", "bottleneck",
                "squeeze_excitation", "lora_adapter", "sequence_self_attention"):
        assert bid in CATALOG
    # every input kind has at least two blueprints
    for kind in SHAPES:
        assert sum(_fits(spec, kind) for spec in CATALOG.values()) >= 2


def test_get_blueprint_returns_a_copy_and_names_unknown_ids():
    spec = get_blueprint("residual_mlp")
    spec.layers[0].width = 999
    assert CATALOG["residual_mlp"].layers[0].width == 0
    with pytest.raises(KeyError, match="no_such_blueprint.*residual_mlp"):
        get_blueprint("no_such_blueprint")


@pytest.mark.parametrize(("bid", "kind"), _cases())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_seed_is_function_preserving_and_learns(bid, kind, dtype):
    torch.manual_seed(0)
    spec = CATALOG[bid]
    shape = SHAPES[kind]
    seed = build_seed_module(spec, 16, shape, dtype, "cpu")
    x = torch.randn(shape, dtype=dtype)
    delta = seed(x)
    assert delta.shape == x.shape and delta.dtype == dtype
    assert torch.count_nonzero(delta) == 0
    # A task gradient reaches at least one seed parameter (the zero-initialised last layer).
    (delta * torch.randn_like(delta)).sum().backward()
    grads = [p.grad for p in seed.parameters() if p.grad is not None]
    assert any(float(g.abs().sum()) > 0 for g in grads)


@pytest.mark.parametrize(("bid", "kind"), _cases())
def test_parameter_count_matches_built_module(bid, kind):
    spec = CATALOG[bid]
    for chunk in (8, 16, 32):
        if not _fits(spec, kind, chunk):
            continue
        shape = (4, chunk) + SHAPES[kind][2:]
        seed = build_seed_module(spec, chunk, shape)
        cost = blueprint_cost(spec, chunk, shape)
        assert cost.parameter_count == sum(p.numel() for p in seed.parameters())
        assert cost.flops_per_sample > 0
        assert list(cost.input_shape.dims) == [-1, *shape[1:]]
        assert cost.chunk_size == chunk


def test_flops_scale_with_positions():
    spec = CATALOG["conv3x3"]
    small = blueprint_cost(spec, 8, (-1, 8, 4, 4)).flops_per_sample
    large = blueprint_cost(spec, 8, (-1, 8, 8, 8)).flops_per_sample
    assert large == 4 * small
    # conv3x3 at chunk 8, 4x4: two 3x3 convs of 8->8 channels (2 FLOPs per MAC) dominate.
    assert small >= 2 * 2 * 8 * 8 * 9 * 16


@pytest.mark.parametrize("bid", ["residual_mlp", "conv3x3", "sequence_self_attention"])
def test_seed_modules_export_with_dynamic_batch(bid):
    spec = CATALOG[bid]
    kind = {"residual_mlp": FEATURES, "conv3x3": IMAGE, "sequence_self_attention": SEQUENCE}[bid]
    shape = (4,) + SHAPES[kind][1:]
    seed = build_seed_module(spec, 16, shape).eval()
    batch = torch.export.Dim("batch", min=2, max=1024)
    program = torch.export.export(seed, (torch.randn(shape),), dynamic_shapes=({0: batch},))
    x = torch.randn((7,) + shape[1:])
    assert torch.equal(program.module()(x), seed(x))


def _spec(*layers, kind=FEATURES, bid="custom_bp", min_chunk=0):
    return BlueprintSpec(blueprint_id=bid, input_kind=kind, layers=list(layers), min_chunk_size=min_chunk)


L = Op.BLUEPRINT_OP_LINEAR


@pytest.mark.parametrize(
    ("spec", "kind", "chunk", "field"),
    [
        (_spec(BlueprintLayerSpec(op=99)), FEATURES, 8, "layers[0].op"),
        (_spec(BlueprintLayerSpec(op=Op.BLUEPRINT_OP_UNSPECIFIED)), FEATURES, 8, "layers[0].op"),
        (CATALOG["conv3x3"], FEATURES, 8, "input_kind"),
        (_spec(BlueprintLayerSpec(op=Op.BLUEPRINT_OP_CONV2D, kernel_size=3), kind=0), FEATURES, 8,
         "layers[0].op"),
        (_spec(BlueprintLayerSpec(op=L, width_multiplier=2.0)), FEATURES, 8, "layers[0].width"),
        (_spec(BlueprintLayerSpec(op=Op.BLUEPRINT_OP_CONV2D, kernel_size=2), kind=IMAGE), IMAGE, 8,
         "layers[0].kernel_size"),
        (_spec(BlueprintLayerSpec(op=Op.BLUEPRINT_OP_CONV1D, kernel_size=-3), kind=SEQUENCE), SEQUENCE, 8,
         "layers[0].kernel_size"),
        (_spec(BlueprintLayerSpec(op=Op.BLUEPRINT_OP_LAYER_NORM),
               BlueprintLayerSpec(op=Op.BLUEPRINT_OP_SELF_ATTENTION, num_heads=3), kind=SEQUENCE),
         SEQUENCE, 8, "layers[1].num_heads"),
        (_spec(BlueprintLayerSpec(op=Op.BLUEPRINT_OP_GROUP_NORM, num_heads=5)), FEATURES, 8,
         "layers[0].num_heads"),
        (CATALOG["lora_adapter"], FEATURES, 2, "min_chunk_size"),
        (_spec(BlueprintLayerSpec(op=Op.BLUEPRINT_OP_RELU)), FEATURES, 8, "layers"),
        (_spec(BlueprintLayerSpec(op=L, width=4), BlueprintLayerSpec(op=Op.BLUEPRINT_OP_SQUEEZE_EXCITE,
               reduction=2)), FEATURES, 4, "layers[1].op"),
        (_spec(BlueprintLayerSpec(op=Op.BLUEPRINT_OP_RELU, width=4), BlueprintLayerSpec(op=L)), FEATURES, 8,
         "layers[0].width"),
        (_spec(BlueprintLayerSpec(op=Op.BLUEPRINT_OP_DROPOUT, dropout=1.5), BlueprintLayerSpec(op=L)),
         FEATURES, 8, "layers[0].dropout"),
        (_spec(BlueprintLayerSpec(op=Op.BLUEPRINT_OP_CONV2D, kernel_size=3, groups=3), kind=IMAGE), IMAGE, 8,
         "layers[0].groups"),
        (_spec(BlueprintLayerSpec(op=Op.BLUEPRINT_OP_CONV2D, kernel_size=3, groups=-1, width=4), kind=IMAGE),
         IMAGE, 8, "layers[0].groups"),
        (_spec(), FEATURES, 8, "layers"),
        (_spec(BlueprintLayerSpec(op=L), bid=""), FEATURES, 8, "blueprint_id"),
    ],
)
def test_validation_errors_name_blueprint_and_field(spec, kind, chunk, field):
    with pytest.raises(BlueprintError) as info:
        validate_blueprint(spec, chunk, kind)
    err = info.value
    assert err.field == field
    assert field in str(err)
    assert (spec.blueprint_id or "<no id>") in str(err)


def test_build_rejects_bad_input_shape():
    with pytest.raises(ValueError, match="rank 2"):
        build_seed_module(CATALOG["residual_mlp"], 8, (4, 8, 2, 2, 2))
    with pytest.raises(ValueError, match="chunk_size 8"):
        build_seed_module(CATALOG["residual_mlp"], 8, (4, 16))
    with pytest.raises(BlueprintError, match="sequence_self_attention.*input_kind"):
        build_seed_module(CATALOG["sequence_self_attention"], 8, (4, 8, 3, 3))


def test_catalog_specs_are_valid_for_their_kind_at_typical_chunks():
    for spec in CATALOG.values():
        kinds = [spec.input_kind] if spec.input_kind else list(SHAPES)
        for kind in kinds:
            for chunk in (16, 32, 64):
                validate_blueprint(spec, chunk, kind)
