"""Read one TIFF, PNG, JPEG or BMP at its true bit depth, as gray or as RGB, refusing what xfeat cannot trust.

Never a silent 16-to-8-bit conversion (the trap of PIL and torchvision's readers): 8-bit images come back
as ``uint8``, 16-bit ones (and 12-bit JPEG) as ``uint16``. The format is told by the file's first bytes, not its
name. A dataset is read either as gray (the default) or as colour (``colour=True``, for colour methods):

* gray: a 2-D array. A colour image whose channels are all equal is gray stored as colour and is read as gray
  (no loss); a true colour image is refused, since it cannot become gray without choosing how.
* colour: an ``H x W x 3`` array in RGB order for every file, gray ones with their value in all three channels,
  so that one dataset gives one shape.

An alpha channel is dropped. A JPEG is turned as its EXIF orientation says it is displayed.

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
from xfeat.io import jpeg
from xfeat.io.hashing import FileSignature, file_signature

TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
BMP_MAGIC = b"BM"
TIFF_OTHER_COLOURS = {5: "CMYK", 8: "CIELab", 9: "ICCLab", 10: "ITULab"}  # photometric: read as RGB, wrong colours
PNG_HEADER_BYTES = 33  # signature (8) + the IHDR chunk (length 4, type 4, data 13, CRC 4)
BMP_HEADER_BYTES = 14 + 124 + 4 * 256  # file header, the largest info header (V5), a full palette
BMP_INFO_SIZES = (40, 52, 56, 108, 124)  # BITMAPINFOHEADER and its extensions
BMP_COMPRESSION = {0: "", 1: "RLE8", 2: "RLE4", 3: "", 4: "JPEG", 5: "PNG", 6: ""}  # "": uncompressed
SUPPORTED_DTYPES = (np.uint8, np.uint16)
# The largest real X-rays are about 2.4 megapixels (2070 x 1145); 100 MP leaves a wide margin for other
# detectors while refusing what would need gigabytes (100 MP of uint16 is 200 MB, its conversions a few times that).
MAX_PIXELS = 100_000_000


@dataclass(frozen=True)
class LoadedImage:
    """A decoded image with the SHA-256 of its file (the identity caches and leak checks use)."""

    pixels: np.ndarray
    sha256: str
    channels: int = 1  # what the file declares: 1 (gray) or 3 (a colour type, which may hold gray pixels)
    signature: FileSignature | None = None  # the file's, taken before reading it (xfeat.io.hashing)


@dataclass(frozen=True)
class ImageHeader:
    """What a file's header declares, known without decoding a pixel."""

    height: int  # as displayed (a JPEG's EXIF orientation applied)
    width: int
    # of the pixels read_image returns with the same ``colour``: 8 or 16; 0 when reading as gray a colour-typed
    # file, which only decoding tells gray (kept) from colour (refused)
    bit_depth: int
    channels: int  # 1: the header shows gray; 3: a colour type (which may hold gray pixels: see is_colour)


def load_image(path: str | os.PathLike[str], *, max_pixels: int = MAX_PIXELS, colour: bool = False) -> LoadedImage:
    """Read a file once, hash its bytes and decode it; raises ``DataError`` naming the file.

    The header is checked before the rest of the file is read: an uncompressed giant is refused unread.
    """
    try:
        with open(path, "rb") as f:
            _header(f, path, max_pixels, colour)
            f.seek(0)
            data = f.read()
    except OSError as e:
        raise DataError(path, f"cannot read file ({e.strerror or e})") from None
    return LoadedImage(decode_image(data, path, max_pixels=max_pixels, colour=colour),
                       hashlib.sha256(data).hexdigest())


def load_native(path: str | os.PathLike[str], *, max_pixels: int = MAX_PIXELS,
                known: tuple[FileSignature, str] | None = None) -> LoadedImage:
    """Read a file as it is: a gray image (or a colour-typed one whose channels are equal) as a 2-D array, a
    true colour image as ``H x W x 3`` RGB. Which a dataset may hold is the dataset's rule (``scan_dataset``);
    the conversions take either.

    ``known``: (signature, sha256) of an earlier read of this file; when the file's signature after this read is
    still that one, the file is not hashed again (a tenth of the time of decoding a 16-bit X-ray)."""
    try:
        with open(path, "rb") as f:
            before = file_signature(os.fstat(f.fileno()))
            channels = _header(f, path, max_pixels, True).channels
            f.seek(0)
            data = f.read()
            unchanged = known is not None and file_signature(os.fstat(f.fileno())) == known[0]
    except OSError as e:
        raise DataError(path, f"cannot read file ({e.strerror or e})") from None
    pixels = decode_image(data, path, max_pixels=max_pixels, colour=channels > 1)
    if pixels.ndim == 3 and not is_colour(pixels):
        pixels = np.ascontiguousarray(pixels[:, :, 0])
    sha256 = known[1] if unchanged else hashlib.sha256(data).hexdigest()
    return LoadedImage(pixels, sha256, channels, before)


