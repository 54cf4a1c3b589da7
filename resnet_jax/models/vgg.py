"""VGG-19 as drawn in the paper's Fig. 3 (left): 16 3x3 conv layers in five stages with max-pool
between them, then two 4096-wide dense layers and the classifier."""
from typing import Any, Sequence

import flax.linen as nn

from resnet_jax.models import layers

VGG19_STAGES = ((64, 2), (128, 2), (256, 4), (512, 4), (512, 4))


class VGG(layers.Network):
    """VGG (Simonyan & Zisserman): conv with bias and no BN, as the paper compares against;
    `batch_norm=True` puts BN after every conv (then the convs lose their bias)."""

    stages: Sequence[Sequence[int]] = VGG19_STAGES
    num_classes: int = 1000
    batch_norm: bool = False
    dropout_rate: float = 0.5

    def has_batch_norm(self) -> bool:
        return self.batch_norm

    @nn.compact
    def __call__(self, x, train: bool = False, features: bool = False):
        x, conv, norm = self.begin(x, train)
        needs_key = train and self.dropout_rate and not self.is_initializing()
        if needs_key and not self.has_rng("dropout"):
            raise layers.ModelUsageError("VGG trains with dropout: pass rngs={'dropout': key} "
                                         "with train=True")
        stages = {}
        for s, (width, num_convs) in enumerate(self.stages):
            x = _VGGStage(width, num_convs, conv, norm, self.batch_norm, name=f"stage{s + 1}")(x)
            x = stages[f"stage{s + 1}"] = nn.max_pool(x, (2, 2), (2, 2))
        x = x.reshape((x.shape[0], -1))
        for k in (1, 2):
            x = nn.relu(self.dense(4096, f"fc{k}")(x))
            x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
        return self.outputs(x, stages, features)


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
