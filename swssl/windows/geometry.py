"""Where the windows of an image lie: one place for the sliding-window grid."""
from __future__ import annotations

import math

import numpy as np
import torch

from swssl.config import Geometry


def window_starts(length: int, patch: int, step: int, policy: str = "cover") -> np.ndarray:
    """Start offsets of the windows along one axis.

    "cover": every `step` px, plus a last window aligned to the border when the steps do not
    land on it, so every pixel lies in some window. "reference": the official evaluate.py grid,
    `(length - patch) // step` windows, which never sees the last strip of the image.
    """
    if patch > length:
        raise ValueError(f"window of {patch} px does not fit in {length} px")
    if policy == "reference":
        return np.arange((length - patch) // step) * step
    starts = np.arange(0, length - patch + 1, step)
    if starts[-1] != length - patch:
        starts = np.append(starts, length - patch)
    return starts


def canvas_shape(height: int, width: int, geometry: Geometry, stride: int) -> tuple[int, int]:
    """The size an image is embedded at: itself in exact mode; zero-padded at the bottom and right in dense mode.

    Dense windows must start on multiples of the trunk's `stride`. For the "cover" grid the canvas
    is just large enough that the lattice 0, step, 2 step, ... reaches the border (as many windows
    as exact mode; the last row and column shifted into the padding instead of aligned to the
    border); for "reference" it is the next multiple of the stride.
    """
    if geometry.mode != "dense":
        return height, width
    if geometry.grid == "cover":
        return _cover_length(height, geometry), _cover_length(width, geometry)
    return math.ceil(height / stride) * stride, math.ceil(width / stride) * stride


def _cover_length(length: int, g: Geometry) -> int:
    """The dense canvas side of the "cover" grid: the lattice 0, step, 2 step, ... reaches the border."""
    return g.patch + math.ceil(max(0, length - g.patch) / g.step) * g.step


def grid(geometry: Geometry, height: int | None = None, width: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Row and column start offsets for an image (the configured size unless given)."""
    height = geometry.height if height is None else height
    width = geometry.width if width is None else width
    if geometry.grid == "cover" and geometry.mode == "dense":
        height, width = _cover_length(height, geometry), _cover_length(width, geometry)
    return (window_starts(height, geometry.patch, geometry.step, geometry.grid),
            window_starts(width, geometry.patch, geometry.step, geometry.grid))


def window_max(image: torch.Tensor, rows: np.ndarray, cols: np.ndarray, patch: int) -> torch.Tensor:
    """Largest pixel of every window, shape (len(rows), len(cols)): the foreground test's input.

    Separable (rows first, then columns), so it reads each window's pixels about twice in all
    rather than patch^2 times as a stride-1 max-pool would.
    """
    row_max = torch.stack([image[y:y + patch].amax(0) for y in rows.tolist()])
    return torch.stack([row_max[:, x:x + patch].amax(1) for x in cols.tolist()], dim=1)
