"""Readers: every format gives float32 grayscale in [0, 1] equal to an independent computation."""
from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tracemalloc
import warnings
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pydicom
import pytest
import tifffile
from PIL import Image, ImageFile
from pydicom.data import get_testdata_file
from pydicom.encaps import encapsulate, generate_frames

from swssl.data import readers
from swssl.errors import ConfigError, ImageReadError
from swssl.data.readers import DEFAULT_MAX_PIXELS, SUPPORTED_SUFFIXES, open_image, read_image

RNG = np.random.default_rng(7)
LUMA = np.array([0.299, 0.587, 0.114])


def dicom_file(name: str) -> str:
    """A pydicom test file (from the wheel or pydicom-data), never downloaded."""
    path = get_testdata_file(name, download=False)
    if path is None:
        pytest.skip(f"pydicom test file {name} is not installed")
    return path


def stored(name: str) -> tuple[pydicom.Dataset, np.ndarray]:
    ds = pydicom.dcmread(dicom_file(name))
    return ds, ds.pixel_array.astype(np.float64)


def bits_scaled(ds: pydicom.Dataset, px: np.ndarray) -> np.ndarray:
    """Rescaled values over the rescaled range of everything BitsStored can hold (float64)."""
    bits, slope, icpt = ds.BitsStored, float(ds.get("RescaleSlope", 1)), float(ds.get("RescaleIntercept", 0))
    lo, hi = (-(2.0 ** (bits - 1)), 2.0 ** (bits - 1) - 1) if ds.PixelRepresentation else (0.0, 2.0**bits - 1)
    lo, hi = sorted((lo * slope + icpt, hi * slope + icpt))
    return ((px * slope + icpt) - lo) / (hi - lo)


def check(actual: np.ndarray, expected: np.ndarray, atol: float = 1e-6) -> None:
    """float32 output against a float64 expectation: exact after rounding when atol is 0."""
    assert actual.dtype == np.float32 and actual.shape == expected.shape
    if atol == 0:
        np.testing.assert_array_equal(actual, expected.astype(np.float32))
    else:
        np.testing.assert_allclose(actual, expected, rtol=0, atol=atol)


# --- DICOM --------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["RG3_UNCR.dcm", "6154"])  # 10-bit; 12-bit with slope 0.684, no suffix
def test_monochrome1_is_inverted(name):
    ds, px = stored(name)
    assert ds.PhotometricInterpretation == "MONOCHROME1"
    with open_image(dicom_file(name)) as reader:
        assert reader.shape == px.shape and reader.frames == 1 and reader.dtype == np.uint16
        check(reader.read(), 1.0 - bits_scaled(ds, px))


def test_multiframe_frames_are_independent():
    ds, px = stored("emri_small.dcm")
    assert px.shape == (10, 64, 64)
    with open_image(dicom_file("emri_small.dcm")) as reader:
        assert reader.frames == 10 and reader.shape == (64, 64)
        for k in (0, 3, 9):
            check(reader.read(frame=k), px[k] / 4095)
        check(reader.read((5, 6, 20, 30), frame=4), px[4, 5:25, 6:36] / 4095)


def test_multiframe_rgb_becomes_luminance():
    ds, px = stored("SC_rgb_rle_2frame.dcm")
    with open_image(dicom_file("SC_rgb_rle_2frame.dcm")) as reader:
        assert reader.frames == 2
        for k in range(2):
            check(reader.read(frame=k), px[k] @ LUMA / 255)


def test_dicom_decodes_one_frame_per_read_and_caches_it(monkeypatch):
    calls = []
    decode = pydicom.pixels.pixel_array
    monkeypatch.setattr(pydicom.pixels, "pixel_array", lambda *a, **k: calls.append(k.get("index")) or decode(*a, **k))
    with open_image(dicom_file("emri_small.dcm")) as reader:
        assert calls == []  # nothing decoded at open
        reader.read((0, 0, 8, 8), frame=3)
        reader.read(frame=3)
        reader.read(frame=5)
    assert calls == [3, 5]


def test_rescale_slope_intercept_ct():
    ds, px = stored("CT_small.dcm")
    assert (ds.RescaleSlope, ds.RescaleIntercept, ds.PixelRepresentation) == (1, -1024, 1)
    check(read_image(dicom_file("CT_small.dcm")), bits_scaled(ds, px))


def test_rescale_negative_slope_flips(tmp_path):
    """With a negative slope the rescaled range runs the other way, so the image must flip."""
    ds, px = stored("CT_small.dcm")
    ds.RescaleSlope, ds.RescaleIntercept = -2.5, 100
    ds.save_as(tmp_path / "neg.dcm")
    expected = bits_scaled(ds, px)
    np.testing.assert_allclose(expected, 1.0 - bits_scaled(pydicom.dcmread(dicom_file("CT_small.dcm")), px), atol=1e-9)
    check(read_image(tmp_path / "neg.dcm"), expected)


def test_rescale_slope_mr2():
    ds, px = stored("MR2_UNCR.dcm")
    assert float(ds.RescaleSlope) != 1
    check(read_image(dicom_file("MR2_UNCR.dcm")), bits_scaled(ds, px))


@pytest.mark.parametrize(
    "compressed, plain",
    [
        ("MR_small_jp2klossless.dcm", "MR_small.dcm"),  # JPEG 2000 lossless, signed 16-bit
        ("RG3_J2KR.dcm", "RG3_UNCR.dcm"),  # JPEG 2000 lossless, MONOCHROME1 10-bit
        ("MR_small_RLE.dcm", "MR_small.dcm"),  # RLE
        ("emri_small_RLE.dcm", "emri_small.dcm"),  # RLE, multi-frame
    ],
)
def test_lossless_compressed_equals_uncompressed_twin(compressed, plain):
    ds, px = stored(plain)
    assert not pydicom.dcmread(dicom_file(plain)).file_meta.TransferSyntaxUID.is_compressed
    assert pydicom.dcmread(dicom_file(compressed)).file_meta.TransferSyntaxUID.is_compressed
    expected = bits_scaled(ds, px)
    if ds.PhotometricInterpretation == "MONOCHROME1":
        expected = 1.0 - expected
    expected = expected.astype(np.float32).reshape(-1, *px.shape[-2:])
    with open_image(dicom_file(compressed)) as reader, open_image(dicom_file(plain)) as twin:
        assert reader.frames == twin.frames == len(expected)
        for k in range(reader.frames):
            np.testing.assert_array_equal(reader.read(frame=k), expected[k])
            np.testing.assert_array_equal(reader.read(frame=k), twin.read(frame=k))


