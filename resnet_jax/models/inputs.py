"""What a network expects of its input, as data: the image size and the normalisation
x = (pixels / 255 - mean) / std that turns uint8 RGB images into what it computes on.

The zoo's defaults (`registry.preprocessing(name)`) are the paper's recipes: CIFAR-10's and
ImageNet's mean subtracted (Sec. 4.2, 3.4), at 32x32 and 224x224. A trained net's own values (its
training set's per-pixel mean image) travel in its checkpoint and come back from `resnet_jax.load`.
"""
import dataclasses
from typing import Any, Optional

import jax.numpy as jnp
import numpy as np

# Channel means of the training sets, as pixels / 255.
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
IMAGENET_MEAN = (0.485, 0.456, 0.406)


@dataclasses.dataclass(frozen=True)
class Preprocessing:
    """`mean` and `std` per channel (shape [3]) or per pixel ([H, W, 3], the paper's per-pixel
    mean subtraction); `input_size` the side of the square images the net expects (None: any).
    Calling it normalises uint8 images [N, H, W, 3]."""

    mean: Any
    std: Any = 1.0
    input_size: Optional[int] = None

    def to_json(self):
        return dict(mean=np.asarray(self.mean).tolist(), std=np.asarray(self.std).tolist())

    @classmethod
    def from_json(cls, d, input_size: Optional[int] = None):
        return cls(np.asarray(d["mean"], np.float32), np.asarray(d["std"], np.float32),
                   input_size)

    def __call__(self, images_uint8):
        x = jnp.asarray(images_uint8, jnp.float32) / 255.0
        return (x - jnp.asarray(self.mean, jnp.float32)) / jnp.asarray(self.std, jnp.float32)
