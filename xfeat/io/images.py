"""Read one grayscale TIFF or PNG at its true bit depth, refusing anything xfeat cannot trust.

Never a silent 16-to-8-bit conversion (the trap of PIL and torchvision's readers): 8-bit images come back
as ``uint8``, 16-bit ones as ``uint16``. The format is told by the file's first bytes, not its name.
A colour image whose colour channels are all equal is gray stored as colour and is read as gray (no loss);
a true colour image is refused, since an electrode X-ray is grayscale and colour means a wrong file.
An alpha channel is dropped.

A file's header is read before its pixels: an image declaring more than ``max_pixels`` pixels is refused
before anything is allocated, since a few megabytes of compressed TIFF can declare gigabytes of pixels.
"""

from __future__ import annotations

import hashlib
import io
import os
import struct
from dataclasses import dataclass
from typing import BinaryIO

import imagecodecs
import numpy as np
import tifffile

from xfeat.errors import DataError

TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
PNG_HEADER_BYTES = 33  # signature (8) + the IHDR chunk (length 4, type 4, data 13, CRC 4)
SUPPORTED_DTYPES = (np.uint8, np.uint16)
# The largest real X-rays are about 2.4 megapixels (2070 x 1145); 100 MP leaves a wide margin for other
# detectors while refusing what would need gigabytes (100 MP of uint16 is 200 MB, its conversions a few times that).
MAX_PIXELS = 100_000_000


@dataclass(frozen=True)
class LoadedImage:
    """A decoded image with the SHA-256 of its file (the identity caches and leak checks use)."""

    pixels: np.ndarray
    sha256: str


@dataclass(frozen=True)
class ImageHeader:
    """What a file's header declares, known without decoding a pixel."""

    height: int
    width: int
    bit_depth: int  # of the decoded gray pixels: 8 or 16; 0 for colour-typed files (gray or colour: decoding tells)


def load_image(path: str | os.PathLike[str], *, max_pixels: int = MAX_PIXELS) -> LoadedImage:
    """Read a file once, hash its bytes and decode it; raises ``DataError`` naming the file.

    The header is checked before the rest of the file is read: an uncompressed giant is refused unread.
    """
    try:
        with open(path, "rb") as f:
            _header(f, path, max_pixels)
            data = f.read()
    except OSError as e:
        raise DataError(path, f"cannot read file ({e.strerror or e})") from None
    return LoadedImage(decode_image(data, path, max_pixels=max_pixels), hashlib.sha256(data).hexdigest())


def read_image(path: str | os.PathLike[str], *, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """The pixels of a grayscale TIFF or PNG as a 2-D ``uint8`` or ``uint16`` array."""
    return load_image(path, max_pixels=max_pixels).pixels


def read_header(path: str | os.PathLike[str], *, max_pixels: int = MAX_PIXELS) -> ImageHeader:
    """An image's size and depth from its header alone (a TIFF's IFD, a PNG's IHDR), for checks that must not
    cost a decode; refuses what the header already shows to be wrong, including more than ``max_pixels``."""
    try:
        with open(path, "rb") as f:
            return _header(f, path, max_pixels)
    except OSError as e:
        raise DataError(path, f"cannot read file ({e.strerror or e})") from None


def decode_image(data: bytes, path: str | os.PathLike[str], *, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """Decode TIFF or PNG bytes to a validated 2-D ``uint8``/``uint16`` array; ``path`` names errors.

    The declared size is checked against ``max_pixels`` before decoding."""
    if data.startswith(TIFF_MAGIC):
        pixels = _decode_tiff(data, path, max_pixels)
    elif data.startswith(PNG_MAGIC):
        _png_header(data[:PNG_HEADER_BYTES], path, max_pixels)
        pixels = _decode_png(data, path)
    elif not data:
        raise DataError(path, "empty file")
    else:
        raise DataError(path, "not a TIFF or PNG image")
    return _as_gray(pixels, path)



def _header(f: BinaryIO, path: str | os.PathLike[str], max_pixels: int) -> ImageHeader:
    start = f.read(PNG_HEADER_BYTES)
    f.seek(0)
    if start.startswith(TIFF_MAGIC):
        try:
            with tifffile.TiffFile(f) as tif:  # parses the IFDs only; a file handle given is left open
                header = _tiff_header(tif, path, max_pixels)
        except DataError:
            raise
        except Exception as e:  # tifffile raises many types for damaged files
            raise DataError(path, f"unreadable or truncated TIFF ({_short(e)})") from None
        f.seek(0)
        return header
    if start.startswith(PNG_MAGIC):
        return _png_header(start, path, max_pixels)
    raise DataError(path, "empty file" if not start else "not a TIFF or PNG image")


def _tiff_header(tif: tifffile.TiffFile, path: str | os.PathLike[str], max_pixels: int) -> ImageHeader:
    if len(tif.pages) > 1:
        raise DataError(path, f"multi-page TIFF ({len(tif.pages)} pages); xfeat reads one image per file")
    page = tif.pages[0]
    dims = (page.imagelength, page.imagewidth) if page.imagedepth <= 1 else \
        (page.imagedepth, page.imagelength, page.imagewidth)
    _check_pixels(dims, path, max_pixels)
    dtype = page.dtype
    if dtype is not None:
        _check_dtype(np.dtype(dtype), path)
    known = dtype is not None and page.samplesperpixel == 1
    return ImageHeader(page.imagelength, page.imagewidth, np.dtype(dtype).itemsize * 8 if known else 0)


def _png_header(start: bytes, path: str | os.PathLike[str], max_pixels: int) -> ImageHeader:
    if len(start) < 26 or start[12:16] != b"IHDR":
        raise DataError(path, "unreadable or truncated PNG (no IHDR chunk at its start)")
    width, height = struct.unpack(">II", start[16:24])
    _check_pixels((height, width), path, max_pixels)
    gray = start[25] in (0, 4)  # gray, gray + alpha; 2, 3 and 6 are RGB, palette and RGBA
    return ImageHeader(height, width, (16 if start[24] == 16 else 8) if gray else 0)  # 1-4-bit PNGs decode to uint8


def _check_pixels(dims: tuple[int, ...], path: str | os.PathLike[str], max_pixels: int) -> None:
    pixels = 1
    for d in dims:
        pixels *= d
    if pixels > max_pixels:
        raise DataError(path, f"declares {' x '.join(map(str, dims))} pixels ({megapixels(pixels)} MP), over the "
                              f"limit of {megapixels(max_pixels)} MP; raise it with --max-pixels")


def megapixels(pixels: int) -> str:
    """A pixel count in megapixels for messages: 3600, 100, 2.37, 0.001."""
    value = pixels / 1e6
    return f"{value:.0f}" if value >= 100 else f"{value:.3g}"


def _decode_tiff(data: bytes, path: str | os.PathLike[str], max_pixels: int) -> np.ndarray:
    try:
        with tifffile.TiffFile(io.BytesIO(data)) as tif:
            _tiff_header(tif, path, max_pixels)
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
    _check_dtype(pixels.dtype, path)
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


def _check_dtype(dtype: np.dtype, path: str | os.PathLike[str]) -> None:
    if dtype not in SUPPORTED_DTYPES:
        raise DataError(path, f"unsupported pixel type {dtype} ({dtype.itemsize * 8}-bit); "
                              "xfeat reads 8-bit and 16-bit unsigned grayscale")


def _short(error: Exception) -> str:
    text = str(error).strip().splitlines()
    return text[0][:160] if text and text[0] else type(error).__name__