def test_lossy_jpeg2000_is_close_to_twin():
    ds, px = stored("MR2_UNCI.dcm")
    lossy = read_image(dicom_file("MR2_J2KI.dcm"))
    assert np.abs(lossy - bits_scaled(ds, px)).mean() < 0.01


def test_dicom_found_by_magic_without_suffix(tmp_path):
    ds, px = stored("MR_small.dcm")
    for name in ("IM0001", "1.2.840.113619.2.55"):
        shutil.copy(dicom_file("MR_small.dcm"), tmp_path / name)
        check(read_image(tmp_path / name), bits_scaled(ds, px))


# --- PNG / JPEG ---------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype, top", [(np.uint8, 255), (np.uint16, 65535)])
def test_png_round_trip_exact(tmp_path, dtype, top):
    values = RNG.integers(0, top + 1, (70, 90), dtype=dtype)
    values[0, 0], values[0, 1] = 0, top
    Image.fromarray(values).save(tmp_path / "a.png")
    expected = values / top
    with open_image(tmp_path / "a.png") as reader:
        assert reader.shape == (70, 90) and reader.frames == 1 and reader.dtype == dtype
        np.testing.assert_array_equal(reader.read(), expected.astype(np.float32))
        np.testing.assert_array_equal(reader.read((10, 20, 30, 40)), expected[10:40, 20:60].astype(np.float32))


def test_png_rgb_and_rgba_become_luminance(tmp_path):
    rgba = RNG.integers(0, 256, (40, 50, 4), dtype=np.uint8)
    Image.fromarray(rgba).save(tmp_path / "rgba.png")
    Image.fromarray(rgba[..., :3]).save(tmp_path / "rgb.png")
    expected = rgba[..., :3].astype(np.float64) @ LUMA / 255
    check(read_image(tmp_path / "rgba.png"), expected)
    check(read_image(tmp_path / "rgb.png"), expected)


def test_jpeg_grayscale(tmp_path):
    values = np.tile(np.arange(0, 256, 4, dtype=np.uint8), (32, 1))
    Image.fromarray(values).save(tmp_path / "a.JPG", quality=95)
    decoded = np.asarray(Image.open(tmp_path / "a.JPG")).astype(np.float64)
    check(read_image(tmp_path / "a.JPG"), decoded / 255)
    assert np.abs(decoded - values).max() < 8  # the file really holds the ramp


# --- TIFF ---------------------------------------------------------------------------------------


def test_tiff_16_bit(tmp_path):
    values = RNG.integers(0, 65536, (50, 60), dtype=np.uint16)
    tifffile.imwrite(tmp_path / "a.tif", values)
    with open_image(tmp_path / "a.tif") as reader:
        assert reader.dtype == np.uint16 and reader.shape == (50, 60)
        np.testing.assert_array_equal(reader.read(), (values / 65535).astype(np.float32))


@pytest.fixture(scope="module")
def big(tmp_path_factory):
    values = RNG.integers(0, 65536, (2000, 3000), dtype=np.uint16)
    folder = tmp_path_factory.mktemp("big")
    tifffile.imwrite(folder / "tiled.tif", values, bigtiff=True, tile=(256, 256), compression="zlib")
    tifffile.imwrite(folder / "striped.tiff", values, rowsperstrip=64)
    return values, folder


REGIONS = [(0, 0, 256, 256), (1000, 1500, 300, 400), (250, 250, 13, 700), (1800, 2700, 200, 300)]


@pytest.mark.parametrize("name", ["tiled.tif", "striped.tiff"])
def test_tiff_regions_equal_the_full_array(big, name):
    values, folder = big
    with tifffile.TiffFile(folder / name) as tif:
        assert tif.is_bigtiff == (name == "tiled.tif") and tif.pages[0].is_tiled == (name == "tiled.tif")
    expected = values / 65535
    with open_image(folder / name) as reader:
        assert reader.shape == (2000, 3000) and reader.frames == 1
        for y, x, h, w in REGIONS:
            check(reader.read((y, x, h, w)), expected[y : y + h, x : x + w], atol=0)


def test_tiled_region_reads_only_its_tiles(big, tmp_path):
    """Wreck the first tile: a far region still reads, the whole frame fails with our error."""
    values, folder = big
    path = tmp_path / "wrecked.tif"
    shutil.copy(folder / "tiled.tif", path)
    with tifffile.TiffFile(path) as tif:
        offset, count = tif.pages[0].dataoffsets[0], tif.pages[0].databytecounts[0]
    with open(path, "r+b") as fh:
        fh.seek(offset)
        fh.write(b"\xff" * count)
    with open_image(path) as reader:
        check(reader.read((1000, 1500, 300, 400)), values[1000:1300, 1500:1900] / 65535, atol=0)
        with pytest.raises(ImageReadError, match="wrecked.tif"):
            reader.read()


def test_tiff_pages_are_frames(tmp_path):
    stack = RNG.integers(0, 256, (3, 40, 50), dtype=np.uint8)
    with tifffile.TiffWriter(tmp_path / "pages.tif") as writer:
        for page in stack:
            writer.write(page, metadata=None)
    with open_image(tmp_path / "pages.tif") as reader:
        assert reader.frames == 3 and reader.shape == (40, 50)
        for k in range(3):
            check(reader.read((5, 5, 10, 20), frame=k), stack[k, 5:15, 5:25] / 255, atol=0)


def test_tiff_extra_axes_are_flattened_into_frames(tmp_path):
    volume = RNG.integers(0, 65536, (2, 3, 20, 30), dtype=np.uint16)
    tifffile.imwrite(tmp_path / "zc.tif", volume, photometric="minisblack", metadata={"axes": "ZCYX"})
    with open_image(tmp_path / "zc.tif") as reader:
        assert reader.frames == 6 and reader.shape == (20, 30)
        for k in (0, 4, 5):
            check(reader.read(frame=k), volume.reshape(6, 20, 30)[k] / 65535, atol=0)


