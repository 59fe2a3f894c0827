"""The SWSSL training sample: a window, its inverted twin, and a neighbour with its similarity target.

One sample, as the official dataset.py draws it, from an image resized to the run's geometry:
- a random grid position whose window is not empty (its max pixel above the foreground threshold);
- view 1: that window, augmented; view 2: the same window of the inverted image (1 - x), augmented;
- neighbour: another non-empty position within `neighbour_range` grid steps on each axis (never the
  same position), not augmented;
- target: per axis 0.5 / (d + 1), and 0 when d equals the range; the sum over both axes.
Unlike the official code every view gets the same normalisation (inside the encoder).
All randomness is torch's, so DataLoader workers are seeded reproducibly.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset
from torchvision.transforms import v2

from swssl.config import Augment, Config
from swssl.errors import DatasetError
from swssl.windows.geometry import grid, window_max


def neighbour_target(d_row: torch.Tensor, d_col: torch.Tensor, neighbour_range: int = 3) -> torch.Tensor:
    """Similarity target of a neighbour |d_row|, |d_col| grid steps away."""
    def per_axis(d: torch.Tensor) -> torch.Tensor:
        d = d.abs().float()
        return torch.where(d == neighbour_range, torch.zeros_like(d), 0.5 / (d + 1))
    return per_axis(d_row) + per_axis(d_col)


def augmentation(aug: Augment, patch: int) -> v2.Compose:
    """The official per-view augmentation, on 1 x P x P float windows in [0, 1]."""
    kernel = 2 * int(np.ceil(3 * aug.blur_sigma[1])) + 1
    return v2.Compose([
        v2.RandomResizedCrop(patch, scale=aug.crop_scale, antialias=True),
        v2.RandomApply([v2.ColorJitter(brightness=aug.brightness, contrast=aug.contrast)], p=aug.jitter_p),
        v2.RandomApply([v2.GaussianBlur(kernel, sigma=aug.blur_sigma)], p=aug.blur_p),
        v2.RandomSolarize(threshold=0.5, p=aug.solarize_p),
    ])


class WindowTriplets(Dataset):
    """`windows_per_image` samples per image and epoch; each is (view1, view2, neighbour, target)."""

    def __init__(self, images: list[Callable[[], np.ndarray]], names: list[str], config: Config):
        self.images, self.names = images, names
        g = config.geometry
        # Training always cuts whole windows from the image: the mode only changes how they are embedded.
        self.rows, self.cols = grid(dataclasses.replace(g, mode="exact"))
        self.patch = g.patch
        self.threshold = config.preprocess.foreground_threshold
        self.range = config.train.neighbour_range
        self.repeats = config.train.windows_per_image
        self.augment = augmentation(config.augment, g.patch)

    def __len__(self) -> int:
        return len(self.images) * self.repeats

    def __getitem__(self, index: int):
        which = index % len(self.images)
        image = torch.from_numpy(np.asarray(self.images[which](), dtype=np.float32))
        valid = window_max(image, self.rows, self.cols, self.patch) > self.threshold
        anchors = valid & (self._neighbour_count(valid) > 0)
        if not anchors.any():
            raise DatasetError(f"{self.names[which]}: no pair of non-empty neighbouring windows to train on")
        r, c = _pick(anchors)
        box = torch.zeros_like(valid)
        box[max(r - self.range, 0):r + self.range + 1, max(c - self.range, 0):c + self.range + 1] = True
        box[r, c] = False
        nr, nc = _pick(box & valid)
        window = self._cut(image, r, c)
        return (self.augment(window), self.augment(1.0 - window), self._cut(image, nr, nc),
                neighbour_target(torch.tensor(nr - r), torch.tensor(nc - c), self.range))

    def _cut(self, image: torch.Tensor, r: int, c: int) -> torch.Tensor:
        y, x = int(self.rows[r]), int(self.cols[c])
        return image[y:y + self.patch, x:x + self.patch].unsqueeze(0).clone()

    def _neighbour_count(self, valid: torch.Tensor) -> torch.Tensor:
        size = 2 * self.range + 1
        ones = torch.ones(1, 1, size, size)
        counts = F.conv2d(valid[None, None].float(), ones, padding=self.range)[0, 0]
        return counts - valid.float()


def _pick(mask: torch.Tensor) -> tuple[int, int]:
    """A uniformly random True position of a 2-D mask."""
    positions = mask.nonzero()
    r, c = positions[torch.randint(len(positions), ()).item()].tolist()
    return r, c
