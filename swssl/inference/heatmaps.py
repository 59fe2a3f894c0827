"""The heatmap files of a scored slide: the window-score map (.npy) and its overlay (.png), written atomically."""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from swssl.files import atomic_write
from swssl.scoring.calibration import Calibration, Threshold
from swssl.scoring.colours import colour_scale
from swssl.scoring.metrics import top_window
from swssl.names import safe_name
from swssl.scoring.report import heat_map, save_overlay
from swssl.inference.results import HEATMAPS
from swssl.windows.tiling import ImageScore


@dataclass
class Overlay:
    """What a heatmap is drawn on: the resized frame (factor 1) or a thumbnail of a streamed frame
    (`factor` pixels of the image the windows were cut from per thumbnail pixel)."""

    image: np.ndarray | None
    factor: float = 1.0


def heatmap_name(path: str, frame: int, frames: int) -> str:
    digest = hashlib.sha1(path.encode("utf-8", "surrogateescape")).hexdigest()[:8]
    name = f"{safe_name(Path(path).stem)[:60]}-{digest}"
    return name if frames == 1 else f"{name}-f{frame}"


def write_heatmap(out_dir: Path, name: str, result: ImageScore, overlay: Overlay | None, title: list[str],
                  calibration: Calibration | None = None, threshold: Threshold | None = None) -> dict[str, str]:
    """heatmaps/<name>.npy (the window-score map) and heatmaps/<name>.png (overlay); relative paths.

    The overlay is on the run's colour scale (colours.colour_scale of `calibration` and `threshold`;
    without a calibration, the slide's own), with `title` lines above it and the top window boxed."""
    written: dict[str, str] = {}
    if result.window_scores is None:
        return written
    folder = out_dir / HEATMAPS
    maps = result.window_scores

    def save_npy(tmp: Path) -> None:
        with open(tmp, "wb") as handle:
            np.save(handle, maps)

    atomic_write(folder / f"{name}.npy", save_npy)
    written["score_map"] = f"{HEATMAPS}/{name}.npy"
    if overlay is not None and overlay.image is not None and result.windows is not None:
        image, t, windows = overlay.image, overlay.factor, result.windows
        patch = max(1, round(windows.patch / t))
        rows = np.minimum(np.floor(windows.rows / t).astype(int), image.shape[0] - patch)
        cols = np.minimum(np.floor(windows.cols / t).astype(int), image.shape[1] - patch)
        scale = colour_scale(calibration, threshold, [maps], own=True)
        top = top_window(maps, rows, cols)
        save_overlay(folder / f"{name}.png", image, heat_map(maps, rows, cols, patch, image.shape), scale, title,
                     box=None if top is None else (*top, patch, patch),
                     flagged=None if threshold is None else threshold.flags(result.score))
        written["heatmap"] = f"{HEATMAPS}/{name}.png"
    return written