def test_svs_like_jpeg_tiled_pyramid(tmp_path):
    rgb = RNG.integers(0, 256, (600, 520, 3), dtype=np.uint8)
    with tifffile.TiffWriter(tmp_path / "slide.svs") as writer:
        writer.write(rgb, tile=(256, 256), photometric="rgb", compression="jpeg", subifds=1)
        writer.write(rgb[::4, ::4], tile=(256, 256), photometric="rgb", compression="jpeg", subfiletype=1)
    decoded = tifffile.imread(tmp_path / "slide.svs").astype(np.float64)  # the codec's own decode
    assert decoded.shape == rgb.shape
    with open_image(tmp_path / "slide.svs") as reader:
        assert reader.shape == (600, 520) and reader.frames == 1
        check(reader.read((250, 200, 300, 100)), decoded[250:550, 200:300] @ LUMA / 255)


@pytest.mark.parametrize("planar", ["contig", "separate"])
def test_tiff_rgb_becomes_luminance(tmp_path, planar):
    rgb = RNG.integers(0, 256, (30, 40, 3), dtype=np.uint8)
    tifffile.imwrite(tmp_path / "rgb.tif", rgb if planar == "contig" else np.moveaxis(rgb, -1, 0),
                     photometric="rgb", planarconfig=planar)
    with open_image(tmp_path / "rgb.tif") as reader:
        assert reader.frames == 1 and reader.shape == (30, 40)
        check(reader.read((3, 4, 20, 30)), rgb[3:23, 4:34].astype(np.float64) @ LUMA / 255)


def test_tiff_pyramid_uses_level_0(tmp_path):
    values = RNG.integers(0, 256, (512, 768), dtype=np.uint8)
    with tifffile.TiffWriter(tmp_path / "pyr.tif") as writer:
        writer.write(values, tile=(256, 256), subifds=1)
        writer.write(values[::2, ::2], tile=(256, 256), subfiletype=1)
    with open_image(tmp_path / "pyr.tif") as reader:
        assert reader.shape == (512, 768) and reader.frames == 1
        check(reader.read((100, 300, 50, 60)), values[100:150, 300:360] / 255, atol=0)


def test_tiff_min_is_white_is_inverted(tmp_path):
    values = RNG.integers(0, 256, (20, 30), dtype=np.uint8)
    tifffile.imwrite(tmp_path / "w.tif", values, photometric="miniswhite")
    check(read_image(tmp_path / "w.tif"), 1.0 - values / 255)


# --- NumPy --------------------------------------------------------------------------------------


def test_npy_2d_and_3d_memory_mapped(tmp_path, monkeypatch):
    flat = RNG.integers(0, 65536, (30, 40), dtype=np.uint16)
    stack = RNG.integers(0, 256, (4, 30, 40), dtype=np.uint8)
    np.save(tmp_path / "flat.npy", flat)
    np.save(tmp_path / "stack.npy", stack)
    modes, load = [], np.load
    monkeypatch.setattr(np, "load", lambda *a, **k: modes.append(k.get("mmap_mode")) or load(*a, **k))
    with open_image(tmp_path / "flat.npy") as reader:
        assert reader.frames == 1 and reader.shape == (30, 40)
        check(reader.read((2, 3, 10, 11)), flat[2:12, 3:14] / 65535, atol=0)
    with open_image(tmp_path / "stack.npy") as reader:
        assert reader.frames == 4 and reader.shape == (30, 40)
        check(reader.read(frame=2), stack[2] / 255, atol=0)
    assert modes == ["r", "r"]


def test_npy_float_is_clipped_and_signed_uses_its_range(tmp_path):
    np.save(tmp_path / "f.npy", np.array([[-0.5, 0.25, 0.0], [0.75, 1.5, 0.5]], np.float32))
    check(read_image(tmp_path / "f.npy"), np.array([[0, 0.25, 0], [0.75, 1.0, 0.5]]), atol=0)
    signed = np.array([[-32768, 0], [1000, 32767]], np.int16)
    np.save(tmp_path / "i.npy", signed)
    check(read_image(tmp_path / "i.npy"), (signed + 32768.0) / 65535)


# --- minmax -------------------------------------------------------------------------------------


def test_minmax_stretches_each_frame(tmp_path):
    stack = np.stack([RNG.integers(50, 201, (20, 30)), np.full((20, 30), 9)]).astype(np.uint16)
    stack[0, 0, 0], stack[0, -1, -1] = 50, 200
    np.save(tmp_path / "s.npy", stack)
    with open_image(tmp_path / "s.npy", intensity="minmax") as reader:
        check(reader.read((0, 10, 20, 20)), (stack[0, :, 10:30] - 50.0) / 150)  # range of the whole frame
        np.testing.assert_array_equal(reader.read(frame=1), np.zeros((20, 30), np.float32))


def test_minmax_scans_a_big_frame_in_bands(tmp_path, monkeypatch):
    values = RNG.integers(1000, 50000, (1000, 1200), dtype=np.uint16)
    values[999, 5], values[555, 1100] = 7, 60000  # the extremes lie in later bands
    tifffile.imwrite(tmp_path / "t.tif", values, tile=(256, 256))
    monkeypatch.setattr(readers, "_BAND_PIXELS", 1200 * 100)  # 10 bands of 100 rows
    with open_image(tmp_path / "t.tif", intensity="minmax") as reader:
        check(reader.read((0, 0, 300, 400)), (values[:300, :400] - 7.0) / (60000 - 7))


def test_minmax_monochrome1():
    ds, px = stored("RG3_UNCR.dcm")
    check(read_image(dicom_file("RG3_UNCR.dcm"), intensity="minmax"), (px.max() - px) / (px.max() - px.min()))


# --- errors -------------------------------------------------------------------------------------


def raises_naming(path, call=read_image, *args, **kwargs) -> ImageReadError:
    with pytest.raises(ImageReadError) as info:
        call(path, *args, **kwargs)
    assert info.value.path.name == path.name and path.name in str(info.value)
    return info.value


def test_missing_directory_empty_and_unsupported(tmp_path):
    assert "not found" in str(raises_naming(tmp_path / "gone.png"))
    (tmp_path / "folder.png").mkdir()
    assert "directory" in str(raises_naming(tmp_path / "folder.png"))
    (tmp_path / "empty.dcm").write_bytes(b"")
    assert "empty" in str(raises_naming(tmp_path / "empty.dcm"))
    (tmp_path / "notes.txt").write_text("not an image")
    assert "unsupported" in str(raises_naming(tmp_path / "notes.txt"))
    (tmp_path / "noext").write_bytes(b"\0" * 200)
    assert "unsupported" in str(raises_naming(tmp_path / "noext"))


