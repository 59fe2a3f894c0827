"""Dataset discovery and loading: every layout, every manifest error, and the resize maths."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from swssl.config import Geometry
from swssl.data.datasets import Sample, discover, load_mask, load_resized, select
from swssl.errors import DatasetError


def write_png(path: Path, pixels: np.ndarray | None = None) -> Path:
    """A tiny grayscale PNG (8-bit, or 16-bit for uint16 pixels)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.zeros((4, 3), np.uint8) if pixels is None else pixels).save(path)
    return path


def triples(samples: list[Sample], root: Path) -> set[tuple[str, int, str]]:
    return {(s.path.relative_to(root).as_posix(), s.label, s.split) for s in samples}


def test_chest_layout(tmp_path: Path) -> None:
    """Labels come from the class folders; files the readers cannot open are skipped."""
    expected = {("train/0.normal/a.png", 0, "train"), ("train/0.normal/b.png", 0, "train"),
                ("val/0.normal/c.png", 0, "val"), ("val/1.abnormal/d.png", 1, "val"),
                ("test/0.normal/e.png", 0, "test"), ("test/1.abnormal/f.png", 1, "test")}
    for name, _, _ in expected:
        write_png(tmp_path / name)
    (tmp_path / "train/0.normal/notes.txt").write_text("not an image")
    write_png(tmp_path / "train/0.normal/.hidden.png")
    samples = discover(tmp_path)
    assert triples(samples, tmp_path) == expected
    train = [s.path.name for s in samples if s.split == "train"]
    assert train == sorted(train)


def test_dbt_layout(tmp_path: Path) -> None:
    """Normal images from images-normal-unique, abnormal from images-tumor-full; val optional."""
    expected = {("images-normal-unique/train/a.png", 0, "train"),
                ("images-normal-unique/test/b.png", 0, "test"),
                ("images-tumor-full/test/c.png", 1, "test")}
    for name, _, _ in expected:
        write_png(tmp_path / name)
    assert triples(discover(tmp_path), tmp_path) == expected


def write_manifest(folder: Path, text: str, name: str = "manifest.csv") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_text(text)
    return folder / name


def test_manifest_layout(tmp_path: Path) -> None:
    """Relative paths resolve against the CSV's folder; frame and mask are read when given."""
    write_png(tmp_path / "imgs/a.png")
    write_png(tmp_path / "imgs/b.png")
    write_png(tmp_path / "imgs/b_mask.png")
    absolute = write_png(tmp_path / "elsewhere/c.png")
    csv_path = write_manifest(tmp_path, "path,label,split,frame,mask\n"
                                        "imgs/a.png,0,train,,\n"
                                        "imgs/b.png,1,TEST,3,imgs/b_mask.png\n"
                                        f"{absolute},0,val,,\n")
    expected = [Sample(tmp_path / "imgs/a.png", 0, "train"),
                Sample(tmp_path / "imgs/b.png", 1, "test", 3, tmp_path / "imgs/b_mask.png"),
                Sample(absolute, 0, "val")]
    assert discover(tmp_path) == expected
    assert discover(csv_path) == expected


ROW_ERRORS = [
    ("a.png,2,train", "label must be 0"),
    ("a.png,0,holdout", "unknown split 'holdout'"),
    ("missing.png,0,train", "image file not found"),
    ("a.png,,train", "no value in column 'label'"),
    ("a.png,0", "no value in column 'split'"),
]


@pytest.mark.parametrize("row, problem", ROW_ERRORS)
def test_manifest_row_errors(tmp_path: Path, row: str, problem: str) -> None:
    """A bad row names the CSV, its line (header = 1) and what is wrong, after a good row."""
    write_png(tmp_path / "a.png")
    csv_path = write_manifest(tmp_path, f"path,label,split\na.png,0,train\n{row}\n")
    with pytest.raises(DatasetError) as caught:
        discover(csv_path)
    message = str(caught.value)
    assert str(csv_path) in message and "line 3" in message and problem in message


def test_manifest_missing_column_and_mask(tmp_path: Path) -> None:
    """The header is line 1; a mask that does not exist is a row error too."""
    write_png(tmp_path / "a.png")
    csv_path = write_manifest(tmp_path, "path,split\na.png,train\n", "list.csv")
    with pytest.raises(DatasetError, match=r"list\.csv, line 1: missing column\(s\) label"):
        discover(csv_path)
    write_manifest(tmp_path, "path,label,split,mask\na.png,1,test,nope.png\n", "list.csv")
    with pytest.raises(DatasetError, match=r"list\.csv, line 2: mask file not found"):
        discover(csv_path)


def test_unknown_layout_lists_the_accepted_ones(tmp_path: Path) -> None:
    write_png(tmp_path / "images/a.png")
    with pytest.raises(DatasetError) as caught:
        discover(tmp_path)
    message = str(caught.value)
    assert str(tmp_path) in message
    assert all(word in message for word in ("manifest.csv", "0.normal", "images-normal-unique"))


