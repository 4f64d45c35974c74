"""Depth growth: a new block that is the identity at insertion (MLP and ResNet hosts)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from esper.kasmina.growth import insert_mlp_layer, insert_resnet_block
from esper.models import MLP
from esper.models.resnet import ResNetCifar


def test_identity_mlp_layer_preserves_the_function_and_trains():
    torch.manual_seed(0)
    model = MLP(20, hidden=8, num_classes=5, depth=2)
    x = torch.randn(32, 20)
    before = model(x).detach()
    params = insert_mlp_layer(model, 0)
    assert len(model.deepen[0].blocks) == 1
    assert (model(x) - before).abs().max() <= 1e-6
    F.cross_entropy(model(x), torch.zeros(32, dtype=torch.long)).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in params)


@pytest.mark.parametrize("mode", ["identity", "copy"])
@pytest.mark.parametrize("train", [True, False])
def test_resnet_block_insertion_preserves_the_function(mode, train):
    torch.manual_seed(0)
    model = ResNetCifar((1, 1, 1, 1), num_classes=10, width=4)
    x = torch.randn(8, 3, 8, 8)
    model.train(train)
    # Buffers are restored between the two passes so train-mode BatchNorm sees the same state.
    state = {k: v.clone() for k, v in model.state_dict().items()}
    before = model(x).detach()
    model.load_state_dict(state)
    # "copy" needs a neighbour with an identity shortcut (stage 1); "identity" also works after a
    # downsampling block (stage 2).
    name = "layer1" if mode == "copy" else "layer2"
    stage, stack = getattr(model, name), model.deepen[f"{name}_0"]
    params = insert_resnet_block(stage, 0, stack, mode)
    assert len(stack.blocks) == 1
    assert (model(x) - before).abs().max() <= 1e-6
    if mode == "copy":
        new, old = stack.blocks[0], stage[0]
        assert torch.equal(new.conv1.weight, old.conv1.weight) and new.conv1.weight is not old.conv1.weight
    assert len(params) == len(list(stack.blocks[0].parameters()))


def test_copy_needs_an_identity_shortcut_neighbour():
    model = ResNetCifar((1, 1, 1, 1), num_classes=10, width=4)
    with pytest.raises(ValueError, match="identity shortcut"):
        insert_resnet_block(model.layer2, 0, model.deepen["layer2_0"], "copy")
    with pytest.raises(ValueError, match="depth mode"):
        insert_resnet_block(model.layer1, 0, model.deepen["layer1_0"], "clone")