def read_image(path: str | os.PathLike[str], *, max_pixels: int = MAX_PIXELS, colour: bool = False) -> np.ndarray:
    """The pixels of an image file: 2-D gray, or ``H x W x 3`` RGB with ``colour``; ``uint8`` or ``uint16``."""
    return load_image(path, max_pixels=max_pixels, colour=colour).pixels


def read_header(path: str | os.PathLike[str], *, max_pixels: int = MAX_PIXELS, colour: bool = False) -> ImageHeader:
    """An image's size, depth and channels from its header alone (a TIFF's IFD, a PNG's IHDR, a JPEG's frame
    header, a BMP's info header and palette), for checks that must not cost a decode; refuses what the header
    already shows to be wrong, including more than ``max_pixels``."""
    try:
        with open(path, "rb") as f:
            return _header(f, path, max_pixels, colour)
    except OSError as e:
        raise DataError(path, f"cannot read file ({e.strerror or e})") from None


def decode_image(data: bytes, path: str | os.PathLike[str], *, max_pixels: int = MAX_PIXELS,
                 colour: bool = False) -> np.ndarray:
    """Decode the bytes of an image file to a validated array (see ``read_image``); ``path`` names errors.

    The declared size is checked against ``max_pixels`` before decoding."""
    if data.startswith(TIFF_MAGIC):
        pixels = _decode_tiff(data, path, max_pixels)
    elif data.startswith(PNG_MAGIC):
        _png_header(data[:PNG_HEADER_BYTES], path, max_pixels, colour)
        pixels = _decode_png(data, path)
    elif data.startswith(jpeg.MAGIC):
        pixels = _decode_jpeg(data, path, max_pixels)
    elif data.startswith(BMP_MAGIC):
        pixels = _decode_bmp(data, path, max_pixels)
    elif not data:
        raise DataError(path, "empty file")
    else:
        raise DataError(path, "not a TIFF, PNG, JPEG or BMP image")
    return _as_colour(pixels, path) if colour else _as_gray(pixels, path)


def is_colour(pixels: np.ndarray) -> bool:
    """Whether decoded pixels are true colour: three channels (or more, with alpha) that are not all equal."""
    return pixels.ndim == 3 and pixels.shape[2] >= 3 and not (
        np.array_equal(pixels[:, :, 0], pixels[:, :, 1]) and np.array_equal(pixels[:, :, 0], pixels[:, :, 2]))


def _header(f: BinaryIO, path: str | os.PathLike[str], max_pixels: int, colour: bool) -> ImageHeader:
    start = f.read(PNG_HEADER_BYTES)
    f.seek(0)
    if start.startswith(TIFF_MAGIC):
        try:
            with tifffile.TiffFile(f) as tif:  # parses the IFDs only; a file handle given is left open
                return _tiff_header(tif, path, max_pixels, colour)
        except DataError:
            raise
        except Exception as e:  # tifffile raises many types for damaged files
            raise DataError(path, f"unreadable or truncated TIFF ({_short(e)})") from None
    if start.startswith(PNG_MAGIC):
        return _png_header(start, path, max_pixels, colour)
    if start.startswith(jpeg.MAGIC):
        return _jpeg_header(_jpeg_frame(f, path, max_pixels), colour)
    if start.startswith(BMP_MAGIC):
        return _bmp_header(f.read(BMP_HEADER_BYTES), path, max_pixels, colour)[0]
    raise DataError(path, "empty file" if not start else "not a TIFF, PNG, JPEG or BMP image")


def _tiff_header(tif: tifffile.TiffFile, path: str | os.PathLike[str], max_pixels: int,
                 colour: bool) -> ImageHeader:
    if len(tif.pages) > 1:
        raise DataError(path, f"multi-page TIFF ({len(tif.pages)} pages); xfeat reads one image per file")
    page = tif.pages[0]
    dims = (page.imagelength, page.imagewidth) if page.imagedepth <= 1 else \
        (page.imagedepth, page.imagelength, page.imagewidth)
    _check_pixels(dims, path, max_pixels)
    dtype = page.dtype
    if dtype is not None:
        _check_dtype(np.dtype(dtype), path)
    if page.photometric in TIFF_OTHER_COLOURS:
        raise DataError(path, f"{TIFF_OTHER_COLOURS[page.photometric]} TIFF; xfeat reads gray and RGB TIFF")
    channels = 3 if page.samplesperpixel >= 3 else 1  # 2: gray and alpha
    known = dtype is not None and (page.samplesperpixel == 1 or colour)
    return ImageHeader(page.imagelength, page.imagewidth, np.dtype(dtype).itemsize * 8 if known else 0, channels)


