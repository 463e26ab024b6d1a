"""The structure of a JPEG file: its frame header, its EXIF orientation, whether it ends, and turning it upright.

libjpeg decodes the pixels as they are stored and fills a cut-off file with gray without failing, so what the
decoder cannot tell is read here: the size before decoding (to refuse a giant unread), the orientation a camera
recorded (to return the image as it is displayed), and the end-of-image marker (to refuse a truncated file).
A broken EXIF block is ignored, never an error: the orientation then is the stored one.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import BinaryIO

import numpy as np

MAGIC = b"\xff\xd8\xff"
EOI, SOS, APP1 = 0xD9, 0xDA, 0xE1
# SOF0-SOF15 less DHT (C4), JPG (C8) and DAC (CC), which share the range
SOF_MARKERS = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
STANDALONE = frozenset(range(0xD0, 0xD8)) | {0x01}  # RST0-7, TEM: no length field
ORIENTATION_TAG = 0x0112


@dataclass(frozen=True)
class Frame:
    """A JPEG's frame header (SOF) with its EXIF orientation; ``height`` and ``width`` as stored."""

    height: int
    width: int
    components: int
    precision: int  # bits per sample: 8, 12 for extended DCT, 2-16 for lossless
    orientation: int  # EXIF 1-8; 1 when absent or unreadable
    end: int  # offset just past the SOF segment

    @property
    def displayed(self) -> tuple[int, int]:
        """Height and width once the orientation is applied (5-8 turn the image a quarter)."""
        return (self.width, self.height) if self.orientation >= 5 else (self.height, self.width)


def read_frame(f: BinaryIO) -> Frame:
    """Walk the marker segments from the start of ``f`` to the frame header; ``ValueError`` says what is wrong."""
    if f.read(2) != MAGIC[:2]:
        raise ValueError("no start-of-image marker")
    orientation = None
    while True:
        marker = _next_marker(f)
        if marker in STANDALONE:
            continue
        if marker in (EOI, SOS):
            raise ValueError("no frame header before the image data")
        length = f.read(2)
        if len(length) < 2 or int.from_bytes(length, "big") < 2:
            raise ValueError("cut off in a marker segment")
        size = int.from_bytes(length, "big") - 2
        if marker in SOF_MARKERS:
            body = f.read(size)
            if len(body) < 6:
                raise ValueError("cut off in the frame header")
            precision, height, width, components = struct.unpack(">BHHB", body[:6])
            if not height or not width:
                raise ValueError(f"frame header declares {height} x {width} pixels")
            return Frame(height, width, components, precision, orientation or 1, f.tell())
        if marker == APP1 and orientation is None:
            payload = f.read(size)
            if payload.startswith(b"Exif\x00\x00"):
                orientation = exif_orientation(payload[6:])
        else:
            f.seek(size, 1)


def _next_marker(f: BinaryIO) -> int:
    byte = f.read(1)
    if not byte:
        raise ValueError("no frame header")
    if byte != b"\xff":
        raise ValueError(f"no marker at byte {f.tell() - 1}")
    while byte == b"\xff":  # any number of fill bytes may precede a marker
        byte = f.read(1)
    if not byte:
        raise ValueError("no frame header")
    return byte[0]


def exif_orientation(tiff: bytes) -> int:
    """Tag 0x0112 of the first IFD of an EXIF block's TIFF structure: 1-8, or 1 for anything missing or broken."""
    order = {b"II*\x00": "<", b"MM\x00*": ">"}.get(tiff[:4])
    if order is None:
        return 1
    try:
        (ifd,) = struct.unpack_from(order + "I", tiff, 4)
        (count,) = struct.unpack_from(order + "H", tiff, ifd)
        for entry in range(ifd + 2, ifd + 2 + 12 * count, 12):
            tag, kind = struct.unpack_from(order + "HH", tiff, entry)
            if tag == ORIENTATION_TAG:
                value = struct.unpack_from(order + ("H" if kind == 3 else "I"), tiff, entry + 8)[0]
                return value if kind in (3, 4) and 1 <= value <= 8 else 1
    except struct.error:  # an offset or a count pointing past the block
        return 1
    return 1


def ends(data: bytes, start: int) -> bool:
    """Whether the segments and entropy-coded scans from ``start`` (a marker) reach the end-of-image marker."""
    pos, n = start, len(data)
    while pos + 1 < n:
        if data[pos] != 0xFF:
            return False
        marker = data[pos + 1]
        if marker == 0xFF:
            pos += 1
            continue
        if marker == EOI:
            return True
        if marker in STANDALONE:
            pos += 2
            continue
        if pos + 4 > n or int.from_bytes(data[pos + 2:pos + 4], "big") < 2:
            return False
        pos += 2 + int.from_bytes(data[pos + 2:pos + 4], "big")
        if marker == SOS:  # coded data up to the next marker: 0xFF is followed by a stuffed 0 or a restart there
            while True:
                pos = data.find(b"\xff", pos)
                if pos < 0 or pos + 1 >= n:
                    return False
                following = data[pos + 1]
                if following == 0xFF:
                    pos += 1
                elif following == 0 or following in STANDALONE:
                    pos += 2
                else:
                    break
    return False


def upright(pixels: np.ndarray, orientation: int) -> np.ndarray:
    """The stored pixels turned as EXIF ``orientation`` says they are displayed (rows and columns only)."""
    if orientation in (5, 7):
        pixels = pixels.swapaxes(0, 1)  # 5: transpose; 7: transpose, then the half turn below
    if orientation in (2, 3, 7):
        pixels = pixels[:, ::-1]
    if orientation in (3, 4, 7):
        pixels = pixels[::-1]
    if orientation == 6:
        pixels = np.rot90(pixels, -1)  # a quarter turn clockwise
    elif orientation == 8:
        pixels = np.rot90(pixels, 1)
    return np.ascontiguousarray(pixels)
