"""Which files a `swssl-infer SLIDES...` command line means: files, folders (recursive) and globs.

Folders and globs contribute supported images only (by suffix, or DICOM by its magic bytes under
any name), never hidden files or the output folder; a file named on the command line is always tried.
"""
from __future__ import annotations

import glob
import os
from pathlib import Path
from typing import Iterable

from swssl.data import readers


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


def _folder_images(folder: Path, exclude: str | None = None) -> list[Path]:
    found = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith(".")
                         and os.path.abspath(os.path.join(root, d)) != exclude)
        found += [Path(root) / name for name in sorted(files) if _is_image_file(Path(root) / name)]
    return found


def find_slides(arguments: Iterable[str | Path], exclude: str | Path | None = None,
                ) -> tuple[list[Path], list[tuple[str, str]]]:
    """Files to score, in order, without duplicates; and (argument, problem) for arguments that give none.

    A file named on the command line is always tried (an unsupported one becomes an error row);
    folders are searched recursively and globs expanded, keeping only supported images (by suffix,
    or DICOM by its magic bytes whatever the name) and skipping hidden files and the folder
    `exclude` (the output folder, whose overlays are no slides).
    """
    exclude = None if exclude is None else os.path.abspath(exclude)
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
            found = _folder_images(path, exclude)
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
                if exclude is not None and os.path.abspath(match).startswith(exclude + os.sep):
                    continue
                found += _folder_images(match, exclude) if match.is_dir() else [match] if _is_image_file(match) else []
            if not found:
                problems.append((str(argument), "no supported image matches this pattern"))
            for item in found:
                add(item)
        else:
            problems.append((str(argument), "file not found"))
    return files, problems
