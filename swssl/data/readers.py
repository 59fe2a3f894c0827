"""Image readers: one small interface over PNG/JPEG, TIFF/BigTIFF/SVS, DICOM and NumPy files.

Every reader hands out float32 grayscale in [0, 1] for a region of one frame, so the rest of the
toolkit never sees a file format, a bit depth or a photometric convention. Huge tiled TIFFs and
multi-frame DICOMs are read lazily: only the tiles, or the one frame, that a region needs.
Format libraries are imported where they are used, so this module imports without them.

The readers are strict: a file that is not a regular file, declares frames above the pixel limit,
holds fewer bytes than its header declares, decodes with an error or a complaint, or holds NaN/inf
pixels is refused with an ImageReadError whose one-line reason names the problem. Nothing is padded
or zero-filled. Sizes are checked from the header, before anything is allocated or decoded.
"""
from __future__ import annotations

from abc import ABC, abstractmethod

import operator
import os
import stat
import struct
import zlib
from pathlib import Path
from typing import IO, TYPE_CHECKING

import numpy as np

from swssl.errors import ConfigError, ImageReadError
from swssl.data.limits import DEFAULT_MAX_PIXELS
from swssl.data.integrity import (END_MARKERS, TIFF_CODESTREAMS, PydicomWarnings, ShortReads, codestream_size,
                                  ends_with_marker, png_missing, read_at, segment_bytes, strict_pillow)

if TYPE_CHECKING:
    import pydicom
    import tifffile

Region = tuple[int, int, int, int]  # (y, x, height, width) in pixels of one frame

INTENSITIES = ("bits", "minmax")
_LUMA = (0.299, 0.587, 0.114)  # ITU-R BT.601, the weights Pillow itself uses for RGB -> "L"
_BAND_PIXELS = 1 << 24  # the min..max scan of a frame reads bands of about this many pixels
_SPECIAL_FILES = ((stat.S_ISFIFO, "FIFO"), (stat.S_ISCHR, "character device"), (stat.S_ISBLK, "block device"),
                  (stat.S_ISSOCK, "socket"))


def _shortened(text: str) -> str:
    """At most 160 characters, for the reason of an ImageReadError."""
    return text if len(text) <= 160 else text[:157] + "..."


def _reason(exc: BaseException) -> str:
    """A library exception as one short line, for the reason of an ImageReadError."""
    lines = [line.strip() for line in str(exc).strip().splitlines()] or [""]
    first = " ".join(lines[:2]) if lines[0].endswith(":") else lines[0]  # "all plugins failed:\n  a: why"
    return _shortened(f"{type(exc).__name__}: {first}" if first else type(exc).__name__)


def _decoder_failure(exc: BaseException) -> bool:
    """Any Exception, or a Rust panic (pylibjpeg-rle on garbled data), which derives from BaseException."""
    return isinstance(exc, Exception) or type(exc).__name__ == "PanicException"


def _stored_range(dtype: np.dtype, bits: int | None = None, signed: bool | None = None) -> tuple[float, float]:
    """The values a sample type (or its lowest `bits` bits) can hold; float data is taken as 0..1."""
    dtype = np.dtype(dtype)
    if dtype.kind in "fb":
        return 0.0, 1.0
    if dtype.kind not in "ui":
        raise ValueError(f"unsupported sample type {dtype}")
    bits = bits or dtype.itemsize * 8
    if signed or (signed is None and dtype.kind == "i"):
        return -(2.0 ** (bits - 1)), 2.0 ** (bits - 1) - 1
    return 0.0, 2.0**bits - 1


def _gray(raw: np.ndarray) -> np.ndarray:
    """(h, w) or (h, w, colour) samples -> (h, w) floats: luminance of RGB(A), the gray of gray+alpha.

    float32, or float64 for samples float32 cannot hold exactly (32/64-bit integers, float64); 2-D
    samples of that float type come back as they are, anything else as a new array.
    """
    ftype = np.float64 if raw.dtype.itemsize > 2 and raw.dtype != np.float32 else np.float32
    if raw.ndim == 3 and raw.shape[2] >= 3:  # one channel at a time: no float copy of all three
        gray = np.multiply(raw[..., 0], _LUMA[0], dtype=ftype)
        for channel in (1, 2):
            gray += np.multiply(raw[..., channel], _LUMA[channel], dtype=ftype)
        return gray
    plane = raw[..., 0] if raw.ndim == 3 else raw
    return plane if plane.dtype == ftype else plane.astype(ftype)


