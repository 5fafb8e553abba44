"""Image files and arrays -> the (C, H, W) arrays stored in shards, and those -> tensors.

One preprocessing rule, shared by the shard builder and by ``a2b detect`` (shards/README.md):
1. channels: grayscale -> 3 by repetition; RGB -> 1 by ITU-R 601 luminance
   (0.299 R + 0.587 G + 0.114 B); an alpha channel is dropped;
2. geometry: bilinear resize (antialiased when shrinking) so the shorter side is ``size``,
   then a centre crop to ``size`` x ``size``; an image whose shorter side is already ``size``
   is only cropped, so pixels round-trip exactly;
3. values: rounded to the nearest level and kept at the source's bit depth (8 or 16).
Masks follow the same geometry with nearest-neighbour resizing and become 0/1.
"""
from __future__ import annotations

import io
import os
import re
import warnings
from contextlib import contextmanager
from typing import Iterator, Union

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from .manifest import DataError
from .storage import FieldError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff")
# The most pixels an image file may claim in its header (Pillow's own bomb threshold, about 9,500 x
# 9,500): a radiograph or an MRI slice is far smaller; a header claiming more is refused before any
# pixel is decoded (a "decompression bomb" is a few kB that expand to gigabytes).
MAX_PIXELS = Image.MAX_IMAGE_PIXELS
LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float64)

PathLike = Union[str, os.PathLike]


def load_image(path: PathLike, size: int, channels: int) -> np.ndarray:
    """Read a PNG/JPEG/TIFF and apply the resize rule: (C, size, size) uint8, or uint16 for 16-bit."""
    return prepare_image(_read(path), size, channels)


def load_mask(path: PathLike, size: int) -> np.ndarray:
    """Read a ground-truth mask image: (size, size) uint8 in {0, 1} (any non-zero pixel is 1)."""
    array = _read(path)
    if array.ndim == 3:
        array = array.max(axis=2)
    return prepare_mask(array, size)


def prepare_image(array: np.ndarray, size: int, channels: int) -> np.ndarray:
    """(H, W) or (H, W, C) uint8/uint16 -> (channels, size, size) of the same dtype, by the rule above."""
    if channels not in (1, 3):
        raise DataError(f"channels must be 1 or 3, not {channels}")
    if array.dtype not in (np.uint8, np.uint16):
        raise DataError(f"images must be uint8 or uint16, not {array.dtype}")
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    if array.ndim == 3 and array.shape[2] in (2, 4):  # gray+alpha, RGB+alpha: drop alpha
        array = array[:, :, :-1]
    if not (array.ndim == 2 or (array.ndim == 3 and array.shape[2] == 3)):
        raise DataError(f"expected an (H, W) or (H, W, 3) image, found shape {array.shape}")
    dtype = array.dtype
    top = np.iinfo(dtype).max
    h, w = array.shape[:2]
    if min(h, w) == size and (array.ndim == 2) == (channels == 1):
        cropped = _crop(array, size)  # exact: nothing to interpolate or convert
        return (cropped[None] if cropped.ndim == 2 else cropped.transpose(2, 0, 1)).copy()

    planes = np.asarray(array, dtype=np.float64)
    if planes.ndim == 2:
        planes = planes[:, :, None]
    if planes.shape[2] == 3 and channels == 1:
        planes = (planes @ LUMA)[:, :, None]
    elif planes.shape[2] == 1 and channels == 3:
        planes = np.repeat(planes, 3, axis=2)
    out = np.stack([_resize_crop(planes[:, :, c].astype(np.float32), size) for c in range(channels)])
    return np.clip(np.rint(out), 0, top).astype(dtype)


def prepare_mask(array: np.ndarray, size: int) -> np.ndarray:
    """(H, W) mask of any integer dtype -> (size, size) uint8 {0, 1}; nearest-neighbour geometry."""
    binary = (np.asarray(array) > 0).astype(np.uint8) * 255
    h, w = binary.shape
    nh, nw = _scaled_shape(h, w, size)
    if (nh, nw) != (h, w):
        binary = np.asarray(Image.fromarray(binary).resize((nw, nh), Image.NEAREST))
    return (_crop(binary, size) > 0).astype(np.uint8)


def to_tensor(array: np.ndarray) -> torch.Tensor:
    """(C, H, W) uint8/uint16 -> float32 in [-1, 1] (divided by 255 or 65535 from the dtype)."""
    return torch.from_numpy(to_float(array))


def to_float(array: np.ndarray) -> np.ndarray:
    """to_tensor's arithmetic in numpy (single-threaded: loader workers stay off torch's thread pool)."""
    if array.dtype == np.uint8:
        half = np.float32(255 / 2)
    elif array.dtype == np.uint16:
        half = np.float32(65535 / 2)
    else:
        raise DataError(f"to_tensor takes uint8 or uint16 arrays, not {array.dtype}")
    x = array.astype(np.float32)
    x /= half
    x -= np.float32(1)
    return x


