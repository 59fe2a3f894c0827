"""Readers: every format gives float32 grayscale in [0, 1] equal to an independent computation."""
from __future__ import annotations

import shutil
import subprocess
import sys

import numpy as np
import pydicom
import pytest
import tifffile
from PIL import Image
from pydicom.data import get_testdata_file

from swssl import readers
from swssl.errors import ConfigError, ImageReadError
from swssl.readers import SUPPORTED_SUFFIXES, open_image, read_image

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


def test_npy_float_is_clipped_nan_is_zero_and_signed_uses_its_range(tmp_path):
    np.save(tmp_path / "f.npy", np.array([[-0.5, 0.25, np.nan], [0.75, 1.5, 0.5]], np.float32))
    check(read_image(tmp_path / "f.npy"), np.array([[0, 0.25, 0], [0.75, 1.0, 0.5]]), atol=0)  # NaN -> 0
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
    code = "import sys; sys.modules.update(tifffile=None, zarr=None, pydicom=None); import swssl.readers"
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
