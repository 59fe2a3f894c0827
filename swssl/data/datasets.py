"""Where the images of each split are, and how one image becomes the model's input.

`discover` accepts three layouts (a CSV manifest, the official chest folders, the official DBT
folders) and returns one `Sample` per image. The splits have fixed roles: "train" holds the
normal images the encoder learns from; "val" is what model selection (checkpoint choice,
thresholds) uses; "test" is only ever reported and never used for any selection.
"""
from __future__ import annotations

import csv
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from swssl import profiling
from swssl.data import readers
from swssl.config import Geometry
from swssl.errors import DatasetError

SPLITS = ("train", "val", "test")
MANIFEST_NAME = "manifest.csv"
LESIONS_NAME = "lesions.csv"  # optional, beside the manifest: one row per lesion (path, contrast, diameter_px, ...)
MANIFEST_REQUIRED = ("path", "label", "split")
RESIZE_BAND_PIXELS = 1 << 24  # source pixels per band of rows read while resizing (64 MiB as float32)
CHEST_CLASSES = {"0.normal": 0, "1.abnormal": 1}
DBT_NORMAL = ("images-normal-unique", ("train", "val", "test"), 0)
DBT_TUMOR = ("images-tumor-full", ("val", "test"), 1)

LAYOUTS_HELP = (
    "accepted layouts: "
    "(1) a CSV manifest (a .csv file, or a folder holding manifest.csv) with columns path,label,split "
    "and optional frame,mask; "
    "(2) chest: ROOT/{train,val,test}/{0.normal,1.abnormal}/<images>; "
    "(3) DBT: ROOT/images-normal-unique/{train,val,test}/<images> (normal) and "
    "ROOT/images-tumor-full/{val,test}/<images> (abnormal)"
)


@dataclass(frozen=True)
class Sample:
    """One image of a split: label 0 normal, 1 abnormal; `frame` picks a slice of a volume."""

    path: Path
    label: int
    split: str
    frame: int = 0
    mask: Path | None = None


def lesion_contrasts(root: str | Path) -> dict[Path, float]:
    """Image (resolved path) -> the contrast of its most conspicuous lesion, from ROOT/lesions.csv (the demo data
    writes one); empty when there is none. Lets a report tell subtle lesions from obvious ones."""
    root = Path(root).expanduser()
    folder = root.parent if root.is_file() else root
    path = folder / LESIONS_NAME
    if not path.is_file():
        return {}
    contrasts: dict[Path, float] = {}
    try:
        with open(path, newline="") as handle:
            for row in csv.DictReader(handle):
                image = (folder / row["path"]).resolve()
                contrasts[image] = max(contrasts.get(image, 0.0), float(row["contrast"]))
    except (OSError, KeyError, ValueError) as exc:
        raise DatasetError(f"{path}: not a lesion table with path and contrast columns ({exc})") from None
    return contrasts


def discover(root: str | Path) -> list[Sample]:
    """Every image under `root`, whichever accepted layout it follows.

    Folder layouts list the files whose suffix the readers support (hidden files skipped),
    sorted by name so that every run sees the same order; a manifest keeps its row order.
    """
    root = Path(root).expanduser()
    if not root.exists():
        raise DatasetError(f"{root}: no such file or folder")
    if root.is_file():
        if root.suffix.lower() != ".csv":
            raise DatasetError(f"{root}: not a folder or a .csv manifest; {LAYOUTS_HELP}")
        return _read_manifest(root)
    if (root / MANIFEST_NAME).is_file():
        return _read_manifest(root / MANIFEST_NAME)
    if any((root / split / name).is_dir() for split in SPLITS for name in CHEST_CLASSES):
        folders = [(root / split / name, label, split)
                   for split in SPLITS for name, label in CHEST_CLASSES.items()]
        return _from_folders(root, folders)
    if (root / DBT_NORMAL[0]).is_dir():
        folders = [(root / name / split, label, split)
                   for name, splits, label in (DBT_NORMAL, DBT_TUMOR) for split in splits]
        return _from_folders(root, folders)
    raise DatasetError(f"{root}: no dataset layout recognised; {LAYOUTS_HELP}")


def spread(samples: list[Sample], per_class: int) -> list[Sample]:
    """`per_class` normal and `per_class` abnormal samples, evenly spaced through each class's list (all of a
    smaller class): a quick evaluation that still spans the whole split, in the split's order."""
    chosen = set()
    for label in {s.label for s in samples}:
        members = [index for index, s in enumerate(samples) if s.label == label]
        if len(members) > per_class:
            members = [members[i] for i in np.linspace(0, len(members) - 1, per_class).round().astype(int)]
        chosen.update(members)
    return [samples[index] for index in sorted(chosen)]


def select(samples: list[Sample], split: str, label: int | None = None, *,
           root: str | Path | None = None) -> list[Sample]:
    """The samples of one split (and label); an empty choice is an error, not a silent no-op.

    `root` only names the dataset in the error; by default the samples' common folder.
    """
    if split not in SPLITS:
        raise DatasetError(f"unknown split {split!r}; use one of {', '.join(SPLITS)}")
    chosen = [s for s in samples if s.split == split and (label is None or s.label == label)]
    if not chosen:
        where = root if root is not None else _common_folder(samples)
        kind = {None: "", 0: "normal ", 1: "abnormal "}.get(label, f"label-{label} ")
        raise DatasetError(f"{where}: no {kind}images in the {split!r} split")
    return chosen