def encode_png(array: np.ndarray) -> bytes:
    """(C, H, W) uint8 (C 1 or 3) or uint16 (C 1) -> lossless PNG bytes (16-bit stays 16-bit)."""
    if array.ndim != 3 or array.shape[0] not in (1, 3):
        raise DataError(f"expected a (C, H, W) image with C 1 or 3, found shape {array.shape}")
    if array.dtype == np.uint16 and array.shape[0] == 3:
        raise FieldError("16-bit RGB cannot be stored (Pillow writes no 48-bit PNG); use {channels=1} or 8-bit images")
    if array.dtype not in (np.uint8, np.uint16):
        raise DataError(f"images must be uint8 or uint16, not {array.dtype}")
    plane = array[0] if array.shape[0] == 1 else array.transpose(1, 2, 0)
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(plane)).save(buffer, format="PNG")
    return buffer.getvalue()


@contextmanager
def open_image(source: Union[PathLike, io.BytesIO], name: object = None) -> Iterator[Image.Image]:
    """The one way this package opens an image: Pillow, with the header's size checked against
    MAX_PIXELS before decoding. Every failure is a DataError naming ``name`` (default: the path)."""
    name = source if name is None else name
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)   # checked below, as an error
            with Image.open(source) as image:
                width, height = image.size
                if width * height > MAX_PIXELS:
                    raise DataError(_too_large(name, f"{width} x {height}"))
                yield image
    except DataError:
        raise
    except Image.DecompressionBombError as exc:   # Pillow refuses twice its limit already in open()
        found = re.search(r"\((\d+) pixels\)", str(exc))
        raise DataError(_too_large(name, f"{int(found.group(1)):,}" if found else "too many")) from None
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as exc:
        raise DataError(f"{name}: not a readable image ({exc})") from None


def _too_large(name: object, claimed: str) -> str:
    return (f"{name}: the header claims {claimed} pixels, more than the {MAX_PIXELS:,} allowed (a damaged "
            "file or a decompression bomb); shrink the image before building shards")


def decode_png(data: bytes, name: object = "a PNG in a shard") -> np.ndarray:
    """PNG bytes -> (C, H, W) uint8 or uint16. Raises DataError on bad bytes."""
    with open_image(io.BytesIO(data), name) as image:
        if image.format != "PNG":
            raise DataError(f"{name}: not a PNG but {image.format}")
        array = _to_array(image)
    return array[None] if array.ndim == 2 else array.transpose(2, 0, 1)


def image_bit_depth(path: PathLike) -> int:
    """8 or 16, from the file header only (no pixel decoding)."""
    with open_image(path) as image:
        return 16 if image.mode.startswith("I") else 8


def _read(path: PathLike) -> np.ndarray:
    with open_image(path) as image:
        return _to_array(ImageOps.exif_transpose(image))


def _to_array(image: Image.Image) -> np.ndarray:
    """A PIL image -> (H, W) or (H, W, 3) uint8/uint16."""
    mode = image.mode
    if mode in ("I;16", "I;16L", "I;16B", "I;16N"):
        return np.asarray(image).astype(np.uint16)
    if mode == "I":  # 16-bit TIFF/PNG that Pillow widened to 32-bit
        array = np.asarray(image)
        if array.min() < 0 or array.max() > 65535:
            raise ValueError("32-bit integer pixels outside 0..65535 are not supported")
        return array.astype(np.uint16)
    if mode == "F":
        raise ValueError("floating-point images are not supported; store 8- or 16-bit integers")
    if mode in ("1", "L", "LA") or (mode == "P" and _palette_is_gray(image)):
        return np.asarray(image.convert("L"))
    return np.asarray(image.convert("RGB"))


def _palette_is_gray(image: Image.Image) -> bool:
    rgb = np.asarray(image.convert("RGB"))
    return bool((rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 1] == rgb[..., 2]).all())


def _scaled_shape(h: int, w: int, size: int) -> tuple[int, int]:
    """Shorter side to size, the other side scaled to keep the aspect ratio (never below size)."""
    if h <= w:
        return size, max(size, round(w * size / h))
    return max(size, round(h * size / w)), size


def _resize_crop(plane: np.ndarray, size: int) -> np.ndarray:
    h, w = plane.shape
    nh, nw = _scaled_shape(h, w, size)
    if (nh, nw) != (h, w):
        plane = np.asarray(Image.fromarray(plane).resize((nw, nh), Image.BILINEAR))
    return _crop(plane, size)


def _crop(array: np.ndarray, size: int) -> np.ndarray:
    h, w = array.shape[:2]
    top, left = (h - size) // 2, (w - size) // 2
    return array[top : top + size, left : left + size]
