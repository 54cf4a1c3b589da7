"""The CIFAR-10 networks of Sec. 4.2: a 3x3 conv, three stages of n blocks on 32/16/8 maps with
16/32/64 filters, global average pooling and a 10-way dense layer; 6n+2 weighted layers."""
from typing import Any, Callable, Optional, Sequence

import chex
import flax.linen as nn
import jax.numpy as jnp

from resnet_jax.models import layers


class CifarResNet(nn.Module):
    """ResNet-(6n+2) of Sec. 4.2, or with `residual=False` its plain counterpart."""

    depth: int
    residual: bool = True
    shortcut: str = "A"
    num_classes: int = 10
    widths: Sequence[int] = (16, 32, 64)
    zero_init_last: bool = False
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    bn_momentum: float = layers.BN_MOMENTUM
    bn_epsilon: float = layers.BN_EPSILON
    # None: the backend's fastest form of the convolution (resnet_jax.models.fast_conv).
    conv_general_dilated: Optional[Callable] = None

    @property
    def blocks_per_stage(self) -> int:
        return (self.depth - 2) // 6

    @nn.compact
    def __call__(self, x, train: bool = False):
        chex.assert_rank(x, 4)
        chex.assert_axis_dimension(x, -1, 3)
        conv, norm = layers.make_conv_norm(train, self.dtype, self.param_dtype, self.bn_momentum,
                                           self.bn_epsilon, self.conv_general_dilated)
        x = jnp.asarray(x, self.dtype)
        x = conv(self.widths[0], (3, 3), name="conv1")(x)
        x = nn.relu(layers.Response(name="response1")(norm(name="bn1")(x)))
        block = lambda features, strides, name: layers.BasicBlock(
            features, strides, conv, norm, residual=self.residual, shortcut=self.shortcut,
            zero_init_last=self.zero_init_last, name=name)
        for s, width in enumerate(self.widths):
            x = layers.Stage(block, width, self.blocks_per_stage, 1 if s == 0 else 2,
                             name=f"stage{s + 1}")(x)
        x = layers.global_average_pool(x)
        x = nn.Dense(self.num_classes, dtype=self.dtype, param_dtype=self.param_dtype,
                     name="fc")(x)
        return jnp.asarray(x, jnp.float32)
