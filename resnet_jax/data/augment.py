"""The paper's data augmentation as pure functions.

CIFAR (Sec. 4.2), on device inside jit: "4 pixels are padded on each side, and a 32x32 crop is
randomly sampled from the padded image or its horizontal flip". Randomness comes from one key per
global batch, so a batch is the same whichever devices hold its rows (threefry is partitionable).

ImageNet (Sec. 3.4), on the host in numpy: the shorter side resized to a random size in
[256, 480], a random 224x224 crop or its flip, AlexNet's PCA colour augmentation; evaluation by the
centre crop or the standard 10 crops (4 corners + centre, and their flips) of the image resized
to shorter side 256. Every function takes its random draws as arguments or from a numpy
Generator, so tests can pin them.
"""
from typing import Tuple

import chex
import jax
import jax.numpy as jnp
import numpy as np

# ---------------------------------------------------------------------------------------------
# CIFAR, on device


def pad_crop_flip(images: jax.Array, key: jax.Array, pad: int = 4) -> jax.Array:
    """uint8 [B, H, W, C] -> the same shape: zero-pad `pad` pixels, crop at a random offset, flip
    half of the images left-right. As torchvision's RandomCrop(padding=4) + RandomHorizontalFlip,
    the padding is black before mean subtraction."""
    chex.assert_rank(images, 4)
    b, h, w, c = images.shape
    offset_key, flip_key = jax.random.split(key)
    offsets = jax.random.randint(offset_key, (b, 2), 0, 2 * pad + 1)
    flips = jax.random.bernoulli(flip_key, 0.5, (b,))
    return crop_flip(jnp.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0))), offsets, flips,
                     (h, w))


def crop_flip(padded: jax.Array, offsets: jax.Array, flips: jax.Array, size: Tuple[int, int]):
    """Crop `size` at per-image (row, col) `offsets` and mirror where `flips`; the deterministic
    half of `pad_crop_flip`, separate so tests can choose the draws."""
    c = padded.shape[-1]
    crop = jax.vmap(lambda im, o: jax.lax.dynamic_slice(im, (o[0], o[1], 0), size + (c,)))(
        padded, offsets)
    return jnp.where(flips[:, None, None, None], crop[:, :, ::-1], crop)


# ---------------------------------------------------------------------------------------------
# ImageNet, on the host

# AlexNet's PCA of ImageNet RGB pixels scaled to [0, 1] (eigenvalues, eigenvectors as columns),
# as fb.resnet.torch and the paper's ref. [21] use them; the draws have std 0.1.
PCA_EIGVAL = np.array([0.2175, 0.0188, 0.0045], np.float32)
PCA_EIGVEC = np.array([[-0.5675, 0.7192, 0.4009],
                       [-0.5808, -0.0045, -0.8140],
                       [-0.5836, -0.6948, 0.4203]], np.float32)
PCA_STD = 0.1


def resize_shorter_side(image: np.ndarray, size: int) -> np.ndarray:
    """uint8 [H, W, 3] -> shorter side `size`, aspect kept (bilinear, antialiased by PIL)."""
    from PIL import Image
    h, w = image.shape[:2]
    scale = size / min(h, w)
    new = (max(size, round(w * scale)), max(size, round(h * scale)))
    if (new[1], new[0]) == (h, w):
        return image
    return np.asarray(Image.fromarray(image).resize(new, Image.BILINEAR))


def crop(image: np.ndarray, top: int, left: int, size: int) -> np.ndarray:
    if top < 0 or left < 0 or top + size > image.shape[0] or left + size > image.shape[1]:
        raise ValueError(f"crop {size} at ({top}, {left}) leaves image {image.shape[:2]}")
    return image[top:top + size, left:left + size]


def center_crop(image: np.ndarray, size: int) -> np.ndarray:
    h, w = image.shape[:2]
    return crop(image, (h - size) // 2, (w - size) // 2, size)


def ten_crops(image: np.ndarray, size: int) -> np.ndarray:
    """[10, size, size, C]: four corners and the centre, then the same five mirrored."""
    h, w = image.shape[:2]
    corners = [(0, 0), (0, w - size), (h - size, 0), (h - size, w - size)]
    five = [crop(image, t, l, size) for t, l in corners] + [center_crop(image, size)]
    return np.stack(five + [c[:, ::-1] for c in five])


def pca_lighting(image: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """AlexNet's colour augmentation: add eigvec @ (alpha * eigval) to every pixel. `image` is
    float in [0, 1]; `alpha` [3] are the N(0, 0.1) draws."""
    return image + PCA_EIGVEC @ (np.asarray(alpha, np.float32) * PCA_EIGVAL)


def imagenet_train(image: np.ndarray, rng: np.random.Generator, *, size: int = 224,
                   scale: Tuple[int, int] = (256, 480), pca_std: float = PCA_STD) -> np.ndarray:
    """One training image: scale augmentation, random crop, flip, PCA colour; uint8 out (the
    colour shift is a few grey levels, so rounding loses little and the host->device copy stays
    a quarter of float32's)."""
    image = resize_shorter_side(image, int(rng.integers(scale[0], scale[1] + 1)))
    h, w = image.shape[:2]
    image = crop(image, int(rng.integers(0, h - size + 1)), int(rng.integers(0, w - size + 1)), size)
    if rng.random() < 0.5:
        image = image[:, ::-1]
    if pca_std:
        shifted = pca_lighting(image.astype(np.float32) / 255.0, rng.normal(0.0, pca_std, 3))
        image = np.clip(np.rint(shifted * 255.0), 0, 255)
    return np.ascontiguousarray(image, np.uint8)


def imagenet_eval(image: np.ndarray, *, size: int = 224, resize: int = 256,
                  ten_crop: bool = False) -> np.ndarray:
    """Centre crop [size, size, 3], or the 10 crops [10, size, size, 3], of shorter side `resize`."""
    image = resize_shorter_side(image, resize)
    return ten_crops(image, size) if ten_crop else np.ascontiguousarray(center_crop(image, size))
