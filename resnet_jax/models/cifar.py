"""The CIFAR-10 networks of Sec. 4.2: a 3x3 conv, three stages of n blocks on 32/16/8 maps with
16/32/64 filters, global average pooling and a 10-way dense layer; 6n+2 weighted layers."""
import functools
from typing import Sequence

import flax.linen as nn

from resnet_jax.models import layers


class CifarResNet(layers.Network):
    """ResNet-(6n+2) of Sec. 4.2, or with `residual=False` its plain counterpart."""

    depth: int
    residual: bool = True
    shortcut: str = "A"
    num_classes: int = 10
    widths: Sequence[int] = (16, 32, 64)
    zero_init_last: bool = False

    @property
    def blocks_per_stage(self) -> int:
        return (self.depth - 2) // 6

    @nn.compact
    def __call__(self, x, train: bool = False, features: bool = False):
        x, conv, norm = self.begin(x, train)
        x = conv(self.widths[0], (3, 3), name="conv1")(x)
        x = nn.relu(layers.Response(name="response1")(norm(name="bn1")(x)))
        block = functools.partial(layers.BasicBlock, conv=conv, norm=norm, residual=self.residual,
                                  shortcut=self.shortcut, zero_init_last=self.zero_init_last,
                                  kernels=self.kernels)
        stages = {}
        for s, width in enumerate(self.widths):
            x = stages[f"stage{s + 1}"] = layers.Stage(
                block, width, self.blocks_per_stage, 1 if s == 0 else 2, name=f"stage{s + 1}")(x)
        return self.outputs(layers.global_average_pool(x), stages, features)