class ImageReader(ABC):
    """An image file opened for region reads of float32 grayscale in [0, 1].

    Subclasses set `shape`, `dtype`, `frames` (and `invert` for white-is-zero data), check the frame
    size with `_limit` before allocating or decoding anything, and implement `_raw` (the stored
    values of one region), setting `_bits`, `_signed`, `_slope` and `_intercept` where the stored
    type alone does not tell the range and meaning of those values.
    The scaling to [0, 1] lives here only, so every format maps intensities the same way.
    """

    kind = "image"
    shape: tuple[int, int]
    dtype: np.dtype
    frames = 1
    invert = False  # low stored values are bright (DICOM MONOCHROME1, TIFF min-is-white)
    _bits: int | None = None  # significant bits when fewer than the sample type holds
    _signed: bool | None = None  # None: as the sample type says
    _slope, _intercept = 1.0, 0.0  # stored -> physical values (DICOM rescale)

    def __init__(self, path: Path, intensity: str, max_pixels: int | None):
        self.path, self.intensity, self.max_pixels = path, intensity, max_pixels
        self._minmax: dict[int, tuple[float, float]] = {}
        self._closed = False

    @abstractmethod
    def _raw(self, y: int, x: int, h: int, w: int, frame: int) -> np.ndarray:
        """The raw stored values of one region of one frame (each format reads its own way)."""

    def _limit(self, height: int, width: int) -> None:
        """Refuse frames above the pixel limit: called with the header's size, before any decoding."""
        if self.max_pixels is not None and height * width > self.max_pixels:
            raise ImageReadError(self.path, f"image of {height} x {width} px is larger than the pixel limit "
                                            f"of {self.max_pixels} (--max-pixels)")

    @property
    def bit_depth(self) -> int:
        """Significant bits per stored sample (a float image: its float size), as the domain check compares."""
        return self._bits or self.dtype.itemsize * 8

    def _nonfinite(self, gray: np.ndarray) -> int:
        """How many NaN/inf values float data holds (integer data holds none)."""
        return gray.size - int(np.count_nonzero(np.isfinite(gray))) if self.dtype.kind == "f" else 0

    def _bits_range(self) -> tuple[float, float]:
        """What "bits" maps to 0..1: every physical value the stored samples can hold."""
        lo, hi = (v * self._slope + self._intercept for v in _stored_range(self.dtype, self._bits, self._signed))
        return min(lo, hi), max(lo, hi)

    def _frame_range(self, frame: int) -> tuple[float, float]:
        """The frame's own physical min..max, scanned once in row bands so a huge frame is never held whole."""
        if frame not in self._minmax:
            (height, width), lo, hi, bad = self.shape, np.inf, -np.inf, 0
            band = max(1, _BAND_PIXELS // width)
            for y in range(0, height, band):
                gray = _gray(self._raw(y, 0, min(band, height - y), width, frame))
                bad += self._nonfinite(gray)
                lo, hi = min(lo, float(gray.min())), max(hi, float(gray.max()))
            if bad:
                raise ImageReadError(self.path, f"{bad} NaN/inf pixel value(s) in frame {frame}")
            lo, hi = lo * self._slope + self._intercept, hi * self._slope + self._intercept
            self._minmax[frame] = (min(lo, hi), max(lo, hi))
        return self._minmax[frame]

    def _check(self, region: Region | None, frame: int) -> Region:
        if self._closed:
            raise ImageReadError(self.path, "reader is closed")
        if not isinstance(frame, (int, np.integer)) or not 0 <= frame < self.frames:
            raise ImageReadError(self.path, f"frame {frame!r} out of range: the file has {self.frames} frame(s)")
        height, width = self.shape
        if region is None:
            return 0, 0, height, width
        try:
            y, x, h, w = map(operator.index, region)
        except (TypeError, ValueError):
            raise ImageReadError(self.path, f"region {region!r} is not (y, x, height, width)") from None
        if h <= 0 or w <= 0 or y < 0 or x < 0 or y + h > height or x + w > width:
            raise ImageReadError(self.path, f"region {(y, x, h, w)} is outside the {height} x {width} image")
        return y, x, h, w

    def read(self, region: Region | None = None, frame: int = 0) -> np.ndarray:
        """float32 (h, w) grayscale in [0, 1] of `region` (None: the whole frame) of `frame`."""
        y, x, h, w = self._check(region, frame)
        try:
            raw = self._raw(y, x, h, w, frame)
            gray = _gray(raw)
            if bad := self._nonfinite(gray):
                where = f"frame {frame}" if region is None else f"rows {y}-{y + h - 1} of frame {frame}"
                raise ImageReadError(self.path, f"{bad} NaN/inf pixel value(s) in {where}")
            lo, hi = self._bits_range() if self.intensity == "bits" else self._frame_range(frame)
        except ImageReadError:
            raise
        except Exception as exc:
            raise ImageReadError(self.path, f"cannot read {self.kind} pixels ({_reason(exc)})") from None
        if not hi > lo:  # a constant frame under "minmax"
            return np.zeros((h, w), np.float32)
        return self._scaled(raw, gray, lo, hi)

    def _scaled(self, raw: np.ndarray, gray: np.ndarray, lo: float, hi: float) -> np.ndarray:
        """Physical values (gray x slope + intercept) from lo..hi (hi..lo when inverted) to 0..1, clipped.

        In place, in one float32 array: `gray` itself when it is a float32 temporary of _gray's, else
        a new one. A float64 temporary keeps the precision of 32-bit samples up to the division.
        """
        own = gray is not raw and gray.base is None  # _gray's own array, free to overwrite
        out = gray if own and gray.dtype == np.float32 else np.empty(gray.shape, np.float32)
        work = gray if own else out
        if (self._slope, self._intercept) == (1.0, 0.0):
            if self.invert:
                np.subtract(hi, gray, out=work)
            else:
                np.subtract(gray, lo, out=work)
        else:
            np.multiply(gray, -self._slope if self.invert else self._slope, out=work)
            work += hi - self._intercept if self.invert else self._intercept - lo
        np.divide(work, hi - lo, out=out)
        return np.clip(out, 0.0, 1.0, out=out)

    def close(self) -> None:
        """Release the file; reads afterwards raise ImageReadError."""
        self._closed = True

    def __enter__(self) -> ImageReader:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class _ArrayReader(ImageReader):
    """Frames held as one (frames, h, w[, colour]) array: decoded pixels or a memory map."""

    def _set_array(self, array: np.ndarray) -> None:
        if array.ndim not in (3, 4) or 0 in array.shape:
            raise ImageReadError(self.path, f"expected a 2-D image or a stack of them, not shape {array.shape[1:]}")
        _stored_range(array.dtype)  # refuse unusable sample types at open, not at the first read
        self._array, self.frames, self.shape, self.dtype = array, array.shape[0], array.shape[1:3], array.dtype

    def _raw(self, y: int, x: int, h: int, w: int, frame: int) -> np.ndarray:
        return np.asarray(self._array[frame, y : y + h, x : x + w])

    def close(self) -> None:
        self._array = None
        super().close()


class _PillowReader(_ArrayReader):
    """PNG and JPEG: not tiled, so decoded whole at open and cropped per region.

    Truncated data is an error (Pillow's LOAD_TRUNCATED_IMAGES is off for the load), and so is a
    PNG whose compressed data ends before its last row, which Pillow would zero-fill.
    """

    kind = "PNG/JPEG"

    def __init__(self, path: Path, intensity: str, max_pixels: int | None):
        from PIL import Image

        super().__init__(path, intensity, max_pixels)
        with strict_pillow(), Image.open(path) as image:
            self._limit(image.height, image.width)
            if image.format == "PNG":
                try:
                    missing = png_missing(path)
                except zlib.error as exc:
                    raise ImageReadError(path, f"corrupt PNG data ({_reason(exc)})") from None
                if missing:
                    raise ImageReadError(path, f"truncated PNG: its compressed data holds {missing[0]} of the "
                                               f"{missing[1]} bytes of pixel rows the header declares")
            try:
                image.load()
            except OSError as exc:
                reason = f"corrupt or truncated {image.format} data (decoder: {_reason(exc)})"
                raise ImageReadError(path, reason) from None
            if image.mode not in ("1", "L", "I", "F") and not image.mode.startswith("I;16"):
                image = image.convert("L" if image.mode == "LA" else "RGB")
            array = np.asarray(image)
        if array.dtype == np.int32:  # mode "I": where Pillow may put 16-bit grayscale
            if array.min() < 0 or array.max() > 65535:
                raise ImageReadError(path, "32-bit integer images are not supported")
            array = array.astype(np.uint16)
        self._set_array(array.astype(array.dtype.newbyteorder("="), copy=False)[None])  # "I;16B" -> native


class _NpyReader(_ArrayReader):
    """NumPy .npy, memory-mapped, never unpickled. The layout by shape: H x W is one frame;
    H x W x 3 or H x W x 4 is one RGB(A) frame, read as its luminance; any other N x H x W is N
    frames. The header is checked (magic, dtype, shape, size against the bytes present) before
    the data is mapped."""

    kind = "NumPy"

    def __init__(self, path: Path, intensity: str, max_pixels: int | None):
        super().__init__(path, intensity, max_pixels)
        with open(path, "rb") as fh:
            try:
                version = np.lib.format.read_magic(fh)
            except ValueError:
                raise ImageReadError(path, "not a .npy file (no NumPy header)") from None
            readers = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
            if version not in readers:
                raise ImageReadError(path, f"unsupported .npy format version {version[0]}.{version[1]}")
            shape, _, dtype = readers[version](fh)
            held = os.fstat(fh.fileno()).st_size - fh.tell()
        if dtype.hasobject:
            raise ImageReadError(path, "the .npy holds Python objects (pickled data); refusing to unpickle it")
        if len(shape) not in (2, 3):
            raise ImageReadError(path, f"unsupported .npy shape {shape}: expected H x W, N x H x W frames, "
                                       "or H x W x 3/4 colour")
        stacked = len(shape) == 3 and shape[2] not in (3, 4)
        self._limit(*(shape[1:] if stacked else shape[:2]))
        declared = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        if held < declared:
            raise ImageReadError(path, f"truncated .npy: the header declares {declared} bytes of pixel data, "
                                       f"the file holds {held}")
        array = np.load(path, mmap_mode="r", allow_pickle=False)
        self._set_array(array if stacked else array[None])


class _TiffReader(ImageReader):
    """TIFF/BigTIFF/SVS/OME, tiled or striped, through zarr so a region reads only its tiles.

    The first series at full resolution (pyramid level 0) is the image; every axis other than
    Y, X and RGB samples (pages, channels, z, time) is flattened into frames.
    """

    kind = "TIFF"

    def __init__(self, path: Path, intensity: str, max_pixels: int | None):
        import tifffile
        import zarr

        super().__init__(path, intensity, max_pixels)
        self._tif = tifffile.TiffFile(path)
        try:
            level = self._tif.series[0].levels[0]
            page, axes, shape = level.keyframe, level.axes, level.shape
            if "Y" not in axes or "X" not in axes or 0 in shape:
                raise ImageReadError(path, f"no 2-D image in the TIFF (axes {axes}, shape {shape})")
            self.shape = (shape[axes.index("Y")], shape[axes.index("X")])
            self._limit(*self.shape)
            self._color = "S" in axes and page.photometric in (tifffile.PHOTOMETRIC.RGB, tifffile.PHOTOMETRIC.YCBCR)
            self._axes = axes
            self._frame_dims = [n for a, n in zip(axes, shape) if a not in "YX" and (a != "S" or not self._color)]
            self.frames = int(np.prod(self._frame_dims))
            self.dtype, self._bits = np.dtype(level.dtype), int(page.bitspersample)
            _stored_range(self.dtype)  # refuse unusable sample types at open, not at the first read
            self.invert = page.photometric == tifffile.PHOTOMETRIC.MINISWHITE
            pages = [p for p in level.pages if p is not None and p.dataoffsets]
            size = self._tif.filehandle.size
            end = max((int(np.add(p.dataoffsets, p.databytecounts).max()) for p in pages), default=0)
            if end > size:
                raise ImageReadError(path, f"truncated TIFF: image data runs to byte {end}, the file holds {size}")
            self._check_segments(pages)
            self._zarr = zarr.open(self._tif.aszarr(series=0, level=0), mode="r")
        except BaseException:
            self._tif.close()
            raise

    def _check_segments(self, pages: list[tifffile.TiffPage | tifffile.TiffFrame]) -> None:
        """Each strip or tile against its header: uncompressed ones must hold every byte the image
        needs, JPEG and JPEG 2000 ones must end with their end marker (imagecodecs decodes cut or
        garbled ones without a complaint, padding them)."""
        with open(self.path, "rb", buffering=0) as fh:  # one small read per segment: no buffer to refill
            for page in pages:
                key, counts = page.keyframe, np.asarray(page.databytecounts, np.int64)
                segment = "tile" if key.is_tiled else "strip"
                if key.compression == 1 and key.photometric != 6:  # uncompressed, not subsampled YCbCr
                    needed = segment_bytes(key, len(counts))
                    short = np.flatnonzero((counts > 0) & (counts < needed))  # 0 bytes: a tile left empty
                    if short.size:
                        i = int(short[0])
                        raise ImageReadError(self.path, f"truncated TIFF: {segment} {i} of page {page.index} holds "
                                                        f"{counts[i]} bytes, the image needs {needed[i]}")
                codec = TIFF_CODESTREAMS.get(int(key.compression))
                if codec is None:
                    continue
                for i, (offset, count) in enumerate(zip(page.dataoffsets, counts)):
                    if count and not ends_with_marker(read_at(fh, offset + max(0, count - 64), min(count, 64))):
                        raise ImageReadError(self.path, f"corrupt or truncated {codec} data in {segment} {i} of page "
                                                        f"{page.index} (the codestream does not end with its "
                                                        f"{END_MARKERS[codec]} marker)")

    def _raw(self, y: int, x: int, h: int, w: int, frame: int) -> np.ndarray:
        index = iter(np.unravel_index(frame, self._frame_dims))  # this frame's place on the other axes
        kept = [a for a in self._axes if a in "YX" or (a == "S" and self._color)]
        spans = {"Y": slice(y, y + h), "X": slice(x, x + w), "S": slice(None)}
        region = np.asarray(self._zarr[tuple(spans[a] if a in kept else int(next(index)) for a in self._axes)])
        return np.moveaxis(region, kept.index("S"), -1) if self._color else region

    def close(self) -> None:
        self._tif.close()
        super().close()


class _DicomReader(ImageReader):
    """DICOM through pydicom: the header at open, one frame decoded per read (the last one cached).

    Values are rescaled by RescaleSlope/Intercept; MONOCHROME1 is inverted so that bright means
    dense as in MONOCHROME2. Compressed transfer syntaxes decode through pydicom's plugins.
    At open the header is checked for a cut and for element lengths running past the end of the
    file, native pixel data for its full length, and encapsulated pixel data for whole fragments;
    each frame is checked again as it is decoded (see _check_codestream and _decode).
    """

    kind = "DICOM"

    def __init__(self, path: Path, intensity: str, max_pixels: int | None):
        import math

        from pydicom import uid
        from pydicom.pixels import get_decoder
        from pydicom.pixels.utils import get_expected_length, pixel_dtype

        super().__init__(path, intensity, max_pixels)
        with open(path, "rb") as fh:
            size = os.fstat(fh.fileno()).st_size
            ds, syntax = self._header(fh, size)
            start, head = fh.tell(), fh.read(12)  # head: the element that stopped the parse
            if "Rows" not in ds or "Columns" not in ds:
                raise ImageReadError(path, "not a DICOM image (no Rows/Columns)")
            if head[:2] not in (b"\xe0\x7f", b"\x7f\xe0"):  # group 7FE0, either byte order
                raise ImageReadError(path, "DICOM file has no pixel data")
            photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).strip()
            if photometric == "PALETTE COLOR":
                raise ImageReadError(path, "PALETTE COLOR DICOM is not supported")
            self.shape, self.frames = (int(ds.Rows), int(ds.Columns)), int(ds.get("NumberOfFrames") or 1)
            self._limit(*self.shape)
            self.dtype = pixel_dtype(ds, as_float=head[2:4] in (b"\x08\x00", b"\x09\x00", b"\x00\x08", b"\x00\x09"))
            if syntax is not None:
                try:
                    decodable = get_decoder(syntax).is_available
                except NotImplementedError:
                    decodable = False
                if not decodable:
                    raise ImageReadError(path, f"no decoder installed for DICOM transfer syntax {syntax.name}")
            codecs = (("JPEG 2000", uid.JPEG2000TransferSyntaxes), ("JPEG-LS", uid.JPEGLSTransferSyntaxes),
                      ("JPEG", uid.JPEGTransferSyntaxes), ("RLE", uid.RLETransferSyntaxes))
            self._codec = next((name for name, syntaxes in codecs if syntax in syntaxes), "DICOM pixel")
            self._fragments: list[tuple[int, int]] = []  # (offset, length) of each encapsulated fragment
            implicit, little = ds.original_encoding
            length_at = 4 if implicit else 8  # after the tag, or the tag, VR and 2 reserved bytes (OB/OW/...)
            value_at = start + length_at + 4
            if syntax is not None and syntax.is_encapsulated:
                with open(path, "rb", buffering=0) as items:  # 8 bytes at a time: no buffer to refill
                    self._fragments = self._walk_fragments(items, value_at, size)
            else:
                expected, held = get_expected_length(ds, "bytes"), max(0, size - value_at)
                declared = int.from_bytes(head[length_at : length_at + 4], "little" if little else "big")
                if held < expected:  # an odd length is padded to even, but the pad byte itself may be missing
                    raise ImageReadError(path, f"truncated DICOM: the header describes {expected} bytes of "
                                               f"pixel data, the file holds {held}")
                if declared < expected:
                    raise ImageReadError(path, f"corrupt DICOM: the pixel data element declares {declared} "
                                               f"bytes, the image needs {expected}")
        self.invert = photometric == "MONOCHROME1"
        monochrome = int(ds.get("SamplesPerPixel") or 1) == 1
        self._slope = float(ds.get("RescaleSlope") or 1.0) if monochrome else 1.0
        self._intercept = float(ds.get("RescaleIntercept") or 0.0) if monochrome else 0.0
        if not (math.isfinite(self._slope) and math.isfinite(self._intercept)):
            raise ImageReadError(path, f"invalid RescaleSlope/RescaleIntercept ({self._slope}, {self._intercept})")
        self._bits, self._signed = int(ds.get("BitsStored") or 0) or None, ds.get("PixelRepresentation") == 1
        self._frame: tuple[int, np.ndarray] | None = None

    def _header(self, fh: IO[bytes], size: int) -> tuple[pydicom.Dataset, pydicom.uid.UID | None]:
        """The header up to the pixel data, and its transfer syntax. pydicom stops quietly where the
        file ends, so a header cut short, or an element whose length runs past the end, is found here."""
        import pydicom
        from pydicom.dataelem import RawDataElement
        from pydicom.valuerep import EXPLICIT_VR_LENGTH_32

        watched = ShortReads(fh)
        try:
            ds = pydicom.dcmread(watched, stop_before_pixels=True, force=True, defer_size=1 << 20)
        except Exception:
            if watched.cut is None:
                raise
            raise ImageReadError(self.path, f"truncated DICOM (header cut at byte {size})") from None
        syntax = ds.file_meta.get("TransferSyntaxUID")
        if syntax is not None and syntax.is_deflated:  # pydicom's frame decoding does not inflate
            raise ImageReadError(self.path, f"DICOM transfer syntax {syntax.name} is not supported")
        over = next((e for e in (*ds.file_meta.elements(), *ds.elements())  # values over 1 MiB were skipped
                     if isinstance(e, RawDataElement) and e.length != 0xFFFFFFFF and e.value_tell + e.length > size),
                    None)
        if over is not None:
            at = over.value_tell - (12 if not over.is_implicit_VR and over.VR in EXPLICIT_VR_LENGTH_32 else 8)
            if over.length > size:  # no cut of this file explains it
                raise ImageReadError(self.path, f"corrupt DICOM element length (tag {over.tag} at byte {at} declares "
                                                f"{over.length} bytes, {max(0, size - over.value_tell)} remain)")
            raise ImageReadError(self.path, f"truncated DICOM (header cut at byte {size}, inside tag {over.tag} "
                                            f"at byte {at}, which declares {over.length} bytes)")
        if watched.cut is not None:
            at, asked, got = watched.cut
            if asked > size:  # a value read that no cut could explain (an element pydicom converted)
                raise ImageReadError(self.path, f"corrupt DICOM element length (the value at byte {at} declares "
                                                f"{asked} bytes, {got} remain)")
            raise ImageReadError(self.path, f"truncated DICOM (header cut at byte {size})")
        return ds, syntax

    def _walk_fragments(self, fh: IO[bytes], at: int, size: int) -> list[tuple[int, int]]:
        """(offset, length) of each fragment of the encapsulated pixel data (the offset table left out),
        after checking that each is whole and that there is one for every frame at least."""
        items = []
        while len(item := read_at(fh, at, 8)) == 8:
            group, element, length = struct.unpack("<HHI", item)
            if (group, element) == (0xFFFE, 0xE0DD):  # the sequence delimiter
                break
            if (group, element) != (0xFFFE, 0xE000):
                raise ImageReadError(self.path, f"corrupt DICOM: tag ({group:04X},{element:04X}) at byte {at} "
                                                "inside the encapsulated pixel data")
            if at + 8 + length > size:
                raise ImageReadError(self.path, f"truncated DICOM: the pixel data fragment at byte {at} declares "
                                                f"{length} bytes, {size - at - 8} remain")
            items.append((at + 8, length))
            at += 8 + length
        else:  # no delimiter: tolerated right at the end of the file, as every fragment is whole
            if at != size:
                raise ImageReadError(self.path, f"truncated DICOM (pixel data cut at byte {size})")
        if len(items) - 1 < self.frames:
            raise ImageReadError(self.path, f"truncated DICOM: {max(0, len(items) - 1)} pixel data fragment(s) "
                                            f"for {self.frames} frame(s)")
        return items[1:]

    def _check_codestream(self, frame: int) -> None:
        """What the JPEG decoders let through: a JPEG/JPEG-LS/JPEG 2000 frame that does not end with
        its end marker (pylibjpeg-libjpeg and pylibjpeg-openjpeg decode cut or garbled codestreams
        without a complaint, padding them), or one of another size than the header's (which pydicom
        would reshape into garbage). Checked where the frame's fragments are known: one fragment per
        frame, or the first and last fragment of the first and last frame."""
        marker, count = END_MARKERS.get(self._codec), len(self._fragments)
        if marker is None:
            return
        first = frame if count == self.frames else 0 if frame == 0 else None
        last = frame if count == self.frames else count - 1 if frame == self.frames - 1 else None
        with open(self.path, "rb") as fh:
            if last is not None:
                at, length = self._fragments[last]
                if not ends_with_marker(read_at(fh, at + max(0, length - 64), min(length, 64))):
                    raise ImageReadError(self.path, f"corrupt or truncated {self._codec} data in frame {frame} "
                                                    f"(the codestream does not end with its {marker} marker)")
            if first is not None:
                at, length = self._fragments[first]
                size = codestream_size(read_at(fh, at, min(length, 1 << 16)))
                if size is not None and size != self.shape:
                    raise ImageReadError(self.path, f"corrupt {self._codec} data in frame {frame} (its codestream "
                                                    f"is {size[0]} x {size[1]} px, the DICOM header says "
                                                    f"{self.shape[0]} x {self.shape[1]})")

    def _decode(self, frame: int) -> np.ndarray:
        """One frame, decoded by pydicom: a decoder's error or pydicom's warning of damaged data is an error."""
        from pydicom.pixels import pixel_array

        self._check_codestream(frame)
        problem = f"corrupt or truncated {self._codec} data in frame {frame}"
        with PydicomWarnings() as warned:
            try:
                pixels = pixel_array(os.fspath(self.path), index=frame)
            except BaseException as exc:
                if not _decoder_failure(exc):
                    raise
                raise ImageReadError(self.path, f"{problem} (decoder: {_reason(exc)})") from None
        if warned.damage:
            raise ImageReadError(self.path, _shortened(f"{problem} (pydicom: {warned.damage[0]})"))
        return pixels

    def _raw(self, y: int, x: int, h: int, w: int, frame: int) -> np.ndarray:
        if self._frame is None or self._frame[0] != frame:
            self._frame = None  # free the old frame before decoding the next
            self._frame = (frame, self._decode(frame))
        return self._frame[1][y : y + h, x : x + w]

    def close(self) -> None:
        self._frame = None
        super().close()


