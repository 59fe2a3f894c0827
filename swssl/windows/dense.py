"""Dense mode: the trunk runs once over the image; a window's embedding is the mean of the cells it covers.

With patch 128 and step 32 every pixel lies in 16 windows, so exact mode (one trunk pass per
window, as the official code) spends about 16x the arithmetic the image needs. A torchvision
ResNet trunk maps an H x W image to an H/32 x W/32 map of cells; a window whose corners lie on
multiples of 32 covers (P/32)^2 cells, and the average of those cells is its dense embedding (the
exact embedding is the average of the (P/32)^2 cells of the window run on its own). The two differ
only by context: a dense cell also sees the pixels around its window, up to the trunk's receptive
field, instead of the zero padding at the window's border.

Geometry. Window starts must be multiples of the trunk's stride, so `geometry.patch` and
`geometry.step` must be (checked by `Config.validate`). The image is zero-padded at the bottom and
right to the dense canvas (`canvas_shape`): for the "cover" grid, just enough that the regular
lattice 0, step, 2 step, ... reaches the border (the same number of windows as exact mode, the
last row and column shifted into the padding instead of aligned to the border); for "reference",
to the next multiple of the stride. Padding is zeros, i.e. background.

Tiles. Large images run in tiles whose cores are `tile` px (a multiple of the stride) and whose
inputs extend `halo` px beyond the core on every side (clipped at the canvas border). A cell
depends on the input pixels of its receptive field; `halo` is the receptive field's reach beyond
the cell rounded up to a multiple of the stride (each backbone's spec computes it, swssl/model/backbones.py:
last stage of ResNet-18: 435 px field, halo 224; ResNet-50 and Wide-ResNet-50-2 427 px, halo
224; MobileNetV2 491 px, halo 256; ResNet-18 stages 2 + 3 with a 3-cell neighbourhood: halo 128), so the cells of a core never see a tile border and the stitched map equals the
whole-image map (tested to float tolerance).
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from swssl.config import Config, Geometry
from swssl.windows.geometry import canvas_shape, grid

FeatureMap = Callable[[torch.Tensor], torch.Tensor]  # N x 1 x H x W in [0, 1] -> N x D x H/s x W/s
DEFAULT_TILE = 2048  # px of a tile's core: one pass for a 1024 x 768 slice, (2048 + 2 halo)^2 inputs for slides


def tiled_feature_map(feature_map: FeatureMap, image: torch.Tensor, halo: int, stride: int, tile: int = DEFAULT_TILE,
                      wanted: torch.Tensor | None = None) -> torch.Tensor:
    """The trunk's map (D x H/s x W/s) of `image` (H x W, both multiples of s), run in tiles.

    Each tile's core is `tile` px square; its input reaches `halo` px further on each side
    (clipped at the image border); only the core's cells are kept. With `halo` at least the
    receptive field's reach the result equals `feature_map` of the whole image. `wanted` (H/s x
    W/s bool): the cells needed; a tile whose core holds none is not run and its cells stay zero
    (at least one cell must be wanted).
    """
    height, width = image.shape
    if height % stride or width % stride or tile % stride or halo % stride:
        raise ValueError(f"image {height} x {width}, tile {tile} and halo {halo} must be multiples of {stride}")
    if height <= tile and width <= tile:
        return feature_map(image[None, None])[0]
    out: torch.Tensor | None = None
    for y in range(0, height, tile):
        for x in range(0, width, tile):
            core_rows = slice(y // stride, min(y + tile, height) // stride)
            core_cols = slice(x // stride, min(x + tile, width) // stride)
            if wanted is not None and not wanted[core_rows, core_cols].any():
                continue
            y0, x0 = max(0, y - halo), max(0, x - halo)
            cells = feature_map(image[None, None, y0:min(height, y + tile + halo), x0:min(width, x + tile + halo)])[0]
            if out is None:
                out = cells.new_zeros((cells.shape[0], height // stride, width // stride))
            out[:, core_rows, core_cols] = cells[:, core_rows.start - y0 // stride:core_rows.stop - y0 // stride,
                                                 core_cols.start - x0 // stride:core_cols.stop - x0 // stride]
    if out is None:
        raise ValueError("no cell of the image is wanted")
    return out


def covered_cells(windows: torch.Tensor, rows: np.ndarray, cols: np.ndarray, patch: int, shape: tuple[int, int],
                  stride: int) -> torch.Tensor:
    """The cells (h x w bool) that the windows marked in `windows` (R x C bool, the dense grid) cover."""
    size = patch // stride
    r0, c0, step_r, step_c = _lattice(rows, cols, stride)
    covered = torch.zeros(shape, dtype=torch.bool, device=windows.device)
    for dy in range(size):
        for dx in range(size):
            ys = slice(r0 + dy, r0 + dy + (len(rows) - 1) * step_r + 1, step_r)
            xs = slice(c0 + dx, c0 + dx + (len(cols) - 1) * step_c + 1, step_c)
            covered[ys, xs] |= windows
    return covered


def _lattice(rows: np.ndarray, cols: np.ndarray, stride: int) -> tuple[int, int, int, int]:
    """First cell and cell step of an evenly spaced dense grid, per axis."""
    step_r = int(rows[1] - rows[0]) // stride if len(rows) > 1 else 1
    step_c = int(cols[1] - cols[0]) // stride if len(cols) > 1 else 1
    return int(rows[0]) // stride, int(cols[0]) // stride, step_r, step_c


def pool_windows(cells: torch.Tensor, rows: np.ndarray, cols: np.ndarray, patch: int,
                 stride: int) -> torch.Tensor:
    """Window embeddings (R x C x D float32): the mean of the cells each window covers.

    `cells` (D x h x w) is the map of a region whose top-left pixel is (0, 0); `rows` / `cols`
    are the windows' start pixels: multiples of `stride`, evenly spaced (the dense grid).
    """
    return _over_windows(cells.float(), rows, cols, patch, stride, F.avg_pool2d).permute(1, 2, 0)


def lattice_window_max(image: torch.Tensor, rows: np.ndarray, cols: np.ndarray, patch: int,
                       stride: int) -> torch.Tensor:
    """Largest pixel of every dense-grid window (R x C), as `geometry.window_max`, in two max-pools.

    `image` (H x W, multiples of `stride`) starts at pixel (0, 0): a window's maximum is the
    maximum of the stride x stride cell maxima it covers, so no Python loop runs per window.
    """
    cell_max = F.max_pool2d(image[None, None], stride)[0]
    return _over_windows(cell_max, rows, cols, patch, stride, F.max_pool2d)[0]


def _over_windows(cells: torch.Tensor, rows: np.ndarray, cols: np.ndarray, patch: int, stride: int,
                  pool: Callable[..., torch.Tensor]) -> torch.Tensor:
    """`pool` (avg or max) of the cells (C x h x w) under each window of the dense grid: C x R x C'."""
    size = patch // stride
    r0, c0, step_r, step_c = _lattice(rows, cols, stride)
    region = cells[:, r0:r0 + (len(rows) - 1) * step_r + size, c0:c0 + (len(cols) - 1) * step_c + size]
    return pool(region[None], size, (step_r, step_c))[0]


def pad_to_canvas(image: torch.Tensor, geometry: Geometry, stride: int) -> torch.Tensor:
    """`image` (H x W) zero-padded at the bottom and right to its dense canvas (`geometry.canvas_shape`)."""
    height, width = canvas_shape(*image.shape, geometry, stride)
    return F.pad(image, (0, width - image.shape[1], 0, height - image.shape[0]))


@torch.inference_mode()
def embed_dense(feature_map: FeatureMap, image: torch.Tensor, config: Config,
                tile: int = DEFAULT_TILE) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense window embeddings (R x C x D float32) and foreground (R x C bool) of `image` (H x W, on its device)."""
    g, features = config.geometry, config.features
    canvas = pad_to_canvas(image, g, features.stride)
    rows, cols = grid(g, *image.shape)
    foreground = lattice_window_max(canvas, rows, cols, g.patch, features.stride) > config.preprocess.foreground_threshold
    cells = tiled_feature_map(feature_map, canvas, features.halo, features.stride, tile)
    return pool_windows(cells, rows, cols, g.patch, features.stride), foreground