def load_resized(sample_or_path: Sample | str | Path, geometry: Geometry, intensity: str = "bits",
                 frame: int = 0) -> np.ndarray:
    """The image as float32 (geometry.height, geometry.width) in [0, 1].

    A Sample brings its own frame (`frame` is for a plain path). Resizing is antialiased
    bilinear, so a large downscale averages the pixels instead of skipping most of them.
    """
    if isinstance(sample_or_path, Sample):
        path, frame = sample_or_path.path, sample_or_path.frame
    else:
        path = Path(sample_or_path)
    with readers.open_image(path, intensity) as reader:
        return resize_frame(reader, frame, geometry.height, geometry.width)


def resize_frame(reader: readers.ImageReader, frame: int, height: int, width: int) -> np.ndarray:
    """One frame of `reader` resized exactly as `resize_antialiased` would, without holding the frame.

    torch's antialiased resize is separable, columns first, so resizing bands of rows to the new
    width and then the stacked bands to the new height gives the same floats, bit for bit (tested);
    memory is one band plus the H x `width` intermediate, whatever the frame's size.
    """
    rows, cols = reader.shape
    band = max(1, RESIZE_BAND_PIXELS // cols)
    narrowed = []
    with profiling.stage("resize"):
        for y in range(0, rows, band):
            with profiling.stage("read"):
                pixels = reader.read((y, 0, min(band, rows - y), cols), frame)
            narrowed.append(_interpolate(pixels, min(band, rows - y), width))
        return resize_antialiased(np.concatenate(narrowed), height, width)


def load_mask(sample: Sample, geometry: Geometry) -> np.ndarray:
    """The lesion mask as bool (geometry.height, geometry.width); all False without a mask.

    Any non-zero mask pixel is lesion. Nearest-neighbour resizing (pixel centres, as PIL's
    NEAREST) keeps the mask binary and its borders where they were.
    """
    if sample.mask is None:
        return np.zeros((geometry.height, geometry.width), dtype=bool)
    mask = readers.read_image(sample.mask) > 0
    return resize_nearest(mask, geometry.height, geometry.width)


def resize_antialiased(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """Antialiased bilinear resize (torch, align_corners=False) of a 2-D image, clamped to [0, 1]."""
    out = _interpolate(image, height, width)
    return np.clip(out, 0.0, 1.0, out=out)


def _interpolate(image: np.ndarray, height: int, width: int) -> np.ndarray:
    tensor = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))[None, None]
    return torch.nn.functional.interpolate(tensor, size=(height, width), mode="bilinear", antialias=True,
                                           align_corners=False)[0, 0].numpy()


def resize_nearest(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """Nearest-neighbour resize sampling each output pixel's centre."""
    rows = _nearest_index(image.shape[0], height)
    cols = _nearest_index(image.shape[1], width)
    return image[rows[:, None], cols[None, :]]


def _nearest_index(size: int, new_size: int) -> np.ndarray:
    index = np.floor((np.arange(new_size) + 0.5) * (size / new_size)).astype(np.int64)
    return np.minimum(index, size - 1)


def _from_folders(root: Path, folders: list[tuple[Path, int, str]]) -> list[Sample]:
    samples = [Sample(path=path, label=label, split=split)
               for folder, label, split in folders for path in _image_files(folder)]
    if not samples:
        suffixes = ", ".join(sorted(readers.SUPPORTED_SUFFIXES))
        raise DatasetError(f"{root}: the layout's folders hold no images (supported suffixes: {suffixes})")
    return samples


def _image_files(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir()
                  if p.is_file() and not p.name.startswith(".")
                  and p.suffix.lower() in readers.SUPPORTED_SUFFIXES)


def _common_folder(samples: list[Sample]) -> str:
    if not samples:
        return "empty dataset"
    return os.path.commonpath([str(s.path.parent) for s in samples])


def _read_manifest(csv_path: Path) -> list[Sample]:
    try:
        with open(csv_path, newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle)
            header = [name.strip().lower() for name in reader.fieldnames or []]
            missing = [name for name in MANIFEST_REQUIRED if name not in header]
            if missing:
                raise DatasetError(f"{csv_path}, line 1: missing column(s) {', '.join(missing)}; "
                                   f"the header needs {','.join(MANIFEST_REQUIRED)} (optional: frame,mask)")
            reader.fieldnames = header
            samples = []
            for row in reader:
                try:
                    samples.append(_parse_row(row, csv_path.parent))
                except ValueError as exc:
                    raise DatasetError(f"{csv_path}, line {reader.line_num}: {exc}") from None
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DatasetError(f"{csv_path}: cannot read the manifest: {exc}") from None
    if not samples:
        raise DatasetError(f"{csv_path}: the manifest lists no images")
    return samples


def _parse_row(row: dict[str, str | None], base: Path) -> Sample:
    """One manifest row; a ValueError's message is the row's problem."""
    values = {key: (value or "").strip() for key, value in row.items() if key is not None}
    for name in MANIFEST_REQUIRED:
        if not values.get(name):
            raise ValueError(f"no value in column {name!r}")
    if values["label"] not in ("0", "1"):
        raise ValueError(f"label must be 0 (normal) or 1 (abnormal), not {values['label']!r}")
    split = values["split"].lower()
    if split not in SPLITS:
        raise ValueError(f"unknown split {values['split']!r}; use one of {', '.join(SPLITS)}")
    frame_text = values.get("frame") or "0"
    if not frame_text.isdigit():
        raise ValueError(f"frame must be a whole number >= 0, not {frame_text!r}")
    path = _existing_file(base, values["path"], "image")
    mask = _existing_file(base, values["mask"], "mask") if values.get("mask") else None
    return Sample(path=path, label=int(values["label"]), split=split, frame=int(frame_text), mask=mask)


def _existing_file(base: Path, text: str, what: str) -> Path:
    path = Path(text).expanduser()
    path = path if path.is_absolute() else base / path
    if not path.is_file():
        raise ValueError(f"{what} file not found: {path}")
    return path