@pytest.mark.parametrize("name", ["noise.png", "noise.jpg", "noise.tif", "noise.dcm", "noise.npy"])
def test_random_bytes(tmp_path, name):
    (tmp_path / name).write_bytes(RNG.integers(0, 256, 4096, dtype=np.uint8).tobytes())
    raises_naming(tmp_path / name)


def test_text_renamed_png(tmp_path):
    (tmp_path / "text.png").write_text("hello, I am not a PNG\n" * 20)
    raises_naming(tmp_path / "text.png", open_image)


def truncate(source, target, keep: float = 0.6):
    data = open(source, "rb").read()
    target.write_bytes(data[: int(len(data) * keep)])
    return target


def test_truncated_files(tmp_path, big):
    values, folder = big
    Image.fromarray(RNG.integers(0, 256, (200, 200), dtype=np.uint8)).save(tmp_path / "full.png")
    assert "truncated" in str(raises_naming(truncate(dicom_file("MR_small.dcm"), tmp_path / "cut.dcm"), open_image))
    raises_naming(truncate(dicom_file("emri_small_RLE.dcm"), tmp_path / "cut_rle.dcm"), read_image, frame=9)
    for name in ("tiled.tif", "striped.tiff"):  # found at open, before any pixel is read
        assert "truncated" in str(raises_naming(truncate(folder / name, tmp_path / f"cut_{name}"), open_image))
    raises_naming(truncate(tmp_path / "full.png", tmp_path / "cut.png"))
    np.save(tmp_path / "full.npy", values[:100])
    raises_naming(truncate(tmp_path / "full.npy", tmp_path / "cut.npy"))


def test_dicom_without_pixel_data(tmp_path):
    ds = pydicom.dcmread(dicom_file("MR_small.dcm"))
    del ds.PixelData
    ds.save_as(tmp_path / "header.dcm")
    assert "no pixel data" in str(raises_naming(tmp_path / "header.dcm", open_image))


def test_unsupported_array_shapes(tmp_path):
    np.save(tmp_path / "4d.npy", np.zeros((2, 3, 4, 5), np.uint8))
    np.save(tmp_path / "1d.npy", np.zeros(5, np.uint8))
    np.save(tmp_path / "text.npy", np.array([["a", "b"]]))
    for name in ("4d.npy", "1d.npy", "text.npy"):
        raises_naming(tmp_path / name, open_image)


def test_region_and_frame_out_of_range(tmp_path):
    np.save(tmp_path / "s.npy", np.zeros((2, 30, 40), np.uint8))
    reader = open_image(tmp_path / "s.npy")
    for region in [(0, 0, 31, 40), (0, 1, 30, 40), (-1, 0, 5, 5), (0, 0, 0, 5), (10, 10, 5), "all"]:
        assert "region" in str(raises_naming(tmp_path / "s.npy", lambda p: reader.read(region)))
    for frame in (2, -1):
        assert "frame" in str(raises_naming(tmp_path / "s.npy", lambda p: reader.read(frame=frame)))
    raises_naming(tmp_path / "s.npy", read_image, frame=5)
    reader.close()
    assert "closed" in str(raises_naming(tmp_path / "s.npy", lambda p: reader.read()))
    path = tmp_path / "emri.dcm"
    shutil.copy(dicom_file("emri_small.dcm"), path)
    assert "frame 10" in str(raises_naming(path, read_image, frame=10))


def test_bad_intensity_is_a_config_error(tmp_path):
    np.save(tmp_path / "s.npy", np.zeros((3, 3), np.uint8))
    with pytest.raises(ConfigError):
        open_image(tmp_path / "s.npy", intensity="window")


def test_supported_suffixes():
    assert {".png", ".jpg", ".jpeg", ".tif", ".tiff", ".svs", ".npy", ".dcm"} <= SUPPORTED_SUFFIXES
    assert all(s == s.lower() and s.startswith(".") for s in SUPPORTED_SUFFIXES)


def test_module_imports_without_format_libraries():
    code = "import sys; sys.modules.update(tifffile=None, zarr=None, pydicom=None); import swssl.data.readers"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_palette_dicom_is_refused():
    path = dicom_file("OBXXXX1A.dcm")
    with pytest.raises(ImageReadError, match="PALETTE COLOR"):
        open_image(path)


def test_float_pixel_data_dicom_is_clipped(tmp_path):
    ds = pydicom.dcmread(dicom_file("MR_small.dcm"))
    values = np.linspace(-0.5, 1.5, 64 * 64, dtype=np.float32).reshape(64, 64)
    del ds.PixelData, ds.BitsStored, ds.HighBit, ds.PixelRepresentation
    ds.BitsAllocated, ds.FloatPixelData = 32, values.tobytes()
    ds.save_as(tmp_path / "float.dcm")
    with open_image(tmp_path / "float.dcm") as reader:
        assert reader.dtype == np.float32
        check(reader.read(), np.clip(values.astype(np.float64), 0, 1), atol=0)


def test_bad_max_pixels_is_a_config_error(tmp_path):
    """A limit below 1 px would refuse every image."""
    np.save(tmp_path / "s.npy", np.zeros((3, 3), np.uint8))
    with pytest.raises(ConfigError):
        open_image(tmp_path / "s.npy", max_pixels=0)


# --- strictness: files that must never read as images ------------------------------------------


@contextlib.contextmanager
def fails_instead_of_hanging(seconds: int = 5) -> Iterator[None]:
    """Opening a FIFO blocks until a writer comes: a regression must fail the test, not hang it."""
    def stop(signum: int, frame: object) -> None:
        raise TimeoutError("open_image blocked")

    previous = signal.signal(signal.SIGALRM, stop)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def test_special_files_are_refused_from_their_stat(tmp_path):
    """A FIFO (with or without an image suffix), a device or a socket is never opened."""
    for name in ("pipe.png", "pipe"):
        os.mkfifo(tmp_path / name)
        with fails_instead_of_hanging():
            assert raises_naming(tmp_path / name, open_image).reason == "not a regular file (FIFO)"
    with socket.socket(socket.AF_UNIX) as server:
        server.bind(os.fspath(tmp_path / "sock.dcm"))
        assert raises_naming(tmp_path / "sock.dcm", open_image).reason == "not a regular file (socket)"
    assert raises_naming(Path("/dev/null"), open_image).reason == "not a regular file (character device)"


