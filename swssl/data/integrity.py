"""Byte-level integrity checks of image files: what the decoders let through, found before decoding.

The decoders behind the readers are lenient: Pillow zero-fills a PNG whose compressed rows end
early, pylibjpeg's JPEG and JPEG 2000 decoders and imagecodecs pad a cut or garbled codestream
without a word, pydicom stops quietly where a file ends and reshapes a codestream of another size.
Each helper here checks one such thing from the file's own bytes (end markers, frame headers,
inflated byte counts, short reads, pydicom's warnings), so that swssl.data.readers can refuse the file.
"""
from __future__ import annotations

import contextlib
import logging
import os
import re
import struct
import threading
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import IO, TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import tifffile

END_MARKERS = {"JPEG": "EOI", "JPEG-LS": "EOI", "JPEG 2000": "EOC"}  # all three are the bytes FF D9
_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC} | {0xF7}  # JPEG frame headers, and JPEG-LS's SOF55
TIFF_CODESTREAMS = {7: "JPEG", 34892: "JPEG", 33003: "JPEG 2000", 33004: "JPEG 2000", 33005: "JPEG 2000",
                     34712: "JPEG 2000"}  # TIFF compression codes whose strips/tiles are such codestreams
_ADAM7 = ((0, 0, 8, 8), (0, 4, 8, 8), (4, 0, 8, 4), (0, 2, 4, 4), (2, 0, 4, 2), (0, 1, 2, 2), (1, 0, 2, 1))
_PNG_CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}  # by PNG colour type
_DAMAGE = re.compile(r"truncat|corrupt|premature|insufficient|fewer|no JPEG EOI|too short|not enough", re.I)
_PILLOW_LOCK = threading.Lock()


def read_at(fh: IO[bytes], offset: int, size: int) -> bytes:
    fh.seek(offset)
    return fh.read(size)


def ends_with_marker(tail: bytes) -> bool:
    """Whether a JPEG/JPEG-LS (EOI) or JPEG 2000 (EOC) codestream ends with its end marker, FF D9.

    Zero bytes after it, or one 0xFF, are padding (DICOM fragments have even lengths).
    """
    tail = tail.rstrip(b"\0")
    return tail.endswith(b"\xff\xd9") or tail.endswith(b"\xff\xd9\xff")


def codestream_size(head: bytes) -> tuple[int, int] | None:
    """(rows, columns) from the frame header of a JPEG/JPEG-LS (SOF) or JPEG 2000 (SIZ) codestream's head."""
    if head[:2] != b"\xff\xd8":
        at = head.find(b"\xff\x4f\xff\x51")  # SOC then SIZ; also found inside a JP2 wrapper
        if at < 0 or len(head) < at + 24:
            return None
        width, height, x0, y0 = struct.unpack(">4I", head[at + 8 : at + 24])
        return height - y0, width - x0
    at = 2  # after SOI: marker segments up to the frame header
    while at + 9 <= len(head) and head[at] == 0xFF:
        if head[at + 1] in _SOF:
            rows, columns = struct.unpack(">HH", head[at + 5 : at + 9])
            return (rows, columns) if rows else None  # 0 rows: a DNL marker gives them later
        at += 1 if head[at + 1] == 0xFF else 2 + int.from_bytes(head[at + 2 : at + 4], "big")  # fill byte or segment
    return None


