"""The paper's data augmentation as pure functions.

CIFAR (Sec. 4.2), on device inside jit: "4 pixels are padded on each side, and a 32x32 crop is
randomly sampled from the padded image or its horizontal flip". Randomness comes from one key per
global batch, so a batch is the same whichever devices hold its rows (threefry is partitionable).

ImageNet (Sec. 3.4): the shorter side resized to a random size in [256, 480] and a random 224x224
crop, on the host, as one resize of the crop's window of the original image (imagenet_train_crop);
the flip and AlexNet's PCA colour augmentation on the device (flip_lighting), so uint8 crops cross
to the device; evaluation by the centre crop or the standard 10 crops (4 corners + centre, and
their flips) of the image resized to shorter side 256, on the host. Every function takes its
random draws as arguments, a numpy Generator or a key, so tests can pin them.
"""
from typing import Tuple

import chex
import jax
import jax.numpy as jnp
import numpy as np

from resnet_jax.data import jpeg

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
# ImageNet

# AlexNet's PCA of ImageNet RGB pixels scaled to [0, 1] (eigenvalues, eigenvectors as columns),
# as fb.resnet.torch and the paper's ref. [21] use them; the draws have std 0.1.
PCA_EIGVAL = np.array([0.2175, 0.0188, 0.0045], np.float32)
PCA_EIGVEC = np.array([[-0.5675, 0.7192, 0.4009],
                       [-0.5808, -0.0045, -0.8140],
                       [-0.5836, -0.6948, 0.4203]], np.float32)
PCA_STD = 0.1


def flip_lighting(images: jax.Array, key: jax.Array, pca_std: float = PCA_STD) -> jax.Array:
    """The device's half of ImageNet training images: uint8 [B, H, W, 3] -> the same, half of
    them mirrored left-right, each shifted by AlexNet's PCA colour augmentation with N(0, pca_std)
    draws and rounded back to uint8 (a few grey levels, so rounding loses little and the step's
    normalisation stays the one every pipeline uses). One key per global batch, as CIFAR's."""
    chex.assert_rank(images, 4)
    b = images.shape[0]
    flip_key, alpha_key = jax.random.split(key)
    flips = jax.random.bernoulli(flip_key, 0.5, (b,))
    x = jnp.where(flips[:, None, None, None], images[:, :, ::-1], images)
    if not pca_std:
        return x
    alpha = pca_std * jax.random.normal(alpha_key, (b, 3), jnp.float32)
    shift = 255.0 * (alpha * PCA_EIGVAL) @ PCA_EIGVEC.T  # [B, 3]: pca_lighting's, per image
    return jnp.clip(jnp.round(x.astype(jnp.float32) + shift[:, None, None, :]), 0, 255).astype(jnp.uint8)


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


def scale_crop_box(height: int, width: int, rng: np.random.Generator, *, size: int = 224,
                   scale: Tuple[int, int] = (256, 480)) -> Tuple[float, float, float, float]:
    """The scale augmentation's crop as a window of the original image: (left, top, right, bottom)
    in its pixels. Draws, from `rng`, the shorter side S in [scale[0], scale[1]], then the crop's
    row and column in the image resized to shorter side S (resize_shorter_side's sizes), and maps
    that size x size crop back through the resize; resizing the window to size x size is the
    same sampling without ever resizing the rest of the image."""
    s = int(rng.integers(scale[0], scale[1] + 1))
    factor = s / min(height, width)
    new_h, new_w = max(s, round(height * factor)), max(s, round(width * factor))
    top, left = int(rng.integers(0, new_h - size + 1)), int(rng.integers(0, new_w - size + 1))
    fy, fx = height / new_h, width / new_w
    return (left * fx, top * fy, (left + size) * fx, (top + size) * fy)


def imagenet_train_crop(encoded, rng: np.random.Generator, *, size: int = 224,
                        scale: Tuple[int, int] = (256, 480), name: str = "image") -> np.ndarray:
    """The host's half of a training image: the scale augmentation's random size x size crop,
    uint8 [size, size, 3], from an encoded image (JPEG/PNG bytes) or a uint8 array; only the
    crop's window is resized, and a JPEG is decoded at 1/2, 1/4 or 1/8 scale where the window
    shrinks at least that much. The flip and the colour shift follow on the device
    (`flip_lighting`). `name` says which image in an error."""
    height, width = jpeg.size(encoded, name)
    return jpeg.crop_resize(encoded, scale_crop_box(height, width, rng, size=size, scale=scale),
                            size, name)


def imagenet_eval(image: np.ndarray, *, size: int = 224, resize: int = 256,
                  ten_crop: bool = False) -> np.ndarray:
    """Centre crop [size, size, 3], or the 10 crops [10, size, size, 3], of shorter side `resize`."""
    image = resize_shorter_side(image, resize)
    return ten_crops(image, size) if ten_crop else np.ascontiguousarray(center_crop(image, size))