def small_image(folder: Path, suffix: str) -> tuple[Path, int, int]:
    """A small valid image of each format, and its height and width."""
    path = folder / f"small{suffix}"
    values = RNG.integers(0, 256, (30, 40), dtype=np.uint8)
    if suffix == ".dcm":
        shutil.copy(dicom_file("MR_small.dcm"), path)
        return path, 64, 64
    if suffix == ".tif":
        tifffile.imwrite(path, values)
    elif suffix == ".npy":
        np.save(path, values)
    else:
        Image.fromarray(values).save(path)
    return path, 30, 40


@pytest.mark.parametrize("suffix", [".png", ".jpg", ".tif", ".dcm", ".npy"])
def test_pixel_limit(tmp_path, suffix):
    """Checked from each format's header; None is no limit."""
    path, height, width = small_image(tmp_path, suffix)
    limit = height * width - 1
    reason = raises_naming(path, open_image, max_pixels=limit).reason
    assert reason == f"image of {height} x {width} px is larger than the pixel limit of {limit} (--max-pixels)"
    for limit in (height * width, None):
        with open_image(path, max_pixels=limit) as reader:
            assert reader.read().shape == (height, width)


def png_file(path: Path, width: int, height: int, scanlines: bytes, interlace: int = 0) -> Path:
    """An 8-bit grayscale PNG with valid chunks and CRCs around `scanlines` (filter byte + samples each)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, interlace)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(scanlines))
                     + chunk(b"IEND", b""))
    return path


def rows(values: np.ndarray) -> bytes:
    return b"".join(b"\0" + row.tobytes() for row in values)


ADAM7 = [(0, 0, 8, 8), (0, 4, 8, 8), (4, 0, 8, 4), (0, 2, 4, 4), (2, 0, 4, 2), (0, 1, 2, 2), (1, 0, 2, 1)]


def peak_bytes(call: Callable[[], object]) -> tuple[object, int]:
    """What `call` returns, and the most memory it held at once."""
    tracemalloc.start()
    try:
        return call(), tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_pixel_limit_is_checked_before_decoding(tmp_path):
    """A PNG that declares 10000 x 10000 is refused from its header: no 100 MB frame is decoded."""
    path = png_file(tmp_path / "big.png", 10000, 10000, rows(np.zeros((4, 10000), np.uint8)))
    error, peak = peak_bytes(lambda: raises_naming(path, open_image, max_pixels=10**6))
    assert error.reason.startswith("image of 10000 x 10000 px is larger than the pixel limit of 1000000")
    assert peak < 10 * 2**20
    with open(tmp_path / "huge.npy", "wb") as fh:  # the header only: the limit comes before the size check
        np.lib.format.write_array_header_1_0(fh, {"descr": "|u1", "fortran_order": False, "shape": (70000, 70000)})
    reason = raises_naming(tmp_path / "huge.npy", open_image).reason
    assert reason == f"image of 70000 x 70000 px is larger than the pixel limit of {DEFAULT_MAX_PIXELS} (--max-pixels)"


def test_pillow_bomb_check_gives_way_to_the_pixel_limit(tmp_path, monkeypatch):
    """With Pillow's own limit at 1000 px, 100 x 100 would be its DecompressionBombError: only ours counts."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    values = RNG.integers(0, 256, (100, 100), dtype=np.uint8)
    Image.fromarray(values).save(tmp_path / "a.png")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a DecompressionBombWarning would raise
        check(read_image(tmp_path / "a.png"), values / 255, atol=0)
    reason = raises_naming(tmp_path / "a.png", max_pixels=5000).reason
    assert reason == "image of 100 x 100 px is larger than the pixel limit of 5000 (--max-pixels)"
    assert Image.MAX_IMAGE_PIXELS == 1000  # put back


def test_png_whose_data_ends_early_is_truncated(tmp_path):
    """Pillow zero-fills the rows a complete but short zlib stream leaves out; interlaced PNGs still read."""
    values = RNG.integers(0, 256, (37, 29), dtype=np.uint8)
    path = png_file(tmp_path / "short.png", 29, 37, rows(values[:4]))
    assert raises_naming(path).reason == ("truncated PNG: its compressed data holds 120 of the 1110 bytes of "
                                          "pixel rows the header declares")
    passes = [values[y0::dy, x0::dx] for y0, x0, dy, dx in ADAM7]
    check(read_image(png_file(tmp_path / "adam7.png", 29, 37, b"".join(map(rows, passes)), 1)), values / 255, atol=0)
    held = b"".join(map(rows, passes[:-1]))
    path = png_file(tmp_path / "adam7-short.png", 29, 37, held, 1)
    needed = len(held) + len(rows(passes[-1]))
    reason = raises_naming(path).reason
    assert reason.startswith(f"truncated PNG: its compressed data holds {len(held)} of the {needed} bytes")
    Image.fromarray(values).save(tmp_path / "full.png")
    assert raises_naming(truncate(tmp_path / "full.png", tmp_path / "cut.png")).reason.startswith("truncated PNG")


def test_truncated_jpeg_is_refused_whatever_pillow_is_set_to(tmp_path, monkeypatch):
    """Pillow's LOAD_TRUNCATED_IMAGES would pad the missing rows; it is off for our load only."""
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)  # set by some other code in the process
    Image.fromarray(RNG.integers(0, 256, (64, 64), dtype=np.uint8)).save(tmp_path / "full.jpg")
    reason = raises_naming(truncate(tmp_path / "full.jpg", tmp_path / "cut.jpg")).reason
    assert reason.startswith("corrupt or truncated JPEG data (decoder: OSError: image file is truncated")
    assert ImageFile.LOAD_TRUNCATED_IMAGES is True  # put back


def reencapsulated(folder: Path, name: str, change: Callable[[list[bytes]], list[bytes]], **header) -> Path:
    """pydicom's test file `name` with its frames replaced by change(frames): a structurally valid file."""
    ds = pydicom.dcmread(dicom_file(name))
    frames = list(generate_frames(ds.PixelData, number_of_frames=int(ds.get("NumberOfFrames") or 1)))
    ds.PixelData = encapsulate(change(frames))
    ds["PixelData"].is_undefined_length = True
    for keyword, value in header.items():
        setattr(ds, keyword, value)
    ds.save_as(folder / f"changed-{name}")
    return folder / f"changed-{name}"


