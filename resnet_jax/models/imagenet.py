"""The ImageNet networks of Table 1: a 7x7/2 conv and 3x3/2 max-pool, four stages (conv2_x to
conv5_x) of basic or bottleneck blocks with 64/128/256/512 filters, average pool, 1000-way dense."""
import functools
from typing import Sequence

import flax.linen as nn

from resnet_jax.models import layers

# Table 1: blocks per stage.
STAGE_SIZES = {18: (2, 2, 2, 2), 34: (3, 4, 6, 3), 50: (3, 4, 6, 3), 101: (3, 4, 23, 3),
               152: (3, 8, 36, 3)}


class ImageNetResNet(layers.Network):
    """ResNet-18/34 (basic blocks), 50/101/152 (bottleneck), or with `residual=False` plain nets."""

    stage_sizes: Sequence[int]
    bottleneck: bool = False
    residual: bool = True
    shortcut: str = "B"
    stride_in_3x3: bool = False
    num_classes: int = 1000
    widths: Sequence[int] = (64, 128, 256, 512)
    zero_init_last: bool = False

    @nn.compact
    def __call__(self, x, train: bool = False, features: bool = False):
        x, conv, norm = self.begin(x, train)
        x = conv(self.widths[0], (7, 7), 2, name="conv1")(x)
        x = nn.relu(norm(name="bn1")(x))
        x = nn.max_pool(x, (3, 3), (2, 2), padding=layers.conv_padding(3))
        common = dict(conv=conv, norm=norm, residual=self.residual, shortcut=self.shortcut,
                      zero_init_last=self.zero_init_last, kernels=self.kernels)
        block = (functools.partial(layers.Bottleneck, stride_in_3x3=self.stride_in_3x3, **common)
                 if self.bottleneck else functools.partial(layers.BasicBlock, **common))
        stages = {}
        for s, (width, num_blocks) in enumerate(zip(self.widths, self.stage_sizes)):
            x = stages[f"stage{s + 1}"] = layers.Stage(block, width, num_blocks, 1 if s == 0 else 2,
                                                       name=f"stage{s + 1}")(x)
        return self.outputs(layers.global_average_pool(x), stages, features)
