"""Read one grayscale TIFF or PNG at its true bit depth, refusing anything xfeat cannot trust.

Never a silent 16-to-8-bit conversion (the trap of PIL and torchvision's readers): 8-bit images come back
as ``uint8``, 16-bit ones as ``uint16``. The format is told by the file's first bytes, not its name.
A colour image whose colour channels are all equal is gray stored as colour and is read as gray (no loss);
a true colour image is refused, since an electrode X-ray is grayscale and colour means a wrong file.
An alpha channel is dropped.
"""

from __future__ import annotations

import hashlib
import io
import os
from dataclasses import dataclass
from pathlib import Path

import imagecodecs
import numpy as np
import tifffile

from xfeat.errors import DataError

TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
SUPPORTED_DTYPES = (np.uint8, np.uint16)


@dataclass(frozen=True)
class LoadedImage:
    """A decoded image with the SHA-256 of its file (the identity caches and leak checks use)."""

    pixels: np.ndarray
    sha256: str


def load_image(path: str | os.PathLike[str]) -> LoadedImage:
    """Read a file once, hash its bytes and decode it; raises ``DataError`` naming the file."""
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise DataError(path, f"cannot read file ({e.strerror or e})") from None
    return LoadedImage(decode_image(data, path), hashlib.sha256(data).hexdigest())


def read_image(path: str | os.PathLike[str]) -> np.ndarray:
    """The pixels of a grayscale TIFF or PNG as a 2-D ``uint8`` or ``uint16`` array."""
    return load_image(path).pixels


def decode_image(data: bytes, path: str | os.PathLike[str]) -> np.ndarray:
    """Decode TIFF or PNG bytes to a validated 2-D ``uint8``/``uint16`` array; ``path`` names errors."""
    if data.startswith(TIFF_MAGIC):
        pixels = _decode_tiff(data, path)
    elif data.startswith(PNG_MAGIC):
        pixels = _decode_png(data, path)
    elif not data:
        raise DataError(path, "empty file")
    else:
        raise DataError(path, "not a TIFF or PNG image")
    return _as_gray(pixels, path)


def _decode_tiff(data: bytes, path: str | os.PathLike[str]) -> np.ndarray:
    try:
        with tifffile.TiffFile(io.BytesIO(data)) as tif:
            if len(tif.pages) > 1:
                raise DataError(path, f"multi-page TIFF ({len(tif.pages)} pages); xfeat reads one image per file")
            return tif.pages[0].asarray()
    except DataError:
        raise
    except Exception as e:  # tifffile raises many types for damaged files
        raise DataError(path, f"unreadable or truncated TIFF ({_short(e)})") from None


def _decode_png(data: bytes, path: str | os.PathLike[str]) -> np.ndarray:
    try:
        return imagecodecs.png_decode(data)
    except Exception as e:  # imagecodecs.PngError, or a codec error for damaged streams
        raise DataError(path, f"unreadable or truncated PNG ({_short(e)})") from None


def _as_gray(pixels: np.ndarray, path: str | os.PathLike[str]) -> np.ndarray:
    if pixels.size == 0:
        raise DataError(path, "empty image (no pixels)")
    if pixels.dtype not in SUPPORTED_DTYPES:
        raise DataError(path, f"unsupported pixel type {pixels.dtype} ({pixels.dtype.itemsize * 8}-bit); "
                              "xfeat reads 8-bit and 16-bit unsigned grayscale")
    if pixels.ndim == 3 and pixels.shape[2] in (2, 4):
        pixels = pixels[:, :, :-1]  # drop alpha
    if pixels.ndim == 3 and pixels.shape[2] == 1:
        pixels = pixels[:, :, 0]
    if pixels.ndim == 3 and pixels.shape[2] == 3:
        if not (np.array_equal(pixels[:, :, 0], pixels[:, :, 1]) and np.array_equal(pixels[:, :, 0], pixels[:, :, 2])):
            raise DataError(path, f"colour image ({pixels.shape[0]} x {pixels.shape[1]} x 3); "
                                  "xfeat expects grayscale X-rays")
        pixels = pixels[:, :, 0]
    if pixels.ndim != 2:
        raise DataError(path, f"unsupported image shape {pixels.shape}; expected a 2-D grayscale image")
    return np.ascontiguousarray(pixels)


def _short(error: Exception) -> str:
    text = str(error).strip().splitlines()
    return text[0][:160] if text and text[0] else type(error).__name__