def _png_header(start: bytes, path: str | os.PathLike[str], max_pixels: int, colour: bool) -> ImageHeader:
    if len(start) < 26 or start[12:16] != b"IHDR":
        raise DataError(path, "unreadable or truncated PNG (no IHDR chunk at its start)")
    width, height = struct.unpack(">II", start[16:24])
    _check_pixels((height, width), path, max_pixels)
    gray = start[25] in (0, 4)  # gray, gray + alpha; 2, 3 and 6 are RGB, palette and RGBA
    depth = 16 if start[24] == 16 else 8  # 1-4-bit PNGs and palettes decode to uint8
    return ImageHeader(height, width, depth if gray or colour else 0, 1 if gray else 3)


def _jpeg_frame(f: BinaryIO, path: str | os.PathLike[str], max_pixels: int) -> jpeg.Frame:
    try:
        frame = jpeg.read_frame(f)
    except ValueError as e:
        raise DataError(path, f"unreadable or truncated JPEG ({e})") from None
    _check_pixels(frame.displayed, path, max_pixels)
    if frame.components not in (1, 3):
        kind = "CMYK JPEG" if frame.components == 4 else "JPEG"
        raise DataError(path, f"{kind} with {frame.components} components; xfeat reads gray (1) and colour (3) JPEG")
    if not 2 <= frame.precision <= 16:
        raise DataError(path, f"unreadable or truncated JPEG ({frame.precision}-bit samples)")
    return frame


def _jpeg_header(frame: jpeg.Frame, colour: bool) -> ImageHeader:
    gray = frame.components == 1
    depth = 8 if frame.precision <= 8 else 16  # 12-bit and lossless JPEG decode to uint16
    return ImageHeader(*frame.displayed, depth if gray or colour else 0, 1 if gray else 3)


def _bmp_header(start: bytes, path: str | os.PathLike[str], max_pixels: int,
                colour: bool) -> tuple[ImageHeader, int]:
    """The header, and how many bytes the file needs to hold its pixels (offset and rows)."""
    offset, info_size = struct.unpack_from("<II", start.ljust(18, b"\0"), 10)
    if info_size in (12, 16, 64):
        raise DataError(path, f"OS/2 BMP (a {info_size}-byte header); xfeat reads Windows BMP")
    if len(start) < 14 + 40:
        raise DataError(path, "unreadable or truncated BMP (cut off in its header)")
    if info_size not in BMP_INFO_SIZES:
        raise DataError(path, f"unreadable or truncated BMP (an info header of {info_size} bytes)")
    width, height, _, bits, compression = struct.unpack_from("<iiHHI", start, 18)
    colours_used = struct.unpack_from("<I", start, 46)[0]
    if width <= 0 or height == 0:
        raise DataError(path, f"unreadable or truncated BMP (declares {height} x {width} pixels)")
    _check_pixels((abs(height), width), path, max_pixels)  # a negative height: rows stored top-down
    if bits not in (1, 4, 8, 16, 24, 32):
        raise DataError(path, f"unreadable or truncated BMP ({bits} bits per pixel)")
    if compression not in BMP_COMPRESSION:
        raise DataError(path, f"unreadable or truncated BMP (compression {compression})")
    if BMP_COMPRESSION[compression]:
        raise DataError(path, f"{BMP_COMPRESSION[compression]}-compressed BMP; xfeat reads uncompressed BMP")
    gray = False
    if bits <= 8:
        entries = min(colours_used or 1 << bits, 1 << bits)
        palette = start[14 + info_size:14 + info_size + 4 * entries]
        if len(palette) < 4 * entries:
            raise DataError(path, "unreadable or truncated BMP (cut off in its palette)")
        bgr = np.frombuffer(palette, np.uint8).reshape(-1, 4)[:, :3]
        gray = bool((bgr == bgr[:, :1]).all())
    header = ImageHeader(abs(height), width, 8 if gray or colour else 0, 1 if gray else 3)
    return header, offset + (width * bits + 31) // 32 * 4 * abs(height)


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
            _tiff_header(tif, path, max_pixels, False)
            page = tif.pages[0]
            pixels = page.asarray()
            return np.moveaxis(pixels, 0, -1) if page.axes.startswith("S") else pixels  # planar: samples first
    except DataError:
        raise
    except Exception as e:  # tifffile raises many types for damaged files
        raise DataError(path, f"unreadable or truncated TIFF ({_short(e)})") from None


