"""VGG-19 as drawn in the paper's Fig. 3 (left): 16 3x3 conv layers in five stages with max-pool
between them, then two 4096-wide dense layers and the classifier."""
from typing import Any, Callable, Optional, Sequence

import chex
import flax.linen as nn
import jax.numpy as jnp

from resnet_jax.models import layers

VGG19_STAGES = ((64, 2), (128, 2), (256, 4), (512, 4), (512, 4))


class VGG(nn.Module):
    """VGG (Simonyan & Zisserman): conv with bias and no BN, as the paper compares against;
    `batch_norm=True` puts BN after every conv (then the convs lose their bias)."""

    stages: Sequence[Sequence[int]] = VGG19_STAGES
    num_classes: int = 1000
    batch_norm: bool = False
    dropout_rate: float = 0.5
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    bn_momentum: float = layers.BN_MOMENTUM
    bn_epsilon: float = layers.BN_EPSILON
    conv_general_dilated: Optional[Callable] = None

    @nn.compact
    def __call__(self, x, train: bool = False):
        chex.assert_rank(x, 4)
        chex.assert_axis_dimension(x, -1, 3)
        conv, norm = layers.make_conv_norm(train, self.dtype, self.param_dtype, self.bn_momentum,
                                           self.bn_epsilon, self.conv_general_dilated)
        x = jnp.asarray(x, self.dtype)
        for s, (width, num_convs) in enumerate(self.stages):
            x = _VGGStage(width, num_convs, conv, norm, self.batch_norm, name=f"stage{s + 1}")(x)
            x = nn.max_pool(x, (2, 2), (2, 2))
        x = x.reshape((x.shape[0], -1))
        for k in (1, 2):
            x = nn.Dense(4096, dtype=self.dtype, param_dtype=self.param_dtype, name=f"fc{k}")(x)
            x = nn.Dropout(self.dropout_rate, deterministic=not train)(nn.relu(x))
        x = nn.Dense(self.num_classes, dtype=self.dtype, param_dtype=self.param_dtype,
                     name="fc")(x)
        return jnp.asarray(x, jnp.float32)


class _VGGStage(nn.Module):
    features: int
    num_convs: int
    conv: Any
    norm: Any
    batch_norm: bool

    @nn.compact
    def __call__(self, x):
        for k in range(1, self.num_convs + 1):
            x = self.conv(self.features, (3, 3), use_bias=not self.batch_norm, name=f"conv{k}")(x)
            if self.batch_norm:
                x = self.norm(name=f"bn{k}")(x)
            x = nn.relu(layers.Response(name=f"response{k}")(x))
        return x
