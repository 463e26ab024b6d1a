"""TIFF, PNG, JPEG and BMP, gray or colour: read at their depth, in RGB order, upright, and refused in one line."""

from __future__ import annotations

import dataclasses
import io
import re
import struct
from pathlib import Path

import cv2
import imagecodecs
import numpy as np
import pytest
import tifffile
from PIL import Image, ImageOps

from xfeat.errors import DataError
from xfeat.io.dataset import find_images
from xfeat.io.images import is_colour, read_header, read_image
from xfeat_cli.main import main

H, W = 24, 40  # not square: a quarter turn shows in the shape
JPEG_TOLERANCE = 6  # levels, at quality 95 with the usual halved chroma; a wrong turn or order is off by 100s


def _gradient() -> np.ndarray:
    """Smooth (JPEG keeps it within a few levels) and without symmetry (every orientation differs)."""
    y, x = np.mgrid[0:H, 0:W]
    return (10 + 4 * x + 2 * y).astype(np.uint8)


def _colour() -> np.ndarray:
    """RGB: red grows to the right, green downwards, blue stays."""
    y, x = np.mgrid[0:H, 0:W]
    return np.dstack([30 + 5 * x, 40 + 6 * y, np.full((H, W), 90)]).astype(np.uint8)


def _bgr(rgb: np.ndarray) -> np.ndarray:
    """OpenCV's channel order: BGR, BGRA."""
    return rgb[:, :, [2, 1, 0, 3][:rgb.shape[2]]] if rgb.ndim == 3 else rgb


def _encode(ext: str, rgb: np.ndarray, *params: int) -> bytes:
    ok, encoded = cv2.imencode(ext, np.ascontiguousarray(_bgr(rgb)), list(params))
    assert ok
    return encoded.tobytes()


def _tiff(rgb: np.ndarray) -> bytes:
    out = io.BytesIO()
    tifffile.imwrite(out, rgb, photometric="rgb" if rgb.ndim == 3 else "minisblack")
    return out.getvalue()


ENCODERS = {"tiff": _tiff, "png": lambda a: _encode(".png", a), "bmp": lambda a: _encode(".bmp", a),
            "jpeg": lambda a: _encode(".jpg", a, cv2.IMWRITE_JPEG_QUALITY, 95)}


