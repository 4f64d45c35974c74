"""Reference host models that Esper grows: an MLP, small 1D/2D CNNs and the CIFAR ResNet-18.

Every model names its layers so `esper.kasmina.wrap(model, target_layers=[...])` can address them
(`MLP.seed_site_names()` etc. list the natural seed sites), and every residual block exposes
`out_channels` so a `KasminaLayer` can wrap it without being told the channel count.
"""

from esper.models.cnn import SmallCNN1d, SmallCNN2d
from esper.models.mlp import MLP
from esper.models.resnet import BasicBlock, ResNetCifar, resnet18_cifar

__all__ = ["MLP", "SmallCNN1d", "SmallCNN2d", "BasicBlock", "ResNetCifar", "resnet18_cifar"]
