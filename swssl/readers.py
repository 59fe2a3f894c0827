"""Image readers: one small interface over PNG/JPEG, TIFF/BigTIFF/SVS, DICOM and NumPy files.

Every reader hands out float32 grayscale in [0, 1] for a region of one frame, so the rest of the
toolkit never sees a file format, a bit depth or a photometric convention. Huge tiled TIFFs and
multi-frame DICOMs are read lazily: only the tiles, or the one frame, that a region needs.
Format libraries are imported where they are used, so this module imports without them.
"""
from __future__ import annotations

from abc import ABC, abstractmethod

import operator
import os
from pathlib import Path

import numpy as np

from swssl.errors import ConfigError, ImageReadError

Region = tuple[int, int, int, int]  # (y, x, height, width) in pixels of one frame

INTENSITIES = ("bits", "minmax")
_LUMA = (0.299, 0.587, 0.114)  # ITU-R BT.601, the weights Pillow itself uses for RGB -> "L"
_BAND_PIXELS = 1 << 24  # the min..max scan of a frame reads bands of about this many pixels


def _reason(exc: BaseException) -> str:
    """A library exception as one short line, for the reason of an ImageReadError."""
    lines = [line.strip() for line in str(exc).strip().splitlines()] or [""]
    first = " ".join(lines[:2]) if lines[0].endswith(":") else lines[0]  # "all plugins failed:\n  a: why"
    text = f"{type(exc).__name__}: {first}" if first else type(exc).__name__
    return text if len(text) <= 160 else text[:157] + "..."


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
    """(h, w) or (h, w, colour) samples -> (h, w) floats: luminance of RGB(A), the gray of gray+alpha."""
    work = raw if raw.dtype.kind == "f" else raw.astype(np.float32 if raw.dtype.itemsize <= 2 else np.float64)
    if work.ndim == 3:
        work = work[..., :3] @ np.asarray(_LUMA, work.dtype) if work.shape[2] >= 3 else work[..., 0]
    return work


