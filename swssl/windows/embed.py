"""Batched window embedding: windows are cut from an image already on the device, never one call each.

The image is uploaded once; `unfold` gives a strided view of every possible window without
copying, and each batch gathers only the grid windows it needs. Windows judged empty by the
foreground test are not encoded: they all get the embedding of an all-zero window, computed
once per image, which is exact when `foreground_threshold` is 0 (an empty window is all zeros).
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from swssl.config import Config
from swssl.windows.geometry import grid, window_max

Encode = Callable[[torch.Tensor], torch.Tensor]  # N x 1 x P x P in [0, 1] -> N x D


def grid_windows(image: torch.Tensor, rows: np.ndarray, cols: np.ndarray, patch: int,
                 r_index: torch.Tensor, c_index: torch.Tensor) -> torch.Tensor:
    """The windows at grid positions (r_index[k], c_index[k]) as a K x 1 x P x P tensor on the image's device."""
    every = image.unfold(0, patch, 1).unfold(1, patch, 1)  # (H-P+1) x (W-P+1) x P x P view, no copy
    ys = torch.as_tensor(rows, device=image.device)[r_index]
    xs = torch.as_tensor(cols, device=image.device)[c_index]
    return every[ys, xs].unsqueeze(1)


def empty_embedding(encode: Encode, patch: int, device: torch.device) -> torch.Tensor:
    """The embedding (1 x D float32) of an all-zero window: what every window without foreground gets."""
    return encode(torch.zeros(1, 1, patch, patch, device=device)).float()


@torch.inference_mode()
def embed_image(encode: Encode, image: np.ndarray | torch.Tensor, config: Config, batch_size: int = 256,
                device: str | torch.device = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Embeddings (R x C x D, float32) and foreground mask (R x C, bool) of every grid window of `image`.

    Exact mode encodes the windows in batches (`encode(windows)`); dense mode runs
    `encode.feature_map` over the image once and pools each window's cells (swssl/windows/dense.py).
    `image` is a float32 H x W array in [0, 1] at the run's geometry (or any size: the grid
    follows the image). Both results live on `device`.
    """
    device = torch.device(device)
    pixels = torch.as_tensor(image, dtype=torch.float32).to(device)
    g = config.geometry
    if g.mode == "dense":
        from swssl.windows.dense import embed_dense

        return embed_dense(encode.feature_map, pixels, config)
    rows, cols = grid(g, *pixels.shape)
    foreground = window_max(pixels, rows, cols, g.patch) > config.preprocess.foreground_threshold
    out = empty_embedding(encode, g.patch, device).expand(len(rows) * len(cols), -1).clone()
    wanted = foreground.flatten().nonzero().squeeze(1)
    for start in range(0, len(wanted), batch_size):
        index = wanted[start:start + batch_size]
        windows = grid_windows(pixels, rows, cols, g.patch, index // len(cols), index % len(cols))
        out[index] = encode(windows).float()
    return out.view(len(rows), len(cols), -1), foreground
