"""Shapes, parameter counts and argument checks of the reference host models."""

import pytest
import torch

from esper.models import MLP, SmallCNN1d, SmallCNN2d, resnet18_cifar


def test_mlp_shapes_and_sites():
    model = MLP(in_features=64, hidden=32, num_classes=10, depth=3, width=2.0)
    out = model(torch.randn(5, 8, 8))
    assert out.shape == (5, 10)
    assert model.seed_site_names() == ["hidden.0", "hidden.1", "hidden.2"]
    assert model.hidden[0].out_features == 64


def test_cnn1d_and_cnn2d_shapes():
    m1 = SmallCNN1d(in_channels=1, num_classes=10, channels=(8, 16), width=1.0)
    assert m1(torch.randn(4, 1, 40)).shape == (4, 10)
    m2 = SmallCNN2d(in_channels=3, num_classes=7, channels=(8, 16, 16))
    assert m2(torch.randn(2, 3, 32, 32)).shape == (2, 7)
    assert m2.seed_site_names() == ["convs.0", "convs.1", "convs.2"]


def test_resnet18_cifar_parameter_count_and_sites():
    model = resnet18_cifar(num_classes=10, width=64)
    # The well-known 11,173,962 parameters of CIFAR ResNet-18.
    assert sum(p.numel() for p in model.parameters()) == 11_173_962
    assert len(model.seed_site_names()) == 8
    small = resnet18_cifar(num_classes=10, width=8)
    assert small(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    assert small.layer3[0].out_channels == 32


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="depth"):
        MLP(10, depth=0)
    with pytest.raises(ValueError, match="width"):
        resnet18_cifar(width=0)
