"""The CIFAR variant of ResNet-18 (3x3 stem, no max-pool), with a base width parameter."""

from __future__ import annotations

import torch
from torch import nn

from esper.models.deepen import DepthStack


class BasicBlock(nn.Module):
    """Two 3x3 conv+BN layers with an identity (or 1x1 projection) shortcut.

    Output is [N, out_channels, H/stride, W/stride]; `out_channels` is public so a KasminaLayer
    can wrap the whole block as one residual seed site.
    """

    expansion = 1

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


class ResNetCifar(nn.Module):
    """ResNet for 32x32 inputs: stem conv 3x3, four stages of BasicBlocks, global pool, linear head.

    Blocks are `layer{1..4}.{j}` (the natural seed sites); stage widths are width, 2w, 4w, 8w.
    """

    def __init__(
        self,
        blocks_per_stage: tuple[int, int, int, int] = (2, 2, 2, 2),
        num_classes: int = 10,
        width: int = 64,
        in_channels: int = 3,
    ) -> None:
        super().__init__()
        if width < 1:
            raise ValueError(f"ResNet width must be >= 1, got {width}")
        if len(blocks_per_stage) != 4 or any(b < 1 for b in blocks_per_stage):
            raise ValueError(f"blocks_per_stage must be 4 positive ints, got {blocks_per_stage}")
        self.conv1 = nn.Conv2d(in_channels, width, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        prev = width
        stages = []
        for s, n in enumerate(blocks_per_stage):
            out = width * 2**s
            stride = 1 if s == 0 else 2
            blocks = [BasicBlock(prev, out, stride)] + [BasicBlock(out, out, 1) for _ in range(n - 1)]
            stages.append(nn.Sequential(*blocks))
            prev = out
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.fc = nn.Linear(prev, num_classes)
        # Where depth growth inserts blocks after block j of stage s: deepen["layer{s}_{j}"] (empty:
        # identity, no parameters).
        self.deepen = nn.ModuleDict({name.replace(".", "_"): DepthStack(relu_after=False)
                                     for name in self.seed_site_names()})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        for s, stage in enumerate((self.layer1, self.layer2, self.layer3, self.layer4), start=1):
            for j, block in enumerate(stage):
                x = self.deepen[f"layer{s}_{j}"](block(x))
        return self.fc(x.mean(dim=(-2, -1)))

    def seed_site_names(self) -> list[str]:
        """Names of the residual blocks a trainer would normally wrap with seeds."""
        return [
            f"layer{s}.{j}"
            for s in range(1, 5)
            for j in range(len(getattr(self, f"layer{s}")))
        ]


    def depth_sites(self) -> list[tuple[str, str]]:
        """(seed site, depth stack) pairs: a new block after block j of stage s goes into deepen.layer{s}_{j}."""
        return [(name, f"deepen.{name.replace('.', '_')}") for name in self.seed_site_names()]

    def width_pairs(self) -> list:
        """Where width growth can add channels: the inner width of every block (conv1 -> bn1 -> conv2)."""
        from esper.kasmina.growth.pair import WidthPair

        return [WidthPair(f"{name}.conv1", f"{name}.conv2", norm=f"{name}.bn1") for name in self.seed_site_names()]


def resnet18_cifar(num_classes: int = 10, width: int = 64, in_channels: int = 3) -> ResNetCifar:
    """CIFAR ResNet-18 (11.2M parameters at width 64, num_classes 10)."""
    return ResNetCifar((2, 2, 2, 2), num_classes=num_classes, width=width, in_channels=in_channels)
