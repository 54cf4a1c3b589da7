"""Decoding: encoded images (JPEG, PNG, ... bytes, as tfds and image folders store them).

JPEGs go through simplejpeg (libjpeg-turbo without PIL's per-image machinery: about 1.5x PIL's
decode rate here, same accurate DCT); anything else, and the JPEGs libjpeg-turbo cannot turn
into RGB (CMYK), through PIL. Resizing is PIL's (bilinear, antialiased).

`crop_resize` is the decode-and-crop of the training input: a window of the image resized once,
with the decode itself scaled by libjpeg-turbo (DCT scaling by 1/2, 1/4, 1/8) where the window
shrinks at least that much. For JPEGs it runs `jpeg_crop.c`, which decodes only the rows and
columns the resize reads (as tf.data's decode_and_crop_jpeg) and resizes in PIL's arithmetic,
so its pixels are those of the whole decoded image; it resizes with PIL's filter in PIL's integer
arithmetic, horizontal pass first (recent Pillows may run the vertical pass first, which moves a
value by one grey level here and there). The library is built on first use (resnet_jax/native.py:
a C compiler and libjpeg's headers, `apt-get install gcc libjpeg-dev`); without them the whole
image is decoded (slower; said once in the log).
"""
import ctypes
import functools
import io
import logging
import math
from pathlib import Path
from typing import Optional, Tuple, Union

import numpy as np

from resnet_jax import native
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


def _simplejpeg(encoded: bytes, min_height: int = 0, min_width: int = 0, name: str = "image"):
    """uint8 [H, W, 3] by libjpeg-turbo, at the smallest scale at least min_height x min_width;
    None where it cannot (CMYK, a damaged file: PIL then decodes or names the problem). A file
    that decodes only by skipping damaged data is decoded so, with a warning naming it."""
    import simplejpeg
    try:
        return simplejpeg.decode_jpeg(encoded, colorspace="RGB", min_height=min_height,
                                      min_width=min_width)
    except ValueError as e:
        damage = str(e)
    try:
        image = simplejpeg.decode_jpeg(encoded, colorspace="RGB", min_height=min_height,
                                       min_width=min_width, strict=False)
    except ValueError:
        return None
    warn_damaged(name, damage)
    return image


def damage(encoded: Encoded) -> Optional[str]:
    """libjpeg's complaint about a JPEG whose data it must skip or guess (bytes overwritten,
    a truncated scan), or None: PIL decodes such a file without a word."""
    if not _is_jpeg(encoded):
        return None
    import simplejpeg
    try:
        simplejpeg.decode_jpeg(encoded, colorspace="RGB", min_factor=8)
        return None
    except ValueError as e:
        return str(e)


def warn_damaged(name: str, complaint: str) -> None:
    logging.warning("%s is damaged (libjpeg: %s); its pixels are partly guessed: replace it",
                    name, complaint)


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
        image = _simplejpeg(encoded, name=name)
        if image is not None:
            return image
    if isinstance(encoded, np.ndarray) and encoded.ndim == 3 and encoded.shape[2] == 3:
        return np.asarray(encoded, np.uint8)
    with _pil(encoded, name) as im:
        return np.asarray(im.convert("RGB"), np.uint8)


def crop_resize(encoded: Encoded, box: Box, out: int, name: str = "image") -> np.ndarray:
    """uint8 [out, out, 3]: the window `box` of the image resized to out x out, as
    `Image.resize((out, out), BILINEAR, box=box)` of the whole decoded image (up to a grey level:
    the module's docstring says why)."""
    height, width = size(encoded, name)
    # the coarsest DCT scale (1, 1/2, 1/4, 1/8) still at least as fine as the output
    shrink = min((box[2] - box[0]) / out, (box[3] - box[1]) / out)
    reduce = 2 ** min(3, max(0, int(math.floor(math.log2(max(shrink, 1.0))))))
    if _is_jpeg(encoded):
        window = _decode_window(encoded, reduce, box, out)
        if window is not None:
            return window
    image = _simplejpeg(encoded, -(-height // reduce), -(-width // reduce), name) \
        if _is_jpeg(encoded) else None
    if image is None:
        image = decode(encoded, name)
    sy, sx = image.shape[0] / height, image.shape[1] / width
    from PIL import Image
    return np.asarray(Image.fromarray(image).resize(
        (out, out), Image.BILINEAR, box=(box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy)),
        np.uint8)


_CROP_SOURCE = Path(__file__).with_name("jpeg_crop.c")
_CFLAGS = ("-O3", "-march=native", "-ffp-contract=off", "-shared", "-fPIC", "-w")
_HEADERS_MISSING = "libjpeg's headers not found (apt-get install libjpeg-dev, or set CPATH)"


@functools.lru_cache(maxsize=None)
def _crop_library():
    """(the built jpeg_crop.c, None), or (None, why it cannot be built here)."""
    if not native.has_header("jpeglib.h"):
        return None, _HEADERS_MISSING
    compiler = native.compiler("CC", "cc")
    if compiler is None:
        return None, "no C compiler (install gcc or set CC)"
    command = (compiler, *_CFLAGS)
    try:
        path = native.build(native.library_path("jpeg_crop", _CROP_SOURCE, command),
                            _CROP_SOURCE, command, ["-ljpeg"])
        library = ctypes.CDLL(str(path))  # ctypes releases the GIL during the call
    except OSError as e:
        return None, str(e)
    function = library.resnet_jax_jpeg_crop_resize
    function.argtypes = [ctypes.c_char_p, ctypes.c_ulong, ctypes.c_int] + [ctypes.c_double] * 4 \
        + [ctypes.c_int, ctypes.c_void_p, ctypes.c_char_p, ctypes.c_int]
    function.restype = ctypes.c_int
    return function, None


def window_decoding() -> Optional[str]:
    """None where JPEG windows are decoded alone (jpeg_crop.c built), else why not."""
    return _crop_library()[1]


@functools.lru_cache(maxsize=None)
def _log_once(why_not: str) -> None:
    logging.warning("JPEG crops decode whole images (slower, same pixels): %s", why_not)


def _decode_window(encoded: bytes, reduce: int, box: Box, out: int) -> Optional[np.ndarray]:
    function, why_not = _crop_library()
    if function is None:
        _log_once(why_not)
        return None
    image = np.empty((out, out, 3), np.uint8)
    error = ctypes.create_string_buffer(200)
    if function(encoded, len(encoded), reduce, *map(float, box), out, image.ctypes.data, error,
                len(error)):
        return None  # CMYK, a damaged file: the whole-image path decodes it or names the problem
    return image