_READERS: dict[str, type[ImageReader]] = {
    **dict.fromkeys((".png", ".jpg", ".jpeg"), _PillowReader),
    **dict.fromkeys((".tif", ".tiff", ".svs"), _TiffReader),
    **dict.fromkeys((".dcm", ".dicom"), _DicomReader),
    ".npy": _NpyReader,
}
SUPPORTED_SUFFIXES = frozenset(_READERS)  # plus DICOM under any name, found by its "DICM" magic


def _reader_class(path: Path) -> type[ImageReader] | None:
    """The reader by suffix, else DICOM by "DICM" after the 128-byte preamble (names like 1.2.840.5).

    Reads the file only for a name without a known suffix; open_image calls it for regular files only.
    """
    if path.suffix.lower() in _READERS:
        return _READERS[path.suffix.lower()]
    with open(path, "rb") as fh:
        return _DicomReader if fh.read(132)[128:] == b"DICM" else None


def open_image(path: str | Path, intensity: str = "bits", *,
               max_pixels: int | None = DEFAULT_MAX_PIXELS) -> ImageReader:
    """Open an image for lazy region reads; ImageReadError for anything that cannot be read.

    Only regular files are opened (a FIFO or device is refused from its stat, never opened), and
    frames of more than `max_pixels` pixels (height x width; None: no limit) are refused from the header.
    """
    if intensity not in INTENSITIES:
        raise ConfigError(f"intensity must be 'bits' or 'minmax', not {intensity!r}")
    if max_pixels is not None and max_pixels < 1:
        raise ConfigError(f"max_pixels must be at least 1, not {max_pixels}")
    path = Path(path)
    try:
        info = path.stat()
    except (FileNotFoundError, NotADirectoryError):
        raise ImageReadError(path, "file not found") from None
    except OSError as exc:
        raise ImageReadError(path, f"cannot read ({_reason(exc)})") from None
    if stat.S_ISDIR(info.st_mode):
        raise ImageReadError(path, "is a directory, not an image file")
    if not stat.S_ISREG(info.st_mode):
        kind = next((name for test, name in _SPECIAL_FILES if test(info.st_mode)), "special file")
        raise ImageReadError(path, f"not a regular file ({kind})")
    if info.st_size == 0:
        raise ImageReadError(path, "empty file")
    try:
        cls = _reader_class(path)
    except OSError as exc:
        raise ImageReadError(path, f"cannot read ({_reason(exc)})") from None
    if cls is None:
        raise ImageReadError(path, f"unsupported file type {path.suffix.lower() or '(no suffix)'!r}")
    try:
        return cls(path, intensity, max_pixels)
    except ImageReadError:
        raise
    except Exception as exc:
        raise ImageReadError(path, f"cannot open as {cls.kind} ({_reason(exc)})") from None


def read_image(path: str | Path, intensity: str = "bits", frame: int = 0, *,
               max_pixels: int | None = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """The whole of one frame as float32 (h, w) grayscale in [0, 1]."""
    with open_image(path, intensity, max_pixels=max_pixels) as reader:
        return reader.read(frame=frame)