class ImageReader(ABC):
    """An image file opened for region reads of float32 grayscale in [0, 1].

    Subclasses set `shape`, `dtype`, `frames` (and `invert` for white-is-zero data) and implement
    `_raw` (the values of one region), setting `_bits`, `_signed`, `_slope` and `_intercept` where
    the stored type alone does not tell the range of those values.
    The scaling to [0, 1] lives here only, so every format maps intensities the same way.
    """

    kind = "image"
    shape: tuple[int, int]
    dtype: np.dtype
    frames = 1
    invert = False  # low stored values are bright (DICOM MONOCHROME1, TIFF min-is-white)
    _bits: int | None = None  # significant bits when fewer than the sample type holds
    _signed: bool | None = None  # None: as the sample type says
    _slope, _intercept = 1.0, 0.0  # stored -> physical values (DICOM rescale), applied by _raw

    def __init__(self, path: Path, intensity: str):
        self.path, self.intensity = path, intensity
        self._minmax: dict[int, tuple[float, float]] = {}
        self._closed = False

    @abstractmethod
    def _raw(self, y: int, x: int, h: int, w: int, frame: int) -> np.ndarray:
        """The raw stored values of one region of one frame (each format reads its own way)."""

    def _bits_range(self) -> tuple[float, float]:
        """What "bits" maps to 0..1: every value the stored samples can hold, as _raw returns them."""
        lo, hi = (v * self._slope + self._intercept for v in _stored_range(self.dtype, self._bits, self._signed))
        return min(lo, hi), max(lo, hi)

    def _frame_range(self, frame: int) -> tuple[float, float]:
        """The frame's own min..max, scanned once in row bands so a huge frame is never held whole."""
        if frame not in self._minmax:
            (height, width), lo, hi = self.shape, np.inf, -np.inf
            band = max(1, _BAND_PIXELS // width)
            for y in range(0, height, band):
                gray = _gray(self._raw(y, 0, min(band, height - y), width, frame))
                lo, hi = min(lo, float(np.nanmin(gray))), max(hi, float(np.nanmax(gray)))
            self._minmax[frame] = (lo, hi)
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
            gray = _gray(self._raw(y, x, h, w, frame))
            lo, hi = self._bits_range() if self.intensity == "bits" else self._frame_range(frame)
        except ImageReadError:
            raise
        except Exception as exc:
            raise ImageReadError(self.path, f"cannot read {self.kind} pixels ({_reason(exc)})") from None
        if not hi > lo:  # a constant frame under "minmax"
            return np.zeros((h, w), np.float32)
        out = np.clip(((hi - gray) if self.invert else (gray - lo)) / (hi - lo), 0.0, 1.0)
        if self.dtype.kind == "f":
            out = np.nan_to_num(out, nan=0.0)
        return out.astype(np.float32, copy=False)

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
    """PNG and JPEG: not tiled, so decoded whole at open and cropped per region."""

    kind = "PNG/JPEG"

    def __init__(self, path: Path, intensity: str):
        from PIL import Image

        super().__init__(path, intensity)
        with Image.open(path) as image:
            if image.mode not in ("1", "L", "I", "F") and not image.mode.startswith("I;16"):
                image = image.convert("L" if image.mode == "LA" else "RGB")
            array = np.asarray(image)
        if array.dtype == np.int32:  # mode "I": where Pillow may put 16-bit grayscale
            if array.min() < 0 or array.max() > 65535:
                raise ImageReadError(path, "32-bit integer images are not supported")
            array = array.astype(np.uint16)
        self._set_array(array.astype(array.dtype.newbyteorder("="), copy=False)[None])  # "I;16B" -> native


class _NpyReader(_ArrayReader):
    """NumPy .npy, memory-mapped: 2-D is one frame, 3-D is frames along axis 0."""

    kind = "NumPy"

    def __init__(self, path: Path, intensity: str):
        super().__init__(path, intensity)
        array = np.load(path, mmap_mode="r", allow_pickle=False)
        if array.ndim not in (2, 3):
            raise ImageReadError(path, f"expected a 2-D or 3-D array, not shape {array.shape}")
        self._set_array(array[None] if array.ndim == 2 else array)


class _TiffReader(ImageReader):
    """TIFF/BigTIFF/SVS/OME, tiled or striped, through zarr so a region reads only its tiles.

    The first series at full resolution (pyramid level 0) is the image; every axis other than
    Y, X and RGB samples (pages, channels, z, time) is flattened into frames.
    """

    kind = "TIFF"

    def __init__(self, path: Path, intensity: str):
        import tifffile
        import zarr

        super().__init__(path, intensity)
        self._tif = tifffile.TiffFile(path)
        try:
            level = self._tif.series[0].levels[0]
            page, axes, shape = level.keyframe, level.axes, level.shape
            if "Y" not in axes or "X" not in axes or 0 in shape:
                raise ImageReadError(path, f"no 2-D image in the TIFF (axes {axes}, shape {shape})")
            self._color = "S" in axes and page.photometric in (tifffile.PHOTOMETRIC.RGB, tifffile.PHOTOMETRIC.YCBCR)
            self._axes = axes
            self._frame_dims = [n for a, n in zip(axes, shape) if a not in "YX" and (a != "S" or not self._color)]
            self.frames = int(np.prod(self._frame_dims))
            self.shape = (shape[axes.index("Y")], shape[axes.index("X")])
            self.dtype, self._bits = np.dtype(level.dtype), int(page.bitspersample)
            _stored_range(self.dtype)  # refuse unusable sample types at open, not at the first read
            self.invert = page.photometric == tifffile.PHOTOMETRIC.MINISWHITE
            ends = [np.add(p.dataoffsets, p.databytecounts).max() for p in level.pages if p and p.dataoffsets]
            if max(ends, default=0) > self._tif.filehandle.size:
                raise ImageReadError(path, "truncated TIFF: image data runs past the end of the file")
            self._zarr = zarr.open(self._tif.aszarr(series=0, level=0), mode="r")
        except BaseException:
            self._tif.close()
            raise

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
    """

    kind = "DICOM"

    def __init__(self, path: Path, intensity: str):
        import pydicom
        from pydicom.pixels.utils import get_expected_length, pixel_dtype

        super().__init__(path, intensity)
        with open(path, "rb") as fh:
            ds = pydicom.dcmread(fh, stop_before_pixels=True, force=True)
            start, tag, size = fh.tell(), fh.read(4), os.fstat(fh.fileno()).st_size  # tag: what stopped it
        syntax = getattr(ds, "file_meta", {}).get("TransferSyntaxUID")
        deflated = syntax is not None and syntax.is_deflated  # then fh is not where the parser stopped
        if "Rows" not in ds or "Columns" not in ds:
            raise ImageReadError(path, "not a DICOM image (no Rows/Columns)")
        if not deflated and tag[:2] not in (b"\xe0\x7f", b"\x7f\xe0"):  # group 7FE0, either byte order
            raise ImageReadError(path, "DICOM file has no pixel data")
        photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).strip()
        if photometric == "PALETTE COLOR":
            raise ImageReadError(path, "PALETTE COLOR DICOM is not supported")
        self.shape, self.frames = (int(ds.Rows), int(ds.Columns)), int(ds.get("NumberOfFrames") or 1)
        self.dtype = pixel_dtype(ds, as_float=tag[2:] in (b"\x08\x00", b"\x09\x00", b"\x00\x08", b"\x00\x09"))
        native = syntax is not None and not deflated and not syntax.is_encapsulated
        if native and size - start < get_expected_length(ds, "bytes") + 8:
            raise ImageReadError(path, "truncated DICOM: less pixel data than the header describes")
        self.invert = photometric == "MONOCHROME1"
        monochrome = int(ds.get("SamplesPerPixel") or 1) == 1
        self._slope = float(ds.get("RescaleSlope") or 1.0) if monochrome else 1.0
        self._intercept = float(ds.get("RescaleIntercept") or 0.0) if monochrome else 0.0
        self._bits, self._signed = int(ds.get("BitsStored") or 0) or None, ds.get("PixelRepresentation") == 1
        self._frame: tuple[int, np.ndarray] | None = None

    def _raw(self, y: int, x: int, h: int, w: int, frame: int) -> np.ndarray:
        if self._frame is None or self._frame[0] != frame:
            from pydicom.pixels import pixel_array

            self._frame = None  # free the old frame before decoding the next
            self._frame = (frame, pixel_array(os.fspath(self.path), index=frame))
        region = self._frame[1][y : y + h, x : x + w]
        if (self._slope, self._intercept) != (1.0, 0.0):
            region = region * self._slope + self._intercept
        return region

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
    """The reader by suffix, else DICOM by "DICM" after the 128-byte preamble (names like 1.2.840.5)."""
    if path.suffix.lower() in _READERS:
        return _READERS[path.suffix.lower()]
    with open(path, "rb") as fh:
        return _DicomReader if fh.read(132)[128:] == b"DICM" else None


def open_image(path: str | Path, intensity: str = "bits") -> ImageReader:
    """Open an image for lazy region reads; ImageReadError for anything that cannot be read."""
    if intensity not in INTENSITIES:
        raise ConfigError(f"intensity must be 'bits' or 'minmax', not {intensity!r}")
    path = Path(path)
    if not path.exists():
        raise ImageReadError(path, "file not found")
    if path.is_dir():
        raise ImageReadError(path, "is a directory, not an image file")
    try:
        empty, cls = path.stat().st_size == 0, _reader_class(path)
    except OSError as exc:
        raise ImageReadError(path, f"cannot read ({_reason(exc)})") from None
    if empty:
        raise ImageReadError(path, "empty file")
    if cls is None:
        raise ImageReadError(path, f"unsupported file type {path.suffix.lower() or '(no suffix)'!r}")
    try:
        return cls(path, intensity)
    except ImageReadError:
        raise
    except Exception as exc:
        raise ImageReadError(path, f"cannot open as {cls.kind} ({_reason(exc)})") from None


def read_image(path: str | Path, intensity: str = "bits", frame: int = 0) -> np.ndarray:
    """The whole of one frame as float32 (h, w) grayscale in [0, 1]."""
    with open_image(path, intensity) as reader:
        return reader.read(frame=frame)