def _write(tmp_path: Path, name: str, data: bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


def _close(a: np.ndarray, b: np.ndarray, tolerance: int) -> bool:
    return a.shape == b.shape and int(np.abs(a.astype(int) - b.astype(int)).max()) <= tolerance


def _with_exif(jpeg: bytes, orientation: int, order: str = "<") -> bytes:
    """An APP1 EXIF block holding only the orientation, right after the start-of-image marker."""
    magic = b"II*\x00" if order == "<" else b"MM\x00*"
    tiff = magic + struct.pack(order + "IH", 8, 1) + struct.pack(order + "HHIHH", 0x0112, 3, 1, orientation, 0) + \
        struct.pack(order + "I", 0)
    return _app1(jpeg, b"Exif\x00\x00" + tiff)


def _app1(jpeg: bytes, payload: bytes) -> bytes:
    return jpeg[:2] + b"\xff\xe1" + struct.pack(">H", len(payload) + 2) + payload + jpeg[2:]


def _header(path: Path, **kw) -> tuple:
    return dataclasses.astuple(read_header(path, **kw))  # (height, width, bit_depth, channels)


def _problem(path: Path, **kw) -> str:
    with pytest.raises(DataError) as caught:
        read_image(path, **kw)
    assert caught.value.path == str(path) and "\n" not in caught.value.problem
    return caught.value.problem


@pytest.mark.parametrize("fmt", ENCODERS)
def test_every_format_round_trips_gray_and_colour(tmp_path, fmt):
    tolerance = JPEG_TOLERANCE if fmt == "jpeg" else 0
    gray, colour = _gradient(), _colour()
    gray_file = _write(tmp_path, "gray", ENCODERS[fmt](gray))
    colour_file = _write(tmp_path, "colour", ENCODERS[fmt](colour))  # no suffix: the bytes tell the format
    assert read_image(gray_file).dtype == np.uint8 and _close(read_image(gray_file), gray, tolerance)
    assert _close(read_image(colour_file, colour=True), colour, tolerance)
    as_rgb = read_image(gray_file, colour=True)
    assert as_rgb.shape == (H, W, 3) and not is_colour(as_rgb) and _close(as_rgb[:, :, 1], gray, tolerance)
    assert _header(gray_file) == _header(gray_file, colour=True) == (H, W, 8, 1)
    assert _header(colour_file) == (H, W, 0, 3)  # read as gray, a colour type: decoding tells
    assert _header(colour_file, colour=True) == (H, W, 8, 3)


@pytest.mark.parametrize("fmt", ENCODERS)
def test_pure_red_is_red(tmp_path, fmt):
    red = np.zeros((16, 16, 3), np.uint8)
    red[:, :, 0] = 255
    pixels = read_image(_write(tmp_path, "red", ENCODERS[fmt](red)), colour=True)
    assert _close(pixels, red, 2 if fmt == "jpeg" else 0)


@pytest.mark.parametrize("fmt", ["tiff", "png"])
def test_16bit_colour_reads_as_uint16_rgb(tmp_path, fmt):
    colour = _colour().astype(np.uint16) * 250
    path = _write(tmp_path, "c16", _tiff(colour) if fmt == "tiff" else _encode(".png", colour))
    pixels = read_image(path, colour=True)
    assert pixels.dtype == np.uint16 and np.array_equal(pixels, colour)
    assert read_header(path, colour=True).bit_depth == 16


def test_planar_colour_tiff_reads_as_rows_columns_channels(tmp_path):
    out = io.BytesIO()
    tifffile.imwrite(out, np.moveaxis(_colour(), -1, 0), photometric="rgb", planarconfig="separate")
    assert np.array_equal(read_image(_write(tmp_path, "planar.tif", out.getvalue()), colour=True), _colour())


def test_a_colour_image_read_as_gray_is_refused_pointing_at_colour_methods(tmp_path):
    path = _write(tmp_path, "c.jpg", ENCODERS["jpeg"](_colour()))
    assert _problem(path) == (f"colour image ({H} x {W} x 3); this dataset is read as gray: use a colour method "
                              "(--methods rgb)")
    gray_as_colour = _write(tmp_path, "g.jpg", ENCODERS["jpeg"](np.dstack([_gradient()] * 3)))
    assert read_header(gray_as_colour).channels == 3 and read_image(gray_as_colour).shape == (H, W)


def test_is_colour():
    assert is_colour(_colour()) and not is_colour(_gradient()) and not is_colour(np.dstack([_gradient()] * 3))
    assert is_colour(np.dstack([_colour(), np.full((H, W), 255, np.uint8)]))  # alpha aside


# EXIF orientation -> np.rot90 turns that display the stored image (1, 3, 6 and 8 are rotations)
ROTATIONS = {1: 0, 3: 2, 6: -1, 8: 1}


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_gives_the_displayed_image(tmp_path, orientation):
    stored = ENCODERS["jpeg"](_gradient())
    path = _write(tmp_path, "o.jpg", _with_exif(stored, orientation))
    pixels = read_image(path)
    with Image.open(path) as im:
        displayed = np.asarray(ImageOps.exif_transpose(im))
    assert _close(pixels, displayed, 2)  # Pillow's own reading of the orientation
    turned = orientation >= 5
    assert (read_header(path).height, read_header(path).width) == ((W, H) if turned else (H, W))
    if orientation in ROTATIONS:
        k = ROTATIONS[orientation]
        assert np.array_equal(pixels, np.rot90(read_image(_write(tmp_path, "s.jpg", stored)), k))
        assert _close(pixels, np.rot90(_gradient(), k), JPEG_TOLERANCE)  # the rotated source


def test_exif_orientation_big_endian_and_in_colour(tmp_path):
    path = _write(tmp_path, "o.jpg", _with_exif(ENCODERS["jpeg"](_colour()), 6, order=">"))
    assert _close(read_image(path, colour=True), np.rot90(_colour(), -1), JPEG_TOLERANCE)
    assert _header(path, colour=True) == (W, H, 8, 3)


@pytest.mark.parametrize("payload", [
    b"Exif\x00\x00II*\x00" + struct.pack("<I", 4000),  # first IFD past the block
    b"Exif\x00\x00II*\x00" + struct.pack("<IH", 8, 50) + b"\x12\x01",  # entries cut off
    b"Exif\x00\x00XX*\x00" + bytes(20),  # no byte order
    b"Exif\x00\x00",  # nothing after the name
    b"Exif\x00\x00II*\x00" + struct.pack("<IH", 8, 1) + struct.pack("<HHIHH", 0x0112, 3, 1, 9, 0),  # no such value
    b"http://ns.adobe.com/xap/1.0/\x00<x/>",  # XMP, another APP1
], ids=["offset", "cut", "order", "empty", "value", "xmp"])
def test_a_broken_exif_block_is_ignored(tmp_path, payload):
    stored = ENCODERS["jpeg"](_gradient())
    path = _write(tmp_path, "b.jpg", _app1(stored, payload))
    assert np.array_equal(read_image(path), read_image(_write(tmp_path, "s.jpg", stored)))


@pytest.mark.parametrize("kind", ["gray", "colour"])
def test_progressive_jpeg(tmp_path, kind):
    source = _gradient() if kind == "gray" else _colour()
    data = _encode(".jpg", source, cv2.IMWRITE_JPEG_PROGRESSIVE, 1, cv2.IMWRITE_JPEG_QUALITY, 95)
    assert b"\xff\xc2" in data  # SOF2
    path = _write(tmp_path, "p.jpg", _with_exif(data, 8))
    assert _close(read_image(path, colour=kind == "colour"), np.rot90(source), JPEG_TOLERANCE)


def test_12bit_jpeg_reads_as_uint16(tmp_path):
    image = (_gradient().astype(np.uint16) * 16)  # up to 4095
    path = _write(tmp_path, "12.jpg", imagecodecs.jpeg8_encode(image, level=95, bitspersample=12))
    pixels = read_image(path)
    assert pixels.dtype == np.uint16 and _close(pixels, image, 40)
    assert read_header(path).bit_depth == 16


def test_bmp_palettes_bit_counts_and_row_order(tmp_path):
    gray = _gradient()
    data = bytearray(ENCODERS["bmp"](gray))  # 8-bit, the gray ramp as palette
    data[54:54 + 1024] = bytes(np.repeat(np.arange(255, -1, -1, dtype=np.uint8), 4))  # an inverted gray palette
    path = _write(tmp_path, "inv.bmp", bytes(data))
    assert np.array_equal(read_image(path), 255 - gray) and _header(path) == (H, W, 8, 1)
    data[54 + 4 * 255:54 + 4 * 255 + 3] = b"\x01\x02\x03"  # one colour entry: a colour palette
    path = _write(tmp_path, "pal.bmp", bytes(data))
    assert _header(path) == (H, W, 0, 3) and np.array_equal(read_image(path), 255 - gray)  # pixels still gray
    rgba = np.dstack([_colour(), np.full((H, W), 7, np.uint8)])
    with Image.fromarray(rgba) as im:  # 32-bit
        out = io.BytesIO()
        im.save(out, format="BMP")
    assert np.array_equal(read_image(_write(tmp_path, "32.bmp", out.getvalue()), colour=True), _colour())
    bitfields = _encode(".bmp", rgba)  # OpenCV: a V5 header with colour masks and alpha
    assert np.array_equal(read_image(_write(tmp_path, "v5.bmp", bitfields), colour=True), _colour())
    data = bytearray(ENCODERS["bmp"](_colour()))
    struct.pack_into("<i", data, 22, -H)  # rows stored top-down
    assert np.array_equal(read_image(_write(tmp_path, "down.bmp", bytes(data)), colour=True), _colour()[::-1])


def _half(data: bytes) -> bytes:
    return data[:len(data) // 2]


def _pil_jpeg(image: Image.Image) -> bytes:
    out = io.BytesIO()
    image.save(out, format="JPEG")
    return out.getvalue()


def _cmyk_tiff() -> bytes:
    out = io.BytesIO()
    tifffile.imwrite(out, np.zeros((8, 8, 4), np.uint8), photometric="separated")
    return out.getvalue()


def _patch(data: bytes, offset: int, value: int) -> bytes:
    patched = bytearray(data)
    struct.pack_into("<I", patched, offset, value)
    return bytes(patched)


BAD = {
    "JPEG cut in half": (lambda: _half(ENCODERS["jpeg"](_colour())), "unreadable or truncated JPEG"),
    "JPEG without its end": (lambda: ENCODERS["jpeg"](_gradient())[:-2], "unreadable or truncated JPEG (no end-of-"),
    "progressive JPEG cut": (lambda: _half(_encode(".jpg", _colour(), cv2.IMWRITE_JPEG_PROGRESSIVE, 1)),
                             "unreadable or truncated JPEG"),
    "JPEG cut in its header": (lambda: ENCODERS["jpeg"](_gradient())[:30], "unreadable or truncated JPEG (no fr"),
    "JPEG without a frame": (lambda: b"\xff\xd8\xff\xd9", "unreadable or truncated JPEG (no frame header before"),
    "garbage after the JPEG magic": (lambda: b"\xff\xd8\xffgarbage" * 10, "unreadable or truncated JPEG"),
    "CMYK JPEG": (lambda: _pil_jpeg(Image.new("CMYK", (8, 8))), "CMYK JPEG with 4 components"),
    "BMP cut in half": (lambda: ENCODERS["bmp"](_colour())[:1500], "unreadable or truncated BMP (1500 bytes"),
    "BMP cut in its palette": (lambda: ENCODERS["bmp"](_gradient())[:300], "unreadable or truncated BMP (cut off"),
    "garbage after the BMP magic": (lambda: b"BMgarbage" * 10, "unreadable or truncated BMP"),
    "OS/2 BMP": (lambda: b"BM" + struct.pack("<IHHIIHHHH", 40, 0, 0, 26, 12, 2, 2, 1, 24) + bytes(16), "OS/2 BMP"),
    "RLE BMP": (lambda: _patch(ENCODERS["bmp"](_gradient()), 30, 1), "RLE8-compressed BMP"),
    "CMYK TIFF": (_cmyk_tiff, "CMYK TIFF; xfeat reads gray and RGB TIFF"),
    "GIF": (lambda: b"GIF89a" + bytes(40), "not a TIFF, PNG, JPEG or BMP image"),
}


@pytest.mark.parametrize("kind", BAD)
def test_bad_files_are_one_line_errors(tmp_path, kind):
    make, problem = BAD[kind]
    path = _write(tmp_path, "bad", make())
    for colour in (False, True):
        assert _problem(path, colour=colour).startswith(problem)


def _giant_jpeg(orientation: int) -> bytes:
    """A frame header declaring 60000 x 50000 pixels, and nothing to decode."""
    sof = b"\xff\xc0" + struct.pack(">HBHHB", 11, 8, 60000, 50000, 1) + b"\x01\x11\x00"
    return _with_exif(b"\xff\xd8" + sof + b"\xff\xd9", orientation)


def _giant_bmp() -> bytes:
    header = struct.pack("<iiHHIIiiII", 50000, -60000, 1, 24, 0, 0, 0, 0, 0, 0)
    return b"BM" + struct.pack("<IHHII", 0, 0, 0, 54, 40) + header


@pytest.mark.parametrize("make, declared", [(lambda: _giant_jpeg(1), "60000 x 50000"),
                                            (lambda: _giant_jpeg(6), "50000 x 60000"),  # displayed
                                            (_giant_bmp, "60000 x 50000")], ids=["JPEG", "turned JPEG", "BMP"])
def test_a_huge_declared_size_is_refused_before_decoding(tmp_path, make, declared):
    path = _write(tmp_path, "giant", make())
    message = f"declares {declared} pixels (3000 MP), over the limit of 100 MP"
    assert _problem(path).startswith(message)
    with pytest.raises(DataError, match=re.escape(message)):
        read_header(path, colour=True)
    assert read_header(path, max_pixels=4_000_000_000).height == int(declared.split()[0])


def test_a_folder_dataset_takes_jpeg_and_bmp_names(tmp_path):
    folder = tmp_path / "data" / "B1" / "normal"
    folder.mkdir(parents=True)
    for name, fmt in {"a.jpg": "jpeg", "b.JPEG": "jpeg", "c.bmp": "bmp", "d.png": "png"}.items():
        _write(folder, name, ENCODERS[fmt](_gradient()))
    records = find_images(tmp_path / "data").records
    assert [r.path.name for r in records] == ["a.jpg", "b.JPEG", "c.bmp", "d.png"]
    assert all(read_image(r.path).shape == (H, W) for r in records)


def test_convert_reads_a_gray_jpeg_and_bmp_dataset_and_stops_at_a_colour_jpeg_among_them(tmp_path, capsys):
    data = tmp_path / "data"
    for bundle in ("B1", "B2"):
        for label in ("normal", "abnormal"):
            folder = data / bundle / label
            folder.mkdir(parents=True)
            _write(folder, "a.jpg", ENCODERS["jpeg"](np.dstack([_gradient()] * 3)))  # gray saved as colour
            _write(folder, "b.bmp", ENCODERS["bmp"](_gradient()))
    argv = ["convert", str(data), "--method", "m2", "--out", str(tmp_path / "out"), "--quiet", "--jobs", "1"]
    assert main(argv) == 0 and len(list((tmp_path / "out").rglob("*.png"))) == 8
    colour = _write(data / "B2" / "normal", "c.jpg", ENCODERS["jpeg"](_colour()))
    argv[5] = str(tmp_path / "out2")
    capsys.readouterr()
    assert main(argv) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"xfeat: error: {data}: mixes gray and colour images (e.g. ") and "\n" not in err
    assert str(colour) in err and err.endswith("a dataset is read as all gray or all colour: move the odd ones out")
