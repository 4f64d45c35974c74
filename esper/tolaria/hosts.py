"""Builds the host model a run starts from, and measures its compute in FLOPs."""

from __future__ import annotations

import torch
from torch import nn

from esper.kasmina.model_state import buffers_and_mode_kept
from esper.tolaria.config import ModelConfig


class ModelConfigError(ValueError):
    """The model does not fit the dataset (e.g. a 2D CNN on sequences)."""


def model_input_shape(model: ModelConfig, data_shape: tuple[int, ...]) -> tuple[int, ...]:
    """The per-sample shape the model consumes, derived from the dataset's natural shape."""
    numel = 1
    for d in data_shape:
        numel *= d
    if model.name == "mlp":
        return (numel,)
    if model.name == "cnn1d":
        # Images are read as one long sequence per channel; vectors as a 1-channel sequence.
        return (data_shape[0], numel // data_shape[0]) if len(data_shape) >= 2 else (1, numel)
    if model.name in ("cnn2d", "resnet18"):
        if len(data_shape) != 3:
            raise ModelConfigError(
                f"model '{model.name}' needs image inputs (channels, height, width); the dataset gives "
                f"samples of shape {tuple(data_shape)}; expected model mlp or cnn1d for this dataset"
            )
        if model.name == "resnet18" and data_shape[1:] != (32, 32):
            raise ModelConfigError(f"model 'resnet18' expects 32x32 images, the dataset gives {tuple(data_shape)}")
        return tuple(data_shape)
    raise ModelConfigError(f"unknown model '{model.name}'; expected one of mlp, cnn1d, cnn2d, resnet18")


def build_host(model: ModelConfig, input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """The static host network (before any seed is planted)."""
    from esper.models import MLP, SmallCNN1d, SmallCNN2d, resnet18_cifar

    if model.name == "mlp":
        return MLP(in_features=input_shape[0], hidden=model.width, num_classes=num_classes, depth=model.depth)
    channels = [model.width * m for m in model.stage_multipliers]
    if model.name == "cnn1d":
        return SmallCNN1d(in_channels=input_shape[0], num_classes=num_classes, channels=channels)
    if model.name == "cnn2d":
        return SmallCNN2d(in_channels=input_shape[0], num_classes=num_classes, channels=channels)
    if model.name == "resnet18":
        return resnet18_cifar(num_classes=num_classes, width=model.width, in_channels=input_shape[0])
    raise ModelConfigError(f"unknown model '{model.name}'; expected one of mlp, cnn1d, cnn2d, resnet18")


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def forward_flops_per_sample(model: nn.Module, input_shape: tuple[int, ...], device: torch.device) -> float:
    """Forward FLOPs of one sample as the model is now (active seeds included).

    Runs in training mode (seeds in TRAINING compute only there) on a batch of 2 under no_grad, and
    restores every buffer afterwards so BatchNorm statistics and seed telemetry are untouched.
    """
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.zeros((2, *input_shape), device=device)
    counter = FlopCounterMode(display=False)
    with buffers_and_mode_kept(model):
        model.train()
        with torch.no_grad(), counter:
            model(x)
    return counter.get_total_flops() / 2.0
