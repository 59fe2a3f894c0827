"""Streaming a slide of any size through the encoder: strips in, windows cut on the device, bounded memory.

In the spirit of MONAI's `sliding_window_inference`, but for images that never fit in memory.
`SlideStream` walks one frame of an `ImageReader` row of windows by row of windows:

- A prefetch thread reads the frame in horizontal blocks of source rows (`reader.read((y, 0, h,
  width), frame)`: lazy tile reads for tiled TIFF/BigTIFF/SVS, slices of a memory map for .npy, of
  the decoded frame for DICOM/PNG), converts each to a torch tensor (pinned memory on CUDA) and
  puts it in a bounded queue. Every source row is read once, in order.
- The main thread uploads each block once (non_blocking), downsamples it on the device when the
  slide is scaled, and appends it to a rolling device strip, dropping the rows above the current
  row of windows. The strip holds at most `patch + block_rows` rows.
- For each row of windows it runs the foreground test, then cuts only the foreground windows
  out of the strip on the device (`embed.grid_windows`) and hands them out in batches of exactly
  `batch_size` windows, accumulated across rows in row-major order (the same batches, in the same
  order, as `embed.embed_image` forms for the whole image held in memory).

Memory: host, about `prefetch + 2` blocks of `block_rows x scale^-1` source rows x width float32
(32 MiB each by default) plus the reader's own buffers (a DICOM or PNG frame is decoded whole by
its library); device, the strip, one batch of windows, the encoder and the bank.

Geometry. The windows follow `geometry.grid(config.geometry, H', W')` on the scaled frame
H' x W' = (H // k) x (W // k) for `scale = 1/k`, k a whole number. Scaling is area averaging: each
output pixel is the mean of a k x k block of source pixels (`avg_pool2d(frame, k)`; the last
H mod k rows and W mod k columns are dropped). Blocks of source rows start at multiples of k, so
the strip-wise downsampling is exactly the downsampling of the whole frame. Other factors are
refused.

Foreground rule (exactly `geometry.window_max(...) > preprocess.foreground_threshold`, decided on a
downsampled view): let g be the greatest common divisor of the patch, the frame width W' and every
window's start column. Every window's left and right edges are then multiples of g, so its maximum
is the maximum over its P/g column blocks of the block maxima. Each incoming block of rows is
max-pooled by g along the columns once (1/g of its size, kept beside the strip); a row of windows
takes the maximum of that view over its P rows and then over each window's P/g blocks. Windows
whose maximum is not above the threshold are never cut or encoded; they are counted.

Dense mode (`geometry.mode = "dense"`, swssl/windows/dense.py): `SlideStream.dense_bands` walks the same
strip in bands of window rows instead; each band's slab of rows (with the trunk's halo above and
below, zero rows past the frame) goes once through the trunk in tiles and its windows pool their
cells. A band without foreground windows is not run when only foreground windows are scored.

`SlideStream.chunks` is the window source that swssl.windows.tiling's one embed-and-score loop consumes.
"""
from __future__ import annotations

import contextlib
import math
import queue
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from functools import reduce

import numpy as np
import torch
import torch.nn.functional as F

from swssl import profiling
from swssl.config import Config
from swssl.windows.dense import (DEFAULT_TILE, FeatureMap, covered_cells, lattice_window_max, pool_windows,
                                 tiled_feature_map)
from swssl.windows.embed import Encode, empty_embedding, grid_windows
from swssl.errors import ConfigError, ImageReadError
from swssl.windows.geometry import canvas_shape, grid
from swssl.data.readers import ImageReader
from swssl.windows.tiling import Chunk, WindowGrid

BLOCK_BYTES = 1 << 25  # about 32 MiB of float32 source rows per block read by the prefetch thread
_DONE = object()


def scale_factor(scale: float) -> int:
    """The whole number k with scale == 1/k (1, 0.5, 0.25, 0.2, ...); ConfigError for other factors."""
    if not isinstance(scale, (int, float)) or not math.isfinite(scale) or not 0 < scale <= 1:
        raise ConfigError(f"--scale must be 1/k for a whole number k >= 1 (1, 0.5, 0.25, ...), not {scale!r}")
    k = round(1 / scale)
    if abs(1 / scale - k) > 1e-6 * k:
        raise ConfigError(f"--scale {scale} is not 1/k for a whole number k: the slide is downsampled by "
                          "averaging k x k pixel blocks, so use 1, 0.5, 0.25, 0.2, 0.125, ...")
    return k


def scaled_shape(shape: tuple[int, int], scale: float) -> tuple[int, int]:
    """Size of a frame of `shape` after downsampling by `scale` = 1/k (remainder rows / columns dropped)."""
    k = scale_factor(scale)
    return shape[0] // k, shape[1] // k