def test_select_filters_and_refuses_empty(tmp_path: Path) -> None:
    """An empty split must stop a run, naming the split and the dataset, rather than train on nothing."""
    samples = [Sample(tmp_path / "a.png", 0, "train"), Sample(tmp_path / "b.png", 1, "test"),
               Sample(tmp_path / "c.png", 0, "test")]
    assert select(samples, "test") == samples[1:]
    assert select(samples, "test", label=1) == [samples[1]]
    with pytest.raises(DatasetError) as caught:
        select(samples, "val")
    assert "'val'" in str(caught.value) and str(tmp_path) in str(caught.value)
    with pytest.raises(DatasetError, match="abnormal images in the 'train' split"):
        select(samples, "train", label=1, root="my-data")


def bilinear_antialias_matrix(size: int, new_size: int) -> np.ndarray:
    """Rows of weights of an antialiased bilinear downscale: a triangle filter stretched by the
    scale, centred on each output pixel (half-pixel convention), renormalised at the borders."""
    scale = size / new_size
    centres = (np.arange(new_size) + 0.5) * scale - 0.5
    weights = np.clip(1 - np.abs(np.arange(size)[None, :] - centres[:, None]) / scale, 0, None)
    return weights / weights.sum(axis=1, keepdims=True)


def test_load_resized_matches_an_independent_filter(tmp_path: Path) -> None:
    """A 2x antialiased bilinear downscale is a [1, 3, 3, 1] / 8 filter per axis (not the 2x2
    block mean), from a 16-bit PNG scaled by its bit depth."""
    pixels = np.random.default_rng(0).integers(0, 65536, (16, 12), dtype=np.uint16)
    path = write_png(tmp_path / "a.png", pixels)
    out = load_resized(path, Geometry(height=8, width=6))
    expected = bilinear_antialias_matrix(16, 8) @ (pixels / 65535.0) @ bilinear_antialias_matrix(12, 6).T
    assert out.dtype == np.float32 and out.shape == (8, 6)
    np.testing.assert_allclose(out, expected, atol=1e-6)
    assert np.abs(out - (pixels / 65535.0).reshape(8, 2, 6, 2).mean(axis=(1, 3))).max() > 1e-3


def test_load_resized_keeps_a_constant_image_constant(tmp_path: Path) -> None:
    """Any size change of a flat image stays flat (weights sum to one), for a Sample too."""
    path = write_png(tmp_path / "flat.png", np.full((37, 23), 30000, np.uint16))
    out = load_resized(Sample(path, 0, "train"), Geometry(height=64, width=10))
    assert out.shape == (64, 10)
    np.testing.assert_allclose(out, 30000 / 65535, atol=1e-6)


def test_load_mask_is_nearest_and_binary(tmp_path: Path) -> None:
    """A mask keeps hard edges: 2x upscale repeats pixels, 2x downscale picks the lower-right
    pixel of each 2x2 block (pixel centres), and any other ratio agrees with torch nearest-exact."""
    bits = np.random.default_rng(1).random((6, 4)) > 0.5
    mask_path = write_png(tmp_path / "m.png", bits.astype(np.uint8) * 255)
    sample = Sample(tmp_path / "a.png", 1, "test", mask=mask_path)
    up = load_mask(sample, Geometry(height=12, width=8))
    assert up.dtype == bool
    np.testing.assert_array_equal(up, bits.repeat(2, 0).repeat(2, 1))
    np.testing.assert_array_equal(load_mask(sample, Geometry(height=3, width=2)), bits[1::2, 1::2])
    odd = load_mask(sample, Geometry(height=5, width=7))
    reference = torch.nn.functional.interpolate(torch.from_numpy(bits.astype(np.float32))[None, None],
                                                size=(5, 7), mode="nearest-exact")[0, 0].numpy() > 0.5
    np.testing.assert_array_equal(odd, reference)


def test_load_mask_without_mask_is_empty() -> None:
    mask = load_mask(Sample(Path("a.png"), 0, "val"), Geometry(height=5, width=3))
    assert mask.shape == (5, 3) and mask.dtype == bool and not mask.any()


def test_spread_takes_n_per_class_evenly_through_the_split_in_its_order():
    from swssl.data.datasets import spread

    samples = [Sample(Path(f"{i}.png"), int(i % 3 == 0), "test") for i in range(30)]  # 10 abnormal, 20 normal
    chosen = spread(samples, 4)
    assert [s.label for s in chosen].count(1) == 4 and [s.label for s in chosen].count(0) == 4
    assert chosen == sorted(chosen, key=samples.index)
    assert chosen[0] is samples[0] and samples[-1] in chosen  # both ends of each class: the whole split spanned
    assert spread(samples, 50) == samples
