"""The torch runtime of a run: which device it trains on, and seeded, deterministic kernels."""

from __future__ import annotations

import torch

from esper.tolaria.config import ConfigError


def resolve_device(name: str) -> torch.device:
    """auto -> cuda when available else cpu; asking for cuda without one is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device: 'cuda' was requested but no CUDA device is available; expected auto or cpu")
    return torch.device(name)


def seed_everything(seed: int) -> None:
    """Seeds torch (CPU and CUDA) and makes cuDNN deterministic."""
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False