def native_grid(shape: tuple[int, int], config: Config, scale: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """Window start rows and columns of a frame of `shape` cut natively at `scale`; ConfigError if too small."""
    height, width = scaled_shape(shape, scale)
    patch = config.geometry.patch
    if min(height, width) < patch:
        raise ConfigError(f"the frame is {shape[0]} x {shape[1]} px ({height} x {width} at scale {scale:g}), "
                          f"smaller than one {patch} px window")
    return grid(config.geometry, height, width)


@dataclass
class WindowBatch:
    """Foreground windows (K x 1 x P x P float32 on the device) and their grid positions (K each, on the device)."""

    rows: torch.Tensor
    cols: torch.Tensor
    windows: torch.Tensor


class SlideStream:
    """One frame of a reader, streamed as batches of foreground windows (see the module docstring).

    A `tiling.WindowSource`: `grid` says where the windows lie, `chunks` embeds them. After
    iterating `batches()`, `dense_bands()` or `chunks()` to the end: `foreground` (R x C bool,
    numpy) tells which windows were encoded, `scored` / `skipped` count them, and `thumbnail`
    (when `thumbnail_side` was given) is the frame downsampled by `thumbnail_factor` (area mean)
    for overlays.
    """

    def __init__(self, reader: ImageReader, frame: int, config: Config, *, scale: float = 1.0,
                 device: str | torch.device = "cpu", prefetch: int = 2, block_rows: int | None = None,
                 thumbnail_side: int | None = None, batch_size: int = 256, tile: int = DEFAULT_TILE):
        self.reader, self.frame, self.config = reader, frame, config
        self.batch_size, self.tile = batch_size, tile
        self.k = scale_factor(scale)
        self.scale = 1.0 / self.k
        self.device = torch.device(device)
        self.prefetch = max(1, int(prefetch))
        self.patch = config.geometry.patch
        self.threshold = float(config.preprocess.foreground_threshold)
        self.rows, self.cols = native_grid(tuple(reader.shape), config, scale)
        self.grid = WindowGrid(self.rows, self.cols, self.patch, (float(self.k), float(self.k)))
        self.shape = scaled_shape(tuple(reader.shape), scale)
        height, width = self.shape
        self.want_thumbnail = bool(thumbnail_side)
        self.thumbnail_factor = 1 if not thumbnail_side else max(1, math.ceil(max(height, width) / thumbnail_side))
        if block_rows is None:  # scaled rows per block: at least a window, about BLOCK_BYTES of source rows
            block_rows = max(self.patch, BLOCK_BYTES // (4 * width * self.k * self.k))
        t = self.thumbnail_factor
        self.block_rows = max(1, math.ceil(int(block_rows) / t)) * t  # blocks align to the thumbnail's pixels
        # Column pooling width: every window edge (start, start + P) and the width are multiples of it.
        self.pool = reduce(math.gcd, [int(c) for c in self.cols], math.gcd(self.patch, width))
        self.foreground = np.zeros((len(self.rows), len(self.cols)), dtype=bool)
        self.scored = self.skipped = 0
        self.thumbnail: np.ndarray | None = None

    @property
    def windows(self) -> int:
        return len(self.rows) * len(self.cols)

    # --- the prefetch thread ---------------------------------------------------------------------

    def _spans(self) -> list[tuple[int, int]]:
        """Source row ranges of the blocks, top to bottom, covering the scaled frame's rows."""
        height = self.shape[0]
        return [(y * self.k, min(y + self.block_rows, height) * self.k) for y in range(0, height, self.block_rows)]

    def _read_blocks(self, spans: list[tuple[int, int]], out: queue.Queue, stop: threading.Event) -> None:
        width = self.shape[1] * self.k
        pin = self.device.type == "cuda"

        def put(item: object) -> bool:
            while not stop.is_set():
                try:
                    out.put(item, timeout=0.1)
                    return True
                except queue.Full:
                    continue
            return False

        try:
            for y0, y1 in spans:
                if stop.is_set():
                    return
                with profiling.stage("read" + profiling.PREFETCH):
                    block = torch.from_numpy(self.reader.read((y0, 0, y1 - y0, width), self.frame))
                    block = block.pin_memory() if pin else block
                if not put(block):
                    return
            put(_DONE)
        except BaseException as exc:  # handed to the main thread, which raises it there
            put(exc)

    # --- the main thread -------------------------------------------------------------------------

    def _upload(self, block: torch.Tensor) -> torch.Tensor:
        with profiling.stage("upload"):
            block = block.to(self.device, non_blocking=True)
            if self.k > 1:
                block = F.avg_pool2d(block[None, None], self.k)[0, 0]
            return block

    @staticmethod
    def _next(blocks: queue.Queue) -> object:
        with profiling.stage("wait"):  # for the prefetch thread: the reading that the overlap does not hide
            return blocks.get()

    def _blocks(self) -> Iterator[torch.Tensor]:
        """The frame's blocks of scaled rows on the device, top to bottom, read ahead by the prefetch thread.

        Collects the thumbnail as it goes (set once the last block has been taken).
        """
        blocks: queue.Queue = queue.Queue(maxsize=self.prefetch)
        stop = threading.Event()
        reader_thread = threading.Thread(target=self._read_blocks, args=(self._spans(), blocks, stop), daemon=True,
                                         name="swssl-prefetch")
        reader_thread.start()
        thumbs: list[torch.Tensor] = []
        try:
            while (item := self._next(blocks)) is not _DONE:
                if isinstance(item, BaseException):
                    raise item
                block = self._upload(item)
                if self.want_thumbnail:
                    t = self.thumbnail_factor
                    thumbs.append(block if t == 1 else F.avg_pool2d(block[None, None], t, ceil_mode=True)[0, 0])
                yield block
            if thumbs:
                self.thumbnail = torch.cat(thumbs).float().cpu().numpy()
        finally:
            stop.set()
            reader_thread.join(timeout=5)

    def _finish(self, source: Iterator[torch.Tensor]) -> None:
        """Read the rows below the last window row (the thumbnail needs them) and count the windows."""
        for _ in source:
            pass
        self.scored = int(self.foreground.sum())
        self.skipped = self.windows - self.scored

    @torch.inference_mode()
    def batches(self, batch_size: int = 256) -> Iterator[WindowBatch]:
        """Batches of exactly `batch_size` foreground windows (the last one smaller), in row-major order."""
        if batch_size < 1:
            raise ConfigError(f"batch size must be at least 1, not {batch_size}")
        patch, pool = self.patch, self.pool
        strip = _Strip(self._blocks(), self.shape[1], self.device, self.reader.path, pool)
        col_blocks = torch.as_tensor(self.cols // pool, device=self.device)
        pending: list[WindowBatch] = []
        count = 0
        try:
            for r, y in enumerate(self.rows.tolist()):
                rows, pooled = strip.span(y, y + patch)
                row_max = pooled.amax(0)  # (W'/pool,)
                window_max = row_max.unfold(0, patch // pool, 1)[col_blocks].amax(-1)  # (C,)
                wanted = (window_max > self.threshold).nonzero().squeeze(1)
                fg_row = np.zeros(len(self.cols), dtype=bool)
                fg_row[wanted.cpu().numpy()] = True
                self.foreground[r] = fg_row
                start = 0
                while start < len(wanted):
                    take = wanted[start:start + batch_size - count]
                    start += len(take)
                    windows = grid_windows(rows, np.zeros(1, dtype=np.int64), self.cols, patch,
                                           torch.zeros_like(take), take)
                    pending.append(WindowBatch(torch.full_like(take, r), take, windows))
                    count += len(take)
                    if count == batch_size:
                        yield _concat(pending)
                        pending, count = [], 0
            if pending:
                yield _concat(pending)
            self._finish(strip.blocks)
        finally:
            strip.blocks.close()  # stops the prefetch thread now, also when the consumer stopped early

    @torch.inference_mode()
    def dense_bands(self, feature_map: FeatureMap, tile: int = DEFAULT_TILE,
                    skip_background: bool = True) -> Iterator[DenseBand]:
        """Dense mode: the window rows of the frame in bands, embedded from one trunk pass per band.

        A band of window rows needs the rows from its first window's top minus the halo to its
        last window's bottom plus the halo (clipped to the zero-padded canvas, swssl/windows/dense.py): the
        slab is cut from a rolling strip of scaled rows, run through `dense.tiled_feature_map`
        (tiles of `tile` px along the columns), and each window pools its cells. As many window
        rows go in a band as keep the slab within `tile` rows. With `skip_background`, a band with
        no foreground window is not run (its embeddings are None), nor a tile of a band whose
        core holds no cell of a foreground window (those windows' embeddings are then meaningless).
        Memory: the strip and the slab (<= tile + halo rows x canvas width float32), the band's
        cells (D x tile/32 x width/32) and its window embeddings.
        """
        g = self.config.geometry
        features = self.config.features
        halo, stride = features.halo, features.stride
        canvas_h, canvas_w = canvas_shape(*self.shape, g, stride)
        per_band = max(1, (tile - 2 * halo - self.patch) // g.step + 1)
        strip = _Strip(self._blocks(), self.shape[1], self.device, self.reader.path)
        try:
            for r0 in range(0, len(self.rows), per_band):
                rows = self.rows[r0:r0 + per_band]
                top, end = max(0, int(rows[0]) - halo), min(canvas_h, int(rows[-1]) + self.patch + halo)
                slab, _ = strip.span(top, min(end, self.shape[0]))
                slab = F.pad(slab, (0, canvas_w - slab.shape[1], 0, end - top - slab.shape[0]))  # zeros past the frame
                local = rows - top
                foreground = lattice_window_max(slab, local, self.cols, self.patch, stride) > self.threshold
                self.foreground[r0:r0 + len(rows)] = foreground.cpu().numpy()
                embeddings = None
                if foreground.any() or not skip_background:
                    cells_shape = (len(slab) // stride, canvas_w // stride)
                    wanted = covered_cells(foreground, local, self.cols, self.patch, cells_shape,
                                           stride) if skip_background else None
                    cells = tiled_feature_map(feature_map, slab, halo, stride, tile, wanted)
                    embeddings = pool_windows(cells, local, self.cols, self.patch, stride)
                yield DenseBand(r0, embeddings, foreground)
            self._finish(strip.blocks)
        finally:
            strip.blocks.close()

    def chunks(self, encode: Encode, every_window: bool) -> Iterator[Chunk]:
        """The frame's embedded windows for swssl.windows.tiling: foreground windows per encoder batch (exact
        mode) or per band (dense mode); with `every_window`, the background windows too (exact mode:
        the all-zero window's embedding, after the last batch)."""
        if self.config.geometry.mode == "dense":
            with contextlib.closing(self.dense_bands(encode.feature_map, self.tile,
                                                     skip_background=not every_window)) as bands:
                for band in bands:
                    if band.embeddings is None:
                        continue
                    chosen = torch.ones_like(band.foreground) if every_window else band.foreground
                    where = chosen.nonzero()
                    yield Chunk(where[:, 0] + band.first_row, where[:, 1], band.embeddings[chosen],
                                band.foreground[chosen] if every_window else None)
            return
        with contextlib.closing(self.batches(self.batch_size)) as batches:
            for batch in batches:
                yield Chunk(batch.rows, batch.cols, encode(batch.windows).float())
        if not every_window:
            return
        background = torch.as_tensor(~self.foreground, device=self.device).nonzero()
        if len(background):
            empty = empty_embedding(encode, self.patch, self.device)
            yield Chunk(background[:, 0], background[:, 1], empty.expand(len(background), -1),
                        torch.zeros(len(background), dtype=torch.bool, device=self.device))


class _Strip:
    """A rolling strip of the frame's scaled rows on the device, filled from the blocks in order.

    `span(top, end)` drops the rows above `top`, receives blocks until row `end` is in, and gives
    rows [top, end) (with `pool`, also their maxima over column groups of `pool`, kept beside the
    strip for the foreground test). The strip never holds rows above the last `top` asked for.
    """

    def __init__(self, blocks: Iterator[torch.Tensor], width: int, device: torch.device, path, pool: int = 1):
        self.blocks, self.path, self.pool = blocks, path, pool
        self.rows = torch.zeros((0, width), device=device)
        self.pooled = torch.zeros((0, width // pool), device=device)
        self.bottom = 0  # scaled rows received so far; the strip holds rows [bottom - len(rows), bottom)

    def span(self, top: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        keep = min(len(self.rows), self.bottom - top) if self.bottom > top else 0
        self.rows, self.pooled = self.rows[len(self.rows) - keep:], self.pooled[len(self.pooled) - keep:]
        while self.bottom < end:
            block = next(self.blocks, None)
            if block is None:
                raise ImageReadError(self.path, "the frame ended before its last row of windows")
            self.bottom += len(block)
            skip = max(0, top - (self.bottom - len(block)))  # rows of a block above `top` (step > patch)
            if skip < len(block):
                block = block[skip:]
                self.rows = torch.cat([self.rows, block])
                if self.pool > 1:
                    self.pooled = torch.cat([self.pooled, block.view(len(block), -1, self.pool).amax(-1)])
                else:
                    self.pooled = self.rows
        first = self.bottom - len(self.rows)
        return self.rows[top - first:end - first], self.pooled[top - first:end - first]


@dataclass
class DenseBand:
    """Window rows first_row.. of a frame in dense mode: embeddings (rows x C x D, or None when not
    run) and foreground (rows x C bool), on the device."""

    first_row: int
    embeddings: torch.Tensor | None
    foreground: torch.Tensor


def _concat(parts: list[WindowBatch]) -> WindowBatch:
    if len(parts) == 1:
        return parts[0]
    return WindowBatch(torch.cat([p.rows for p in parts]), torch.cat([p.cols for p in parts]),
                       torch.cat([p.windows for p in parts]))
