"""One image from whatever a user has at hand: a path, bytes, a PIL image, an array or a tensor."""

from __future__ import annotations

import io
import os
import warnings

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError


class ImageInputError(ValueError):
    """An image argument that cannot be used; the message says what to pass instead."""


ACCEPTED = ("a file path, the file's bytes, a PIL image, an HxWx3 (or HxW) uint8 array, or a "
            "3xHxW tensor")

# Largest image a path or bytes may decode to, read from the header before decoding (the app's
# upload limit too). PIL only warns up to twice its own MAX_IMAGE_PIXELS (89 MP): a small PNG can
# declare a picture that takes gigabytes to decode.
MAX_PIXELS = 40_000_000


def as_image(image, max_pixels: int | None = MAX_PIXELS) -> Image.Image | None:
    """An RGB PIL image from `image` (None stays None).

    Paths and bytes are decoded (EXIF rotation applied), unless their header declares more than
    `max_pixels` pixels (None: no limit of ours, PIL's decompression-bomb error still applies).
    numpy arrays are HxW or HxWxC (C = 1, 3, 4), torch tensors CxHxW (the torchvision convention).
    Floats are read as 0..1 (values outside are clipped); unsigned integers as their dtype's full
    range scaled to 8 bits (uint8 as is, uint16 / 257, ...); signed integers and bools as 0..255
    (a signed array with values outside 0..255 is refused, never clipped).
    """
    if image is None:
        return None
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    if isinstance(image, (str, os.PathLike)):
        path = os.fspath(image)
        if os.path.isdir(path):
            raise ImageInputError(f"{path!r} is a directory, not an image file; pass the path of one image file.")
        if not os.path.isfile(path):
            raise ImageInputError(f"Image file {path!r} does not exist; pass {ACCEPTED}.")
        return _decode(path, f"The file {path!r}", max_pixels)
    if isinstance(image, (bytes, bytearray, memoryview)):
        return _decode(io.BytesIO(bytes(image)), "The bytes passed as image", max_pixels)
    if isinstance(image, torch.Tensor):
        tensor = image.detach().cpu()
        if tensor.ndim != 3 or tensor.shape[0] not in (1, 3, 4):
            raise ImageInputError(f"An image tensor must be CxHxW with 1, 3 or 4 channels, got shape "
                                  f"{tuple(tensor.shape)}.")
        return _from_array(tensor.permute(1, 2, 0).numpy())
    if isinstance(image, np.ndarray):
        return _from_array(image)
    raise ImageInputError(f"Cannot use a {type(image).__name__} as an image; pass {ACCEPTED}.")


def _decode(source, what: str, max_pixels: int | None) -> Image.Image:
    try:
        with warnings.catch_warnings():
            if max_pixels is not None:   # our own limit below says it as an error; PIL's warning goes to stderr
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            opened = Image.open(source)
    except Image.DecompressionBombError as error:   # PIL's own limit, twice Image.MAX_IMAGE_PIXELS
        raise ImageInputError(f"{what} is too large to decode safely ({error}); pass a smaller image.") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as error:
        raise ImageInputError(f"{what} could not be decoded as an image ({type(error).__name__}); pass a PNG, "
                              "JPEG, WebP, GIF or BMP image.") from error
    width, height = opened.size
    if max_pixels is not None and width * height > max_pixels:
        opened.close()
        raise ImageInputError(f"{what} is a {width}x{height} image ({_megapixels(width * height)} megapixels), "
                              f"more than the limit of {_megapixels(max_pixels)} megapixels; pass a smaller image "
                              "(or a larger max_pixels).")
    try:
        with opened:
            picture = ImageOps.exif_transpose(opened)
            picture.load()
            return picture.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as error:
        raise ImageInputError(f"{what} could not be decoded as an image ({type(error).__name__}); pass a PNG, "
                              "JPEG, WebP, GIF or BMP image.") from error


def _from_array(array: np.ndarray) -> Image.Image:
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] not in (3, 4)):
        raise ImageInputError(f"An image array must be HxW or HxWxC with C = 1, 3 or 4, got shape {array.shape}.")
    if min(array.shape[:2]) < 1:
        raise ImageInputError(f"The image array is empty (shape {array.shape}).")
    if np.issubdtype(array.dtype, np.floating):
        if not np.isfinite(array).all():
            raise ImageInputError("The image array holds NaN or infinite values.")
        array = np.clip(array * 255.0 + 0.5, 0, 255)
    elif array.dtype == np.bool_:
        array = array * 255
    elif np.issubdtype(array.dtype, np.unsignedinteger):
        # The dtype's full range to 0..255 (uint16: / 257), rounded; uint8 unchanged.
        top = np.iinfo(array.dtype).max
        if top > 255:
            array = (array.astype(np.float64) * (255.0 / top) + 0.5).astype(np.uint8)
    elif np.issubdtype(array.dtype, np.integer):
        # Signed integers carry no depth of their own (np.array of Python ints is int64): 0..255.
        low, high = int(array.min()), int(array.max())
        if low < 0 or high > 255:
            raise ImageInputError(f"The {array.dtype} image array holds values from {low} to {high}, outside 0..255; "
                                  "pass uint8 values 0..255, a uint16 array for 16-bit images, or floats in 0..1.")
    else:
        raise ImageInputError(f"An image array must hold numbers, got dtype {array.dtype}.")
    return Image.fromarray(np.ascontiguousarray(array).astype(np.uint8)).convert("RGB")


def _megapixels(pixels: int) -> str:
    return f"{pixels / 1e6:.0f}" if pixels >= 10e6 else f"{pixels / 1e6:.1f}"
