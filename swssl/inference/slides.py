"""Which files a `swssl-infer SLIDES...` command line means: files, folders (recursive) and globs.

Folders and globs contribute supported images only (by suffix, or DICOM by its magic bytes under
any name), never hidden files, the output folder, the lesion masks that a data manifest names, or what
an `--exclude` pattern matches; a file named on the command line is always tried.

Masks: for each folder a search enters (and each folder holding a glob's match), the nearest
manifest.csv at or above it is read, and the files of its `mask` column are skipped (a dataset's
masks are no slides, and would take the top scores). A manifest that cannot be read, or has no
`mask` column, names no masks.
"""
from __future__ import annotations

import csv
import fnmatch
import functools
import glob
import os
from pathlib import Path
from typing import Iterable, Sequence

from swssl.data import readers
from swssl.data.datasets import MANIFEST_NAME


def _is_image_file(path: Path) -> bool:
    """A file a folder or glob contributes: a supported suffix, or DICOM by its magic under any name."""
    if path.name.startswith(".") or not path.is_file():
        return False
    if path.suffix.lower() in readers.SUPPORTED_SUFFIXES:
        return True
    try:
        with open(path, "rb") as handle:
            return handle.read(132)[128:] == b"DICM"
    except OSError:
        return False


def _nearest_manifest(folder: str) -> str | None:
    """The manifest.csv in `folder` (absolute) or the nearest folder above it; None when there is none."""
    while True:
        candidate = os.path.join(folder, MANIFEST_NAME)
        if os.path.isfile(candidate):
            return candidate
        parent = os.path.dirname(folder)
        if parent == folder:
            return None
        folder = parent


def _manifest_masks(manifest: str | None) -> frozenset[str]:
    """Absolute paths of the files in a manifest's `mask` column (none for no, an unreadable or a mask-less manifest)."""
    if manifest is None:
        return frozenset()
    base = os.path.dirname(manifest)
    try:
        with open(manifest, newline="", encoding="utf-8-sig") as handle:
            rows = csv.DictReader(handle)
            column = next((name for name in rows.fieldnames or [] if name.strip().lower() == "mask"), None)
            texts = [(row.get(column) or "").strip() for row in rows] if column else []
    except (OSError, UnicodeDecodeError, csv.Error):
        return frozenset()
    return frozenset(os.path.abspath(os.path.join(base, os.path.expanduser(t))) for t in texts if t)


def _excluded(relative: str, patterns: Sequence[str]) -> bool:
    """Whether a path (relative to the scanned folder, "/"-separated) or its name matches an --exclude pattern."""
    name = relative.rsplit("/", 1)[-1]
    return any(fnmatch.fnmatchcase(relative, p) or fnmatch.fnmatchcase(name, p) for p in patterns)


class _Filter:
    """What a folder or glob contributes: images, not in the output folder, not excluded, not a manifest's mask
    (each manifest read once per search)."""

    def __init__(self, out_dir: str | None, patterns: Sequence[str]):
        self.out_dir, self.patterns = out_dir, tuple(patterns)
        self.masks = functools.lru_cache(maxsize=None)(lambda folder: _manifest_masks(_nearest_manifest(folder)))

    def wanted(self, path: Path, relative: str) -> bool:
        return (not _excluded(relative, self.patterns) and _is_image_file(path)
                and os.path.abspath(path) not in self.masks(os.path.abspath(path.parent)))

    def folder_images(self, folder: Path) -> list[Path]:
        found = []
        for root, dirs, files in os.walk(folder):
            relative = Path(root).relative_to(folder).as_posix()
            prefix = "" if relative == "." else relative + "/"
            dirs[:] = sorted(d for d in dirs if not d.startswith(".") and not _excluded(prefix + d, self.patterns)
                             and os.path.abspath(os.path.join(root, d)) != self.out_dir)
            found += [Path(root) / name for name in sorted(files) if self.wanted(Path(root) / name, prefix + name)]
        return found


def find_slides(arguments: Iterable[str | Path], out_dir: str | Path | None = None, exclude: Sequence[str] = (),
                ) -> tuple[list[Path], list[tuple[str, str]]]:
    """Files to score, in order, without duplicates; and (argument, problem) for arguments that give none.

    A file named on the command line is always tried (an unsupported one becomes an error row);
    folders are searched recursively and globs expanded, keeping only supported images (by suffix,
    or DICOM by its magic bytes whatever the name) and skipping hidden files, the folder `out_dir`
    (the output folder, whose overlays are no slides), the masks a manifest names (module docstring)
    and what an `exclude` glob matches (fnmatch, case-sensitive, on the name or the path relative to
    the scanned folder, or for a glob's match its path as matched; a folder matched is not entered).
    """
    out_dir = None if out_dir is None else os.path.abspath(out_dir)
    keep = _Filter(out_dir, exclude)
    files: list[Path] = []
    problems: list[tuple[str, str]] = []
    seen: set[str] = set()

    def add(path: Path) -> None:
        key = os.path.abspath(path)
        if key not in seen:
            seen.add(key)
            files.append(Path(key))

    for argument in arguments:
        text = os.path.expanduser(str(argument))
        path = Path(text)
        if path.is_dir():
            found = keep.folder_images(path)
            if not found:
                problems.append((str(argument), "folder holds no supported image "
                                 f"({', '.join(sorted(readers.SUPPORTED_SUFFIXES))} or DICOM)"))
            for item in found:
                add(item)
        elif path.exists():
            add(path)
        elif glob.has_magic(text):
            matches = sorted(glob.glob(text, recursive=True))
            found = []
            for match in map(Path, matches):
                if out_dir is not None and os.path.abspath(match).startswith(out_dir + os.sep):
                    continue
                if match.is_dir():
                    found += [] if _excluded(match.as_posix(), exclude) else keep.folder_images(match)
                elif keep.wanted(match, match.as_posix()):
                    found.append(match)
            if not found:
                problems.append((str(argument), "no supported image matches this pattern"))
            for item in found:
                add(item)
        else:
            problems.append((str(argument), "file not found"))
    return files, problems
