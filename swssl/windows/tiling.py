"""One embed-and-score loop: a window source yields embedded windows, scorers turn them into one result each.

In the spirit of MONAI's splitter / merger. Every caller (the bank's validation, swssl-eval,
swssl-infer in both geometries, the benchmarks) scores an image through `score_source`:

- a **window source** (`WindowSource`) knows where an image's windows lie (`grid`) and yields
  their embeddings in chunks (`chunks`): `ImageWindows` for an image held in memory (embedded
  whole by `embed.embed_image`, exact or dense: one chunk), `stream.SlideStream` for a frame
  streamed strip by strip (one chunk per encoder batch, or per band of window rows in dense
  mode). A chunk carries every window the scorers need: foreground windows always, background
  windows too when a scorer needs the whole grid (exact mode gives them the all-zero window's
  embedding, `embed.empty_embedding`);
- a **scorer** (`scorers.Scorer`) declares what it needs and accumulates the chunks
  (`start`, `update`, `finalize`);
- the result is an `ImageScore` per scorer: the image score, the window map, the foreground,
  where the windows lie (`WindowGrid`, for the top window and heatmaps) and the seconds taken.
"""
from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Protocol

import numpy as np
import torch

from swssl import profiling
from swssl.config import Config
from swssl.windows.embed import Encode, embed_image
from swssl.errors import ConfigError
from swssl.windows.geometry import grid

if TYPE_CHECKING:
    from swssl.scoring.scorers import Scorer


@dataclass
class Chunk:
    """Embedded windows: grid positions (K each), embeddings (K x D float32) and which are foreground (K bool;
    None when all are, as in a streamed batch: no device-to-host sync to find out)."""

    rows: torch.Tensor
    cols: torch.Tensor
    embeddings: torch.Tensor
    foreground: torch.Tensor | None = None


@dataclass(frozen=True)
class WindowGrid:
    """Where the windows of a scored image lie: start pixels and side in the image the windows were cut
    from, and the factor from that image's pixels to the source frame's (resized or scaled)."""

    rows: np.ndarray
    cols: np.ndarray
    patch: int
    to_source: tuple[float, float] = (1.0, 1.0)

    @property
    def shape(self) -> tuple[int, int]:
        return len(self.rows), len(self.cols)


@dataclass
class ImageScore:
    """One image scored by one scorer."""

    score: float
    window_scores: np.ndarray | None  # R x C float32, NaN where not scored; None: the scorer gives no map
    foreground: np.ndarray  # R x C bool: the windows that were scored
    windows: WindowGrid | None = None  # None when scored from embeddings at hand (Scorer.score)
    seconds: float = 0.0

    @property
    def scored(self) -> int:
        return int(self.foreground.sum())

    @property
    def skipped(self) -> int:
        return self.foreground.size - self.scored

    def top_window(self, shape: tuple[int, int]) -> dict[str, int] | None:
        """The highest-scored window in source pixels, clipped to the frame (`shape`): a dense-mode window
        can reach into the zero padding past the border."""
        maps = self.window_scores
        if maps is None or self.windows is None or np.isnan(maps).all():
            return None
        r, c = np.unravel_index(np.nanargmax(maps), maps.shape)
        sy, sx = self.windows.to_source
        y, x = round(self.windows.rows[r] * sy), round(self.windows.cols[c] * sx)
        return {"y": y, "x": x, "height": min(round(self.windows.patch * sy), shape[0] - y),
                "width": min(round(self.windows.patch * sx), shape[1] - x)}


class WindowSource(Protocol):
    """Where an image's windows come from (see the module docstring)."""

    grid: WindowGrid
    foreground: np.ndarray  # R x C bool, complete once `chunks` is exhausted

    def chunks(self, encode: Encode, every_window: bool) -> Iterator[Chunk]: ...


class ImageWindows:
    """An image held in memory (H x W float32 in [0, 1], at the run's geometry or any size): embedded
    whole with `embed.embed_image` (exact or dense, the config's mode), handed out as one chunk."""

    def __init__(self, image: np.ndarray | torch.Tensor, config: Config, batch_size: int = 256,
                 device: str | torch.device = "cpu", to_source: tuple[float, float] = (1.0, 1.0)):
        self.image, self.config, self.batch_size, self.device = image, config, batch_size, torch.device(device)
        rows, cols = grid(config.geometry, *image.shape)
        self.grid = WindowGrid(rows, cols, config.geometry.patch, to_source)
        self.foreground = np.zeros(self.grid.shape, dtype=bool)

    def embed(self, encode: Encode) -> tuple[torch.Tensor, torch.Tensor]:
        """Embeddings (R x C x D float32) and foreground (R x C bool) of every window, on the device."""
        embeddings, foreground = embed_image(encode, self.image, self.config, self.batch_size, self.device)
        self.foreground = foreground.cpu().numpy()
        return embeddings, foreground

    def chunks(self, encode: Encode, every_window: bool) -> Iterator[Chunk]:
        embeddings, foreground = self.embed(encode)
        rows, cols = self.grid.shape
        index = torch.arange(rows * cols, device=embeddings.device)
        yield Chunk(index // cols, index % cols, embeddings.view(rows * cols, -1), foreground.view(-1))


def score_source(source: WindowSource, encode: Encode, scorers: Mapping[str, Scorer],
                 progress: Callable[[int], None] | None = None) -> dict[str, ImageScore]:
    """Score one image with every scorer of `scorers` (name -> scorer), embedding its windows once.

    A scorer that compares grid positions (its `grid` is set) and a source of another grid is
    refused before any pixel is read. `progress(encoded)` is called after every chunk with the
    number of foreground windows embedded so far.
    """
    shape = source.grid.shape
    for name, scorer in scorers.items():
        if scorer.grid is not None and tuple(scorer.grid) != shape:
            raise ConfigError(f"the {name} scorer compares each window with the bank's windows at the same grid "
                              f"position, so it needs the run's {scorer.grid[0]} x {scorer.grid[1]} grid; this "
                              f"image has a {shape[0]} x {shape[1]} grid: use --scorer global, or the run's resize "
                              "geometry (no --scale)")
    started = time.perf_counter()
    states = {name: scorer.start(shape) for name, scorer in scorers.items()}
    every_window = any(scorer.needs == "grid" for scorer in scorers.values())
    encode = profiling.TimedEncode(encode) if profiling.enabled() else encode
    encoded = 0
    with torch.inference_mode(), contextlib.closing(source.chunks(encode, every_window)) as chunks:
        while True:  # closed on the way out: a streamed source stops its prefetch thread now
            with profiling.stage("windows"):  # cutting, foreground tests, pooling; less the encoder's calls
                chunk = next(chunks, None)
            if chunk is None:
                break
            with profiling.stage("score"):
                for state in states.values():
                    state.update(chunk)
            if progress is not None:
                encoded += len(chunk.rows) if chunk.foreground is None else int(chunk.foreground.sum())
                progress(encoded)
        foreground = torch.as_tensor(source.foreground)
        with profiling.stage("score"):
            results = {name: state.finalize(foreground) for name, state in states.items()}
    seconds = time.perf_counter() - started
    for result in results.values():
        result.windows, result.seconds = source.grid, seconds
    return results
