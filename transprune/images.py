"""One image from whatever a user has at hand: a path, bytes, a PIL image, an array or a tensor."""

from __future__ import annotations

import io
import os

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError


class ImageInputError(ValueError):
    """An image argument that cannot be used; the message says what to pass instead."""


ACCEPTED = ("a file path, the file's bytes, a PIL image, an HxWx3 (or HxW) uint8 array, or a "
            "3xHxW tensor")


def as_image(image) -> Image.Image | None:
    """An RGB PIL image from `image` (None stays None).

    Paths and bytes are decoded (EXIF rotation applied); numpy arrays are HxW or HxWxC (C = 1, 3, 4),
    torch tensors CxHxW (the torchvision convention); floats are read as 0..1, integers as 0..255.
    """
    if image is None:
        return None
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    if isinstance(image, (str, os.PathLike)):
        path = os.fspath(image)
        if not os.path.isfile(path):
            raise ImageInputError(f"Image file {path!r} does not exist; pass {ACCEPTED}.")
        return _decode(path, f"The file {path!r}")
    if isinstance(image, (bytes, bytearray, memoryview)):
        return _decode(io.BytesIO(bytes(image)), "The bytes passed as image")
    if isinstance(image, torch.Tensor):
        tensor = image.detach().cpu()
        if tensor.ndim != 3 or tensor.shape[0] not in (1, 3, 4):
            raise ImageInputError(f"An image tensor must be CxHxW with 1, 3 or 4 channels, got shape "
                                  f"{tuple(tensor.shape)}.")
        return _from_array(tensor.permute(1, 2, 0).numpy())
    if isinstance(image, np.ndarray):
        return _from_array(image)
    raise ImageInputError(f"Cannot use a {type(image).__name__} as an image; pass {ACCEPTED}.")


def _decode(source, what: str) -> Image.Image:
    try:
        with Image.open(source) as opened:
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
    elif np.issubdtype(array.dtype, np.integer):
        array = np.clip(array, 0, 255)
    else:
        raise ImageInputError(f"An image array must hold numbers, got dtype {array.dtype}.")
    return Image.fromarray(np.ascontiguousarray(array).astype(np.uint8)).convert("RGB")
