"""The networks of the paper's experiments (those of MAML, Finn et al. 2017)."""
from __future__ import annotations

from torch import nn


def conv4(in_channels: int, num_classes: int, hidden: int = 64, image_size: int = 28,
          max_pool: bool = False) -> nn.Sequential:
    """Four blocks of [3x3 conv -> batch norm -> ReLU (-> 2x2 max-pool)], then a linear head.

    ``max_pool=False``: stride-2 convolutions (MAML's Omniglot network, 64 filters).
    ``max_pool=True``: stride-1 convolutions with 2x2 max-pooling (the Mini-ImageNet network,
    32 filters). Batch norm is transductive: it normalises with the statistics of the batch at
    hand and keeps no running statistics, so the network is a pure function of its parameters.
    """
    layers, c, size = [], in_channels, image_size
    for _ in range(4):
        if max_pool:
            layers += [nn.Conv2d(c, hidden, 3, padding=1),
                       nn.BatchNorm2d(hidden, track_running_stats=False), nn.ReLU(),
                       nn.MaxPool2d(2)]
            size = size // 2
        else:
            layers += [nn.Conv2d(c, hidden, 3, stride=2, padding=1),
                       nn.BatchNorm2d(hidden, track_running_stats=False), nn.ReLU()]
            size = (size + 1) // 2
        c = hidden
    layers += [nn.Flatten(), nn.Linear(hidden * size * size, num_classes)]
    return nn.Sequential(*layers)


def omniglot_conv4(num_classes: int) -> nn.Sequential:
    """MAML's Omniglot CNN: 1x28x28 input, 64 filters, stride 2."""
    return conv4(1, num_classes, hidden=64, image_size=28)


def miniimagenet_conv4(num_classes: int) -> nn.Sequential:
    """MAML's Mini-ImageNet CNN: 3x84x84 input, 32 filters, max-pooling."""
    return conv4(3, num_classes, hidden=32, image_size=84, max_pool=True)