def garbled(frame: bytes) -> bytes:
    """The frame's second half replaced by random bytes (the same bytes whatever tests run before)."""
    return frame[: len(frame) // 2] + np.random.default_rng(3).bytes(len(frame) - len(frame) // 2)


@pytest.mark.parametrize("name, damage, codec, marker", [
    ("SC_rgb_jpeg_dcmtk.dcm", "cut", "JPEG", "EOI"),  # pylibjpeg-libjpeg pads it silently
    ("MR_small_jp2klossless.dcm", "garble", "JPEG 2000", "EOC"),  # pylibjpeg-openjpeg decodes it silently
    ("MR_small_jp2klossless.dcm", "cut", "JPEG 2000", "EOC"),
])
def test_dicom_codestream_cut_or_garbled(tmp_path, name, damage, codec, marker):
    """The garbled JPEG 2000 frame was once scored as valid, with the highest score of its run."""
    change = (lambda f: f[: len(f) // 2]) if damage == "cut" else garbled
    path = reencapsulated(tmp_path, name, lambda frames: [change(frames[0]), *frames[1:]])
    assert raises_naming(path).reason == (f"corrupt or truncated {codec} data in frame 0 "
                                          f"(the codestream does not end with its {marker} marker)")


@pytest.mark.parametrize("damage", ["cut", "garble"])
def test_dicom_rle_cut_or_garbled(tmp_path, damage):
    """The decoders' own errors, a Rust panic (a BaseException) included, name the frame and the codec."""
    change = (lambda f: f[: len(f) // 2]) if damage == "cut" else garbled  # garbled: a Rust panic in pylibjpeg-rle
    path = reencapsulated(tmp_path, "MR_small_RLE.dcm", lambda frames: [change(frames[0])])
    assert raises_naming(path).reason.startswith("corrupt or truncated RLE data in frame 0 (decoder: ")


@pytest.mark.parametrize("name, codec, rows, columns", [("MR_small_jp2klossless.dcm", "JPEG 2000", 32, 128),
                                                         ("SC_rgb_jpeg_dcmtk.dcm", "JPEG", 50, 200)])
def test_dicom_codestream_size_must_match_the_header(tmp_path, name, codec, rows, columns):
    """pydicom reshapes a codestream of as many pixels into the header's size without a word."""
    path = reencapsulated(tmp_path, name, list, Rows=rows, Columns=columns)
    side = 64 if codec == "JPEG 2000" else 100
    assert raises_naming(path).reason == (f"corrupt {codec} data in frame 0 (its codestream is {side} x {side} px, "
                                          f"the DICOM header says {rows} x {columns})")


def test_pydicom_warnings_of_damaged_data_are_errors(monkeypatch):
    """pydicom warns, and returns the frame, where encapsulated data ends without an EOI/EOC marker."""
    from pydicom.misc import warn_and_log

    decode, path = pydicom.pixels.pixel_array, Path(dicom_file("MR_small_jp2klossless.dcm"))

    def warning(text: str) -> Callable[..., np.ndarray]:
        return lambda *args, **kwargs: warn_and_log(text) or decode(*args, **kwargs)

    monkeypatch.setattr(pydicom.pixels, "pixel_array", warning(
        "The end of the encapsulated pixel data has been reached but no JPEG EOI/EOC marker was found, the "
        "returned frame data may be invalid"))
    with pytest.warns(UserWarning):
        reason = raises_naming(path).reason
    assert reason.startswith("corrupt or truncated JPEG 2000 data in frame 0 (pydicom: The end of the encapsulated")
    monkeypatch.setattr(pydicom.pixels, "pixel_array", warning(
        "The pixel data is 8194 bytes long, which indicates it contains 2 bytes of excess padding to be removed"))
    with pytest.warns(UserWarning):  # harmless: the frame reads
        assert read_image(path).shape == (64, 64)


@pytest.mark.parametrize("compression, codec, marker", [("jpeg", "JPEG", "EOI"), ("jpeg2000", "JPEG 2000", "EOC")])
@pytest.mark.parametrize("damage", ["cut", "garble"])
def test_tiff_codestream_tiles_must_end_with_their_marker(tmp_path, compression, codec, marker, damage):
    """imagecodecs decodes a JPEG tile cut short, or a JPEG 2000 tile half garbled, without a complaint."""
    values = (np.add.outer(np.arange(512), np.arange(512)) % 251).astype(np.uint8)
    path = tmp_path / "tiles.tif"
    tifffile.imwrite(path, values, tile=(256, 256), compression=compression)
    assert read_image(path).shape == (512, 512)
    with tifffile.TiffFile(path, mode="r+b") as tif:
        page = tif.pages[0]
        offset, count = page.dataoffsets[1], page.databytecounts[1]
        if damage == "cut":
            page.tags["TileByteCounts"].overwrite([c // 2 if i == 1 else c for i, c in enumerate(page.databytecounts)])
    if damage == "garble":
        with open(path, "r+b") as fh:
            fh.seek(offset)
            tile = garbled(fh.read(count))
            fh.seek(offset)
            fh.write(tile)
    assert raises_naming(path, open_image).reason == (f"corrupt or truncated {codec} data in tile 1 of page 0 "
                                                      f"(the codestream does not end with its {marker} marker)")


@pytest.mark.parametrize("layout, segment, counts, needed", [({"rowsperstrip": 16}, "strip", "StripByteCounts", 1920),
                                                             ({"tile": (32, 32)}, "tile", "TileByteCounts", 2048)])
def test_uncompressed_tiff_segment_too_short(tmp_path, layout, segment, counts, needed):
    """tifffile would only fail at the read of that strip or tile; it is refused at open."""
    tifffile.imwrite(tmp_path / "u.tif", np.arange(100 * 60, dtype=np.uint16).reshape(100, 60), **layout)
    with tifffile.TiffFile(tmp_path / "u.tif", mode="r+b") as tif:
        sizes = list(tif.pages[0].databytecounts)
        tif.pages[0].tags[counts].overwrite([sizes[0], sizes[1] - 1, *sizes[2:]])
    assert raises_naming(tmp_path / "u.tif", open_image).reason == (
        f"truncated TIFF: {segment} 1 of page 0 holds {needed - 1} bytes, the image needs {needed}")


def test_native_dicom_pixel_data_length_is_exact(tmp_path):
    """One byte short is refused at open (numpy would fail later); an odd length's missing pad byte is not."""
    ds = pydicom.dcmread(dicom_file("MR_small.dcm"))
    values = np.arange(9, dtype=np.uint8).reshape(3, 3)
    data = open(dicom_file("MR_small.dcm"), "rb").read()
    start = data.index(b"\xe0\x7f\x10\x00OW") + 12  # trailing padding follows the pixel data
    (tmp_path / "short.dcm").write_bytes(data[: start + 8192 - 1])
    assert raises_naming(tmp_path / "short.dcm", open_image).reason == (
        "truncated DICOM: the header describes 8192 bytes of pixel data, the file holds 8191")
    ds.Rows, ds.Columns, ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 3, 3, 8, 8, 7, 0
    ds.PixelData = values.tobytes()  # 9 bytes, written as 10
    ds.save_as(tmp_path / "odd.dcm")
    data = (tmp_path / "odd.dcm").read_bytes()
    start = data.index(b"\xe0\x7f\x10\x00") + 12
    assert data[start - 4 : start] == struct.pack("<I", 10)
    for keep, name in ((10, "odd.dcm"), (9, "no-pad.dcm")):
        (tmp_path / name).write_bytes(data[: start + keep])
        check(read_image(tmp_path / name), values / 255, atol=0)
    (tmp_path / "odd-short.dcm").write_bytes(data[: start + 8])
    assert raises_naming(tmp_path / "odd-short.dcm", open_image).reason == (
        "truncated DICOM: the header describes 9 bytes of pixel data, the file holds 8")


def test_dicom_cut_inside_its_header(tmp_path):
    """pydicom stops quietly at the end of the file; this used to read "not a DICOM image (no Rows/Columns)"."""
    data = open(dicom_file("MR_small.dcm"), "rb").read()
    pixel_at = data.index(b"\xe0\x7f\x10\x00OW")
    for cut in (200, 500, 1100, pixel_at + 11):  # in the file meta, in the dataset, in the pixel data's header
        (tmp_path / "cut.dcm").write_bytes(data[:cut])
        reason = raises_naming(tmp_path / "cut.dcm", open_image).reason
        assert reason.startswith(f"truncated DICOM (header cut at byte {cut}")
    assert raises_naming(Path(dicom_file("rtplan.dcm")), open_image).reason == "not a DICOM image (no Rows/Columns)"


def test_dicom_element_length_past_the_end(tmp_path):
    """A length field that claims more than the file holds; the big one is skipped by pydicom, not read."""
    data = open(dicom_file("MR_small.dcm"), "rb").read()
    name = data.index(b"\x10\x00\x10\x00PN")  # PatientName, a 2-byte length
    version = data.index(b"\x02\x00\x01\x00OB\x00\x00")  # FileMetaInformationVersion, a 4-byte length
    for at, tag, length, field, start in ((name, "(0010,0010)", 0xFFF0, "<H", name + 6),
                                          (version, "(0002,0001)", 0x7FFFFFF0, "<I", version + 8)):
        end = start + struct.calcsize(field)  # the length field, after the tag, VR (and 2 reserved bytes)
        (tmp_path / "bad.dcm").write_bytes(data[:start] + struct.pack(field, length) + data[end:])
        remain = len(data) - end
        assert raises_naming(tmp_path / "bad.dcm", open_image).reason == (
            f"corrupt DICOM element length (tag {tag} at byte {at} declares {length} bytes, {remain} remain)")


def test_encapsulated_dicom_fragments_are_checked_at_open(tmp_path):
    """A file cut inside its pixel data fails at open, not at the read of a late frame."""
    data = open(dicom_file("emri_small_RLE.dcm"), "rb").read()
    (tmp_path / "cut.dcm").write_bytes(data[: len(data) * 6 // 10])
    assert raises_naming(tmp_path / "cut.dcm", open_image).reason.startswith(
        "truncated DICOM: the pixel data fragment at byte ")
    path = reencapsulated(tmp_path, "emri_small_RLE.dcm", lambda frames: frames[:9])
    assert raises_naming(path, open_image).reason == "truncated DICOM: 9 pixel data fragment(s) for 10 frame(s)"
    assert data.endswith(b"\xfe\xff\xdd\xe0\0\0\0\0")  # the sequence delimiter
    (tmp_path / "no-delimiter.dcm").write_bytes(data[:-8])  # every fragment whole: tolerated
    with open_image(tmp_path / "no-delimiter.dcm") as cut, open_image(dicom_file("emri_small_RLE.dcm")) as whole:
        np.testing.assert_array_equal(cut.read(frame=9), whole.read(frame=9))


def test_deflated_dicom_is_refused():
    """pydicom decodes frames from the file as it is: a deflated one was never readable."""
    reason = raises_naming(Path(dicom_file("image_dfl.dcm")), open_image).reason
    assert reason == "DICOM transfer syntax Deflated Explicit VR Little Endian is not supported"


def test_dicom_without_its_decoder(monkeypatch):
    """Not "corrupt data": the plugin is missing (pylibjpeg-rle, say)."""
    monkeypatch.setattr(pydicom.pixels, "get_decoder", lambda syntax: type("Decoder", (), {"is_available": False}))
    reason = raises_naming(Path(dicom_file("MR_small_RLE.dcm")), open_image).reason
    assert reason == "no decoder installed for DICOM transfer syntax RLE Lossless"


def test_nan_and_inf_pixels_are_errors(tmp_path):
    """They were read as 0 before: an image of NaNs scored as a clean black one."""
    values = np.full((6, 5), 0.5, np.float32)
    values[3, 2] = np.nan
    np.save(tmp_path / "nan.npy", values)
    assert raises_naming(tmp_path / "nan.npy").reason == "1 NaN/inf pixel value(s) in frame 0"
    with open_image(tmp_path / "nan.npy") as reader:
        check(reader.read((0, 0, 3, 5)), np.full((3, 5), 0.5), atol=0)
        reason = raises_naming(tmp_path / "nan.npy", lambda p: reader.read((2, 0, 3, 5))).reason
        assert reason == "1 NaN/inf pixel value(s) in rows 2-4 of frame 0"
    with open_image(tmp_path / "nan.npy", intensity="minmax") as reader:  # no nanmin/nanmax over the frame
        reason = raises_naming(tmp_path / "nan.npy", lambda p: reader.read((0, 0, 3, 5))).reason
        assert reason == "1 NaN/inf pixel value(s) in frame 0"
    values[3, 2], values[0, :2] = 0.5, [np.inf, -np.inf]
    tifffile.imwrite(tmp_path / "inf.tif", values)
    assert raises_naming(tmp_path / "inf.tif").reason == "2 NaN/inf pixel value(s) in frame 0"
    ds = pydicom.dcmread(dicom_file("MR_small.dcm"))
    del ds.PixelData, ds.BitsStored, ds.HighBit, ds.PixelRepresentation
    ds.Rows, ds.Columns, ds.BitsAllocated, ds.FloatPixelData = 6, 5, 32, values.tobytes()
    ds.save_as(tmp_path / "inf.dcm")
    assert raises_naming(tmp_path / "inf.dcm").reason == "2 NaN/inf pixel value(s) in frame 0"


def test_non_finite_rescale_is_refused(tmp_path):
    """A NaN slope would make every pixel NaN, past the float-data check."""
    ds = pydicom.dcmread(dicom_file("CT_small.dcm"))
    with pytest.warns(UserWarning):  # pydicom, on the value
        ds.RescaleSlope = "NaN"
    ds.save_as(tmp_path / "nan-slope.dcm")
    assert raises_naming(tmp_path / "nan-slope.dcm", open_image).reason == (
        "invalid RescaleSlope/RescaleIntercept (nan, -1024.0)")


def test_npy_header_is_checked_before_mapping(tmp_path):
    """numpy's own errors would say to set allow_pickle, or fail only when the map is read."""
    (tmp_path / "noise.npy").write_bytes(RNG.integers(0, 256, 512, dtype=np.uint8).tobytes())
    assert raises_naming(tmp_path / "noise.npy", open_image).reason == "not a .npy file (no NumPy header)"
    np.save(tmp_path / "objects.npy", np.array([{"a": 1}, None], dtype=object), allow_pickle=True)
    assert raises_naming(tmp_path / "objects.npy", open_image).reason == (
        "the .npy holds Python objects (pickled data); refusing to unpickle it")
    np.save(tmp_path / "full.npy", np.zeros((40, 50), np.uint16))
    data = (tmp_path / "full.npy").read_bytes()
    (tmp_path / "cut.npy").write_bytes(data[:-1])
    assert raises_naming(tmp_path / "cut.npy", open_image).reason == (
        "truncated .npy: the header declares 4000 bytes of pixel data, the file holds 3999")
    np.save(tmp_path / "4d.npy", np.zeros((2, 3, 4, 5), np.uint8))
    assert raises_naming(tmp_path / "4d.npy", open_image).reason == (
        "unsupported .npy shape (2, 3, 4, 5): expected H x W, N x H x W frames, or H x W x 3/4 colour")


def test_npy_layout_colour_or_frames(tmp_path):
    """H x W x 3/4 is one colour frame (it used to be 32 frames of 32 x 3 px); other 3-D is N x H x W."""
    rgba = RNG.integers(0, 256, (32, 32, 4), dtype=np.uint8)
    np.save(tmp_path / "rgba.npy", rgba)
    np.save(tmp_path / "rgb.npy", rgba[..., :3])
    for name in ("rgb.npy", "rgba.npy"):
        with open_image(tmp_path / name) as reader:
            assert reader.frames == 1 and reader.shape == (32, 32)
            check(reader.read((4, 5, 10, 20)), rgba[4:14, 5:25, :3].astype(np.float64) @ LUMA / 255)
    stack = RNG.integers(0, 256, (32, 32, 5), dtype=np.uint8)
    np.save(tmp_path / "stack.npy", stack)
    with open_image(tmp_path / "stack.npy") as reader:
        assert reader.frames == 32 and reader.shape == (32, 5)
        check(reader.read(frame=7), stack[7] / 255, atol=0)


def sparse_npy(path: Path, shape: tuple[int, int]) -> Path:
    """A uint16 .npy of zeros that holds no data blocks on disk: the header, then a hole up to full size."""
    with open(path, "wb") as fh:
        np.lib.format.write_array_header_1_0(fh, {"descr": "<u2", "fortran_order": False, "shape": shape})
        fh.truncate(fh.tell() + 2 * shape[0] * shape[1])
    return path


def test_sparse_npy_stays_memory_mapped(tmp_path):
    """Opening a 16000 x 16000 .npy and reading a band of rows costs the band, not the 512 MB frame."""
    path = sparse_npy(tmp_path / "sparse.npy", (16000, 16000))

    def band() -> np.ndarray:
        with open_image(path) as reader:
            return reader.read((8000, 0, 64, 16000))

    values, peak = peak_bytes(band)
    check(values, np.zeros((64, 16000)), atol=0)
    assert peak < 16 * 2**20


@pytest.mark.parametrize("dtype", [np.uint16, np.float32])
def test_read_scales_in_one_float32_array(tmp_path, dtype):
    """A frame's read costs one float32 copy (and a 1-byte NaN mask for float data), not 3-4 temporaries."""
    values = (RNG.random((1024, 1024)) * 60000).astype(dtype)  # float32: clipped to 1, as it happens
    np.save(tmp_path / "a.npy", values)
    with open_image(tmp_path / "a.npy") as reader:
        assert peak_bytes(reader.read)[1] < 1.3 * 5 * values.size


def test_dicom_rescale_scales_in_one_float32_array(tmp_path):
    """RescaleSlope/Intercept are folded into the scaling: no float64 copies of the frame."""
    ds, px = stored("CT_small.dcm")
    big = np.tile(px.astype(np.int16), (8, 8))
    ds.Rows, ds.Columns, ds.PixelData = 1024, 1024, big.tobytes()
    ds.save_as(tmp_path / "big-ct.dcm")
    with open_image(tmp_path / "big-ct.dcm") as reader:
        reader.read((0, 0, 1, 1))  # decodes and caches the frame
        scaled, peak = peak_bytes(reader.read)
    check(scaled, bits_scaled(ds, big.astype(np.float64)))
    assert peak < 1.3 * 4 * big.size