def _decode_png(data: bytes, path: str | os.PathLike[str]) -> np.ndarray:
    try:
        return imagecodecs.png_decode(data)
    except Exception as e:  # imagecodecs.PngError, or a codec error for damaged streams
        raise DataError(path, f"unreadable or truncated PNG ({_short(e)})") from None


def _decode_jpeg(data: bytes, path: str | os.PathLike[str], max_pixels: int) -> np.ndarray:
    frame = _jpeg_frame(io.BytesIO(data), path, max_pixels)
    if not jpeg.ends(data, frame.end):  # libjpeg would fill the missing part with gray, without an error
        raise DataError(path, "unreadable or truncated JPEG (no end-of-image marker)")
    try:
        pixels = imagecodecs.jpeg8_decode(data)
    except Exception as e:  # imagecodecs.Jpeg8Error
        raise DataError(path, f"unreadable or truncated JPEG ({_short(e)})") from None
    _check_decoded(pixels, (frame.height, frame.width), np.uint8 if frame.precision <= 8 else np.uint16, "JPEG", path)
    return jpeg.upright(pixels, frame.orientation)


def _decode_bmp(data: bytes, path: str | os.PathLike[str], max_pixels: int) -> np.ndarray:
    header, needed = _bmp_header(data[:BMP_HEADER_BYTES], path, max_pixels, True)
    if len(data) < needed:
        raise DataError(path, f"unreadable or truncated BMP ({len(data)} bytes, its pixels need {needed})")
    try:
        pixels = imagecodecs.bmp_decode(data)  # RGB order; a palette of the gray ramp gives 2-D gray
    except Exception as e:  # imagecodecs.BmpError
        raise DataError(path, f"unreadable or truncated BMP ({_short(e)})") from None
    _check_decoded(pixels, (header.height, header.width), np.uint8, "BMP", path)
    return pixels


def _check_decoded(pixels: np.ndarray, size: tuple[int, int], dtype: type, kind: str,
                   path: str | os.PathLike[str]) -> None:
    """The decoder's output is what the header promised (the size the pixel limit was checked on)."""
    if pixels.shape[:2] != size or pixels.dtype != dtype:
        raise DataError(path, f"unreadable or truncated {kind} (decoded {' x '.join(map(str, pixels.shape))} "
                              f"{pixels.dtype}, its header declares {size[0]} x {size[1]} {np.dtype(dtype)})")


def _channels(pixels: np.ndarray, path: str | os.PathLike[str]) -> np.ndarray:
    """Gray as 2-D, colour as ``H x W x 3``: no alpha, no single-channel third axis."""
    if pixels.size == 0:
        raise DataError(path, "empty image (no pixels)")
    _check_dtype(pixels.dtype, path)
    if pixels.ndim == 3 and pixels.shape[2] in (2, 4):
        pixels = pixels[:, :, :-1]  # drop alpha
    if pixels.ndim == 3 and pixels.shape[2] == 1:
        pixels = pixels[:, :, 0]
    if pixels.ndim != 2 and not (pixels.ndim == 3 and pixels.shape[2] == 3):
        raise DataError(path, f"unsupported image shape {pixels.shape}; expected a gray or RGB image")
    return pixels


def _as_gray(pixels: np.ndarray, path: str | os.PathLike[str]) -> np.ndarray:
    pixels = _channels(pixels, path)
    if pixels.ndim == 3:
        if is_colour(pixels):
            raise DataError(path, f"colour image ({pixels.shape[0]} x {pixels.shape[1]} x 3); this dataset is read "
                                  "as gray: use a colour method (--methods rgb)")
        pixels = pixels[:, :, 0]
    return np.ascontiguousarray(pixels)


def _as_colour(pixels: np.ndarray, path: str | os.PathLike[str]) -> np.ndarray:
    pixels = _channels(pixels, path)
    if pixels.ndim == 2:
        pixels = np.repeat(pixels[:, :, None], 3, axis=2)
    return np.ascontiguousarray(pixels)


def _check_dtype(dtype: np.dtype, path: str | os.PathLike[str]) -> None:
    if dtype not in SUPPORTED_DTYPES:
        raise DataError(path, f"unsupported pixel type {dtype} ({dtype.itemsize * 8}-bit); "
                              "xfeat reads 8-bit and 16-bit unsigned pixels")


def _short(error: Exception) -> str:
    text = str(error).strip().splitlines()
    return text[0][:160] if text and text[0] else type(error).__name__
