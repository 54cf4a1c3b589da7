"""Decoding: encoded images (JPEG, PNG, ... bytes, as tfds and image folders store them).

JPEGs go through simplejpeg (libjpeg-turbo without PIL's per-image machinery: about 1.5x PIL's
decode rate here, same accurate DCT); anything else, and the JPEGs libjpeg-turbo cannot turn
into RGB (CMYK), through PIL. Resizing is PIL's (bilinear, antialiased).

`crop_resize` is the decode-and-crop of the training input: it resizes only a window of the
image, and lets libjpeg-turbo scale the decode itself (DCT scaling by 1/2, 1/4, 1/8) when the
window shrinks at least that much, so a large photograph is never decoded at full size to make a
224 crop.
"""
import io
import math
from typing import Tuple, Union

import numpy as np

from resnet_jax.errors import UserError

Encoded = Union[bytes, np.ndarray]  # an encoded file, or pixels already decoded (uint8 HWC)
Box = Tuple[float, float, float, float]  # (left, top, right, bottom) in pixels, fractions allowed
_JPEG = b"\xff\xd8"


def _is_jpeg(encoded: Encoded) -> bool:
    return isinstance(encoded, bytes) and encoded[:2] == _JPEG


def _pil(encoded: Encoded, name: str):
    """A PIL image, not yet decoded (its size read from the header)."""
    from PIL import Image, UnidentifiedImageError
    if isinstance(encoded, np.ndarray) and encoded.dtype == np.uint8 and encoded.ndim == 3:
        return Image.fromarray(encoded)
    try:
        return Image.open(io.BytesIO(bytes(encoded)))
    except (UnidentifiedImageError, OSError, TypeError) as e:
        raise UserError(f"cannot decode {name} ({e.__class__.__name__}); remove or replace it, or "
                        "prepare the data set again") from None


def _simplejpeg(encoded: bytes, min_height: int = 0, min_width: int = 0):
    """uint8 [H, W, 3] by libjpeg-turbo, at the smallest scale at least min_height x min_width;
    None where it cannot (CMYK, a damaged file: PIL then decodes or names the problem)."""
    import simplejpeg
    try:
        return simplejpeg.decode_jpeg(encoded, colorspace="RGB", min_height=min_height,
                                      min_width=min_width)
    except ValueError:
        return None


def size(encoded: Encoded, name: str = "image") -> Tuple[int, int]:
    """(height, width) from the header alone."""
    if _is_jpeg(encoded):
        try:
            import simplejpeg
            return tuple(simplejpeg.decode_jpeg_header(encoded)[:2])
        except ValueError:
            pass
    with _pil(encoded, name) as im:
        return im.height, im.width


def decode(encoded: Encoded, name: str = "image") -> np.ndarray:
    """The whole image, uint8 [H, W, 3] (grey and CMYK converted to RGB)."""
    if _is_jpeg(encoded):
        image = _simplejpeg(encoded)
        if image is not None:
            return image
    if isinstance(encoded, np.ndarray) and encoded.ndim == 3 and encoded.shape[2] == 3:
        return np.asarray(encoded, np.uint8)
    with _pil(encoded, name) as im:
        return np.asarray(im.convert("RGB"), np.uint8)


def crop_resize(encoded: Encoded, box: Box, out: int, name: str = "image") -> np.ndarray:
    """uint8 [out, out, 3]: the window `box` of the image resized to out x out, bilinear and
    antialiased, as PIL resizes the whole image and then crops (up to its 8-bit rounding)."""
    height, width = size(encoded, name)
    # the coarsest DCT scale (1, 1/2, 1/4, 1/8) still at least as fine as the output
    shrink = min((box[2] - box[0]) / out, (box[3] - box[1]) / out)
    reduce = 2 ** min(3, max(0, int(math.floor(math.log2(max(shrink, 1.0))))))
    image = _simplejpeg(encoded, -(-height // reduce), -(-width // reduce)) \
        if _is_jpeg(encoded) else None
    if image is None:
        image = decode(encoded, name)
    sy, sx = image.shape[0] / height, image.shape[1] / width
    return _resize_window(image, (box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy), out)


def _resize_window(image: np.ndarray, box: Box, out: int) -> np.ndarray:
    """PIL's resize of `box` of `image`, handed only the window and the pixels its filter reaches
    around it (bilinear: one output pixel's worth of input pixels each side)."""
    from PIL import Image
    h, w = image.shape[:2]
    margin = math.ceil(max(box[2] - box[0], box[3] - box[1]) / out) + 1
    top, left = max(0, int(box[1]) - margin), max(0, int(box[0]) - margin)
    bottom, right = min(h, math.ceil(box[3]) + margin), min(w, math.ceil(box[2]) + margin)
    window = Image.fromarray(np.ascontiguousarray(image[top:bottom, left:right]))
    shifted = (box[0] - left, box[1] - top, box[2] - left, box[3] - top)
    return np.asarray(window.resize((out, out), Image.BILINEAR, box=shifted), np.uint8)
