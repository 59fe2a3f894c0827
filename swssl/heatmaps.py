"""The heatmap files of a scored slide: the window-score map (.npy) and its overlay (.png), written atomically."""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from swssl.files import atomic_write
from swssl.metrics import pixel_map
from swssl.names import safe_name
from swssl.report import save_overlay
from swssl.results import HEATMAPS

if TYPE_CHECKING:
    from swssl.infer import FrameScore


def heatmap_name(path: str, frame: int, frames: int) -> str:
    digest = hashlib.sha1(path.encode("utf-8", "surrogateescape")).hexdigest()[:8]
    name = f"{safe_name(Path(path).stem)[:60]}-{digest}"
    return name if frames == 1 else f"{name}-f{frame}"


def write_heatmap(out_dir: Path, name: str, result: FrameScore, caption: str) -> dict[str, str]:
    """heatmaps/<name>.npy (the window-score map) and heatmaps/<name>.png (overlay); relative paths."""
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
    if result.image is not None:
        image = result.image
        patch = max(1, round(result.patch))
        rows = np.minimum(np.floor(result.rows).astype(int), image.shape[0] - patch)
        cols = np.minimum(np.floor(result.cols).astype(int), image.shape[1] - patch)
        scored = maps[~np.isnan(maps)]
        low, high = (float(scored.min()), float(scored.max())) if scored.size else (0.0, 1.0)
        high = high if high > low else low + 1.0
        heat = pixel_map(maps, rows, cols, patch, image.shape)
        save_overlay(folder / f"{name}.png", image, heat, low, high, f"{caption}\nheat scale {low:.4g} .. {high:.4g}")
        written["heatmap"] = f"{HEATMAPS}/{name}.png"
    return written