def png_missing(path: Path) -> tuple[int, int] | None:
    """(bytes, needed) when the IDAT stream inflates to fewer scanline bytes than the IHDR declares.

    Pillow zero-fills the rows of a zlib stream that ends early, so the stream is inflated here once
    more, counting bytes only, in bounded pieces (whatever a chunk's length field claims).
    """
    with open(path, "rb") as fh:
        width, height, depth, colour, _, _, interlace = struct.unpack(">IIBBBBB", read_at(fh, 16, 13))
        bits = depth * _PNG_CHANNELS[colour]
        needed = sum(-(-(height - y0) // dy) * (1 + (-(-(width - x0) // dx) * bits + 7) // 8)
                     for y0, x0, dy, dx in (_ADAM7 if interlace else ((0, 0, 1, 1),)) if height > y0 and width > x0)
        inflate, got = zlib.decompressobj(), 0
        fh.seek(33)  # after the IHDR chunk
        while got < needed and len(chunk := fh.read(8)) == 8:
            length, kind = struct.unpack(">I4s", chunk)
            if kind == b"IEND":
                break
            if kind != b"IDAT":
                fh.seek(length + 4, os.SEEK_CUR)
                continue
            end = fh.tell() + length
            while got < needed and (data := fh.read(min(end - fh.tell(), 1 << 20))):
                while got < needed:
                    piece = inflate.decompress(data, 1 << 24)
                    got, data = got + len(piece), inflate.unconsumed_tail
                    if not data and len(piece) < 1 << 24:  # a full piece may leave output inside zlib
                        break
            fh.seek(end + 4)  # past the CRC
    return (got, needed) if got < needed else None


@contextlib.contextmanager
def strict_pillow() -> Iterator[None]:
    """Pillow's process-wide switches for one open and load: no decompression-bomb check (the pixel
    limit, checked from the header, replaces it) and no loading of truncated images. Set and
    restored under a lock, so that concurrent opens cannot leave them changed."""
    from PIL import Image, ImageFile

    with _PILLOW_LOCK:
        saved = Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES
        Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES = None, False
        try:
            yield
        finally:
            Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES = saved


class ShortReads:
    """A binary file that notes the first read that came back short: where pydicom's parser, which
    stops quietly at the end of the file, hit it. An empty 8-byte read (the next tag after the last
    element of a whole file) is the normal end of a file without pixel data."""

    def __init__(self, fh: IO[bytes]):
        self._fh = fh
        self.cut: tuple[int, int, int] | None = None  # (position, bytes asked, bytes got)

    def read(self, size: int = -1) -> bytes:
        at = self._fh.tell()
        data = self._fh.read(size)
        if self.cut is None and 0 <= size != len(data) and (len(data) > 0 or size != 8):
            self.cut = (at, size, len(data))
        return data

    def __getattr__(self, name: str) -> object:
        return getattr(self._fh, name)


class PydicomWarnings(logging.Handler):
    """pydicom's warnings about damaged data, given on this thread while it decodes.

    pydicom logs each warning to its "pydicom" logger too; a handler there, keeping this thread's
    records only, is safe where warnings.catch_warnings is not: frames are decoded on the streaming
    code's prefetch thread while the main thread runs on.
    """

    def __init__(self):
        super().__init__(logging.WARNING)
        self._thread, self.damage = threading.get_ident(), []

    def emit(self, record: logging.LogRecord) -> None:
        if record.thread == self._thread and _DAMAGE.search(message := record.getMessage()):
            self.damage.append(message)

    def __enter__(self) -> PydicomWarnings:
        logging.getLogger("pydicom").addHandler(self)
        return self

    def __exit__(self, *exc_info: object) -> None:
        logging.getLogger("pydicom").removeHandler(self)


def segment_bytes(page: tifffile.TiffPage, count: int) -> np.ndarray:
    """The bytes each of the `count` uncompressed strips or tiles of `page` must hold.

    Tiles are whole; the last strip of each plane holds only the rows left.
    """
    bits = page.bitspersample * (page.samplesperpixel if page.planarconfig == 1 else 1)
    if page.is_tiled:
        return np.full(count, page.tiledepth * page.tilelength * (-(-page.tilewidth * bits // 8)), np.int64)
    rows = min(page.rowsperstrip, page.imagelength)
    per_plane = -(-page.imagelength // rows)
    left = page.imagelength - np.arange(count, dtype=np.int64) % per_plane * rows
    return np.minimum(rows, left) * (-(-page.imagewidth * bits // 8))
