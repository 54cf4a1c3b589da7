"""Decoding: encoded images (JPEG, PNG, ... bytes, as tfds and image folders store them) with PIL,
whose libjpeg-turbo decodes and resizes outside the GIL.

`crop_resize` is the decode-and-crop of the training input: it resizes only a window of the
image, and lets libjpeg scale the decode itself (DCT scaling by 1/2, 1/4, 1/8) when the window
shrinks at least that much, so a large photograph is never decoded at full size to make a 224 crop.
"""
import io
import math
from typing import Tuple, Union

import numpy as np

from resnet_jax.errors import UserError

Encoded = Union[bytes, np.ndarray]  # an encoded file, or pixels already decoded (uint8 HWC)


def open_image(encoded: Encoded, name: str = "image"):
    """A PIL image, not yet decoded (its size is read from the header); use it as a context."""
    from PIL import Image, UnidentifiedImageError
    if isinstance(encoded, np.ndarray) and encoded.dtype == np.uint8 and encoded.ndim == 3:
        return Image.fromarray(encoded)
    try:
        return Image.open(io.BytesIO(bytes(encoded)))
    except (UnidentifiedImageError, OSError, TypeError) as e:
        raise UserError(f"cannot decode {name} ({e.__class__.__name__}); remove or replace it, or "
                        "prepare the data set again") from None


def decode(encoded: Encoded, name: str = "image") -> np.ndarray:
    """The whole image, uint8 [H, W, 3] (grey and CMYK converted to RGB)."""
    with open_image(encoded, name) as im:
        return np.asarray(im.convert("RGB"), np.uint8)


def crop_resize(im, box: Tuple[float, float, float, float], size: int) -> np.ndarray:
    """uint8 [size, size, 3]: the window `box` = (left, top, right, bottom) of `im` (in its
    pixels, fractions allowed) resized to size x size, bilinear and antialiased as PIL resizes."""
    from PIL import Image
    width, height = im.size
    # the smallest decode still at least as fine as the output (a no-op for non-JPEGs)
    im.draft("RGB", (math.ceil(width * size / (box[2] - box[0])),
                     math.ceil(height * size / (box[3] - box[1]))))
    sx, sy = im.size[0] / width, im.size[1] / height
    scaled = (box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy)
    out = im.convert("RGB").resize((size, size), Image.BILINEAR, box=scaled)
    return np.asarray(out, np.uint8)
