"""Scorers: how far each window of a test image lies from the normal windows of the bank.

Distances are squared-L2 expansions |a|^2 + |b|^2 - 2ab computed as chunked (batched) matmuls
on the device in float32, whatever the bank's storage dtype, so memory stays bounded by the
chunk size (stated per scorer) and not by the bank size.

- `aligned`: per grid position, the smallest distance to the training windows at that position
  (or within +-radius positions); the paper's setting for registered, resized images.
- `global`: mean distance to the k nearest bank windows anywhere (foreground windows only),
  optionally over a k-center-greedy coreset; works for images of any size.
- `reference`: the official evaluate.py aggregation, exactly: norms over positions, min over
  training images, max over channels. No per-window map.
Image score of `aligned` / `global`: the maximum over scored windows, or the mean of the top k.

The interface (`Scorer`) is what the one tiling loop (swssl.windows.tiling) needs: what the scorer
`needs` ("windows": each foreground window on its own, so a slide of any size is scored batch
by batch as it streams; "grid": every window of the bank's grid at once), and `start()`, an
accumulator whose `update(chunk)` takes embedded windows as they come and whose
`finalize(foreground)` gives the image's `ImageScore`. A new scorer is one class here and its
row in swssl.registry.SCORERS (its name, command-line options and help).
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import ClassVar, Literal, Protocol

import torch
import torch.nn.functional as F

from swssl.scoring.bank import MemoryBank
from swssl.scoring import bank_index
from swssl.scoring.bank_index import BankIndex
from swssl.errors import ConfigError
from swssl.registry import SCORERS, load
from swssl.windows.tiling import Chunk, ImageScore

Needs = Literal["windows", "grid"]


class Accumulator(Protocol):
    """One image's scoring in progress: embedded windows in (`update`), the image's score out (`finalize`)."""

    def update(self, chunk: Chunk) -> None: ...

    def finalize(self, foreground: torch.Tensor) -> ImageScore: ...


class Scorer(Protocol):
    """What the tiling loop knows of a scorer (see the module docstring)."""

    needs: ClassVar[Needs]
    device: torch.device
    grid: tuple[int, int] | None  # the window grid it compares positions on; None: any grid

    def start(self, grid: tuple[int, int]) -> Accumulator: ...


def image_score(window_scores: torch.Tensor, foreground: torch.Tensor, top: int = 1) -> float:
    """Max (top=1) or mean of the `top` largest scores over foreground windows; 0 when there are none."""
    values = window_scores[foreground]
    if values.numel() == 0:
        return 0.0
    return values.topk(min(top, values.numel())).values.mean().item()


def _result(distances: torch.Tensor, foreground: torch.Tensor, top: int) -> ImageScore:
    window_scores = torch.where(foreground, distances, torch.full_like(distances, float("nan")))
    return ImageScore(image_score(distances, foreground, top), window_scores.float().cpu().numpy(),
                      foreground.cpu().numpy())


class _WindowByWindow:
    """Accumulator of a "windows" scorer: each chunk's foreground windows are scored as they arrive."""

    def __init__(self, scorer: GlobalScorer, grid: tuple[int, int]):
        self.scorer = scorer
        self.distances = torch.full(grid, float("nan"), device=scorer.device)

    def update(self, chunk: Chunk) -> None:
        chosen = chunk.foreground
        if chosen is None:
            rows, cols, embeddings = chunk.rows, chunk.cols, chunk.embeddings
        else:
            rows, cols, embeddings = chunk.rows[chosen], chunk.cols[chosen], chunk.embeddings[chosen]
        if len(embeddings):
            device = self.scorer.device
            self.distances[rows.to(device), cols.to(device)] = self.scorer.score_windows(embeddings)

    def finalize(self, foreground: torch.Tensor) -> ImageScore:
        return _result(self.distances, foreground.to(self.scorer.device), self.scorer.top)


class _WholeGrid:
    """Accumulator of a "grid" scorer: the windows are gathered into R x C x D, scored at the end."""

    def __init__(self, scorer: AlignedScorer | ReferenceScorer, grid: tuple[int, int]):
        self.scorer, self.grid = scorer, grid
        self.embeddings: torch.Tensor | None = None

    def update(self, chunk: Chunk) -> None:
        rows, cols = self.grid
        index = chunk.rows * cols + chunk.cols
        if self.embeddings is None and torch.equal(index, torch.arange(rows * cols, device=index.device)):
            self.embeddings = chunk.embeddings  # the whole grid at once (an image in memory): used as it is
            return
        if self.embeddings is None:
            self.embeddings = chunk.embeddings.new_zeros(rows * cols, chunk.embeddings.shape[1])
        self.embeddings[index] = chunk.embeddings

    def finalize(self, foreground: torch.Tensor) -> ImageScore:
        if self.embeddings is None:
            raise ConfigError("no window was embedded")
        return self.scorer.score_grid(self.embeddings.view(*self.grid, -1), foreground)


class _Scorer:
    """What every scorer shares: its accumulator follows from what it needs, and `score` for an image at hand."""

    needs: ClassVar[Needs]

    def start(self, grid: tuple[int, int]) -> Accumulator:
        return _WholeGrid(self, grid) if self.needs == "grid" else _WindowByWindow(self, grid)

    def score(self, embeddings: torch.Tensor, foreground: torch.Tensor) -> ImageScore:
        """Score an image whose embeddings (R x C x D) are all at hand, as one chunk through `start()`."""
        rows, cols = foreground.shape
        index = torch.arange(rows * cols, device=embeddings.device)
        state = self.start((rows, cols))
        state.update(Chunk(index // cols, index % cols, embeddings.reshape(rows * cols, -1),
                           foreground.reshape(-1).to(embeddings.device)))
        return state.finalize(foreground)


ALIGNED_STEP_ROWS = 65_536  # bank rows (positions x bank images) per step of the aligned scorer


class AlignedScorer(_Scorer):
    """Position-matched nearest neighbour. Memory: the bank as float32 (R x C x N x D x 4 bytes: scanned once per
    image, it is not converted again for each one) and chunk x N x (D + S) x 4 bytes per step, chunk = grid
    positions per step (default ALIGNED_STEP_ROWS / N), S = (2 radius + 1)^2 shifts."""

    needs: ClassVar[Needs] = "grid"

    def __init__(self, bank: MemoryBank, device: str | torch.device = "cpu", radius: int = 0, top: int = 1,
                 chunk: int | None = None):
        self.device, self.radius, self.top = torch.device(device), radius, top
        self.grid = tuple(bank.foreground.shape[1:])
        n, rows, cols, dim = bank.embeddings.shape
        self.chunk = chunk or max(1, ALIGNED_STEP_ROWS // n)
        # (R C) x N x D: for each position, its training windows side by side.
        self.bank = bank.embeddings.to(self.device, torch.float32).permute(1, 2, 0, 3).reshape(rows * cols, n, dim)
        self.norms = self.bank.pow(2).sum(-1)  # (R C) x N

    @torch.inference_mode()
    def score_grid(self, embeddings: torch.Tensor, foreground: torch.Tensor) -> ImageScore:
        """Each bank position meets the test windows it is compared with (its own position and the shifted
        ones within `radius`) in one batched product, so the bank is read once per image, whatever the radius."""
        rows, cols = self.grid
        if embeddings.shape[:2] != (rows, cols):
            raise ConfigError(f"image grid {tuple(embeddings.shape[:2])} differs from the bank's {(rows, cols)}; "
                              "the aligned scorer needs images at the run's geometry (use --scorer global)")
        r, side = self.radius, 2 * self.radius + 1
        test = embeddings.to(self.device, torch.float32)
        # partners[q, :, s]: the test window that bank position q is compared with under shift s (zero past the
        # grid: masked below); q's partner under shift (u, v) is the test window at q + (u - r, v - r).
        padded = F.pad(test.permute(2, 0, 1), (r, r, r, r))
        partners = padded.unfold(1, side, 1).unfold(2, side, 1).reshape(-1, rows * cols, side * side).transpose(0, 1)
        inside = F.pad(torch.ones(rows, cols, device=self.device), (r, r, r, r))
        inside = inside.unfold(0, side, 1).unfold(1, side, 1).reshape(rows * cols, side * side) > 0
        partner_norms = partners.pow(2).sum(1)  # (R C) x S
        nearest = torch.empty(rows * cols, side * side, device=self.device)
        for start in range(0, rows * cols, self.chunk):
            step = slice(start, start + self.chunk)
            dots = torch.bmm(self.bank[step], partners[step].contiguous())  # chunk x N x S
            nearest[step] = (self.norms[step, :, None] - 2 * dots).amin(1) + partner_norms[step]
        nearest = nearest.masked_fill(~inside, float("inf")).view(rows, cols, side, side)
        # Test window p took shift (u, v) at bank position p - (u - r, v - r): its best is the min over (u, v).
        best = torch.full((rows + 2 * r, cols + 2 * r), float("inf"), device=self.device)
        for u in range(side):
            for v in range(side):
                best[u:u + rows, v:v + cols] = torch.minimum(best[u:u + rows, v:v + cols], nearest[:, :, u, v])
        return _result(best[r:r + rows, r:r + cols].clamp_min(0).sqrt(), foreground.to(self.device), self.top)


class GlobalScorer(_Scorer):
    """k nearest bank windows anywhere. Memory: (windows of the image) x (chunk + k) x 4 + chunk x D x 4 bytes.

    `index` ("flat" | "ivf", swssl.scoring.bank_index): search a FAISS index of the (coreset) rows instead of
    scanning them, for banks too large to scan; None: automatic, the brute force below
    bank_index.AUTO_INDEX_ROWS rows (or without faiss), the approximate index (bank_index.APPROXIMATE) from there.
    An index saved beside the bank (swssl-bank --index KIND) is used when it matches the bank and these rows,
    else one is built in memory. `search` says which search it is ("brute force", "ivf nlist ... nprobe ...").
    """

    needs: ClassVar[Needs] = "windows"
    grid = None

    def __init__(self, bank: MemoryBank, device: str | torch.device = "cpu", k: int = 1, top: int = 1,
                 coreset_ratio: float | None = None, chunk: int = 8192, seed: int = 0, index: str | None = None):
        self.device, self.k, self.top, self.chunk = torch.device(device), k, top, chunk
        flat = global_rows(bank, k, coreset_ratio, seed, self.device)
        if self.k > len(flat):
            raise ConfigError(f"k={self.k} exceeds the {len(flat)} windows of the bank")
        self.coreset_ratio, self.seed = coreset_ratio, seed
        if index is None and len(flat) >= bank_index.AUTO_INDEX_ROWS and bank_index.faiss_available():
            index = bank_index.APPROXIMATE
        self.index, self.index_source, self.rows_sha256 = None, None, None
        if index is not None:
            if bank.path is not None and bank.sha256 is not None:
                self.index, self.index_source = bank_index.load_index(bank.path, index, bank.sha256, flat,
                                                                      coreset_ratio, seed)
            if self.index is None:
                self.index = BankIndex(flat, index, seed=seed)
                self.rows_sha256 = bank_index.rows_digest(flat)  # what save_global_index records
        self.search = "brute force" if self.index is None else self.index.description
        if self.index is None:
            self.bank = flat.to(self.device)
            self.norms = torch.cat([self.bank[i:i + chunk].float().pow(2).sum(-1) for i in range(0, len(flat), chunk)])

    @torch.inference_mode()
    def score_windows(self, embeddings: torch.Tensor) -> torch.Tensor:
        """Score of each of K windows (embeddings K x D): the mean distance to its k nearest bank windows.

        Returns K float32 values on the scorer's device; windows are scored independently, so a
        slide can be scored batch by batch as its windows are encoded.
        """
        queries = embeddings.to(self.device, torch.float32)
        if len(queries) == 0:
            return torch.zeros(0, device=self.device)
        if self.index is not None:
            return self.index.search(queries, self.k).mean(-1)
        return knn_distances(queries, self.bank, self.norms, self.k, self.chunk).mean(-1)


def save_global_index(bank: MemoryBank, options: dict, scorer: GlobalScorer | None = None) -> Path | None:
    """After a bank is saved (swssl-bank): the global scorer's index for `options` (--index KIND, or the automatic
    choice above bank_index.AUTO_INDEX_ROWS) written beside it; None when that scorer uses the brute force.
    `scorer`: one already built with `options` over this bank's rows (the calibration's), whose index is saved
    instead of being built again."""
    scorer = scorer or GlobalScorer(bank, **options)
    if scorer.index is None or bank.path is None or bank.sha256 is None:
        return None
    if scorer.index_source is not None and scorer.index_source.startswith("saved index"):
        return bank_index.index_files(bank.path, scorer.index.kind)[0]
    return bank_index.save_index(scorer.index, bank.path, bank.sha256, scorer.rows_sha256,
                                 options.get("coreset_ratio"), options.get("seed", 0))


def global_rows(bank: MemoryBank, k: int = 1, coreset_ratio: float | None = None, seed: int = 0,
                device: str | torch.device = "cpu") -> torch.Tensor:
    """The rows the global scorer searches: the bank's foreground windows, or their k-center-greedy coreset."""
    flat = bank.embeddings[bank.foreground]  # foreground windows only: empty air is not a reference
    if flat.shape[0] == 0:
        raise ConfigError("the memory bank has no foreground window")
    if coreset_ratio is not None:
        flat = flat[k_center_greedy(flat, max(k, math.ceil(coreset_ratio * len(flat))), seed=seed, device=device)]
    return flat


def knn_distances(queries: torch.Tensor, bank: torch.Tensor, bank_norms: torch.Tensor, k: int,
                  chunk: int = 8192) -> torch.Tensor:
    """Distances (Q x k, ascending) from each query to its k nearest bank rows, in bank chunks."""
    query_norms = queries.pow(2).sum(-1, keepdim=True)
    best = torch.full((len(queries), k), float("inf"), device=queries.device)
    for start in range(0, len(bank), chunk):
        block = bank[start:start + chunk].float()
        d2 = query_norms + bank_norms[start:start + chunk] - 2 * queries @ block.T
        best = torch.cat([best, d2], dim=1).topk(k, dim=1, largest=False).values
    return best.clamp_min(0).sqrt()


class ReferenceScorer(_Scorer):
    """The official evaluate.py score. Memory: chunk x R x C x D x 4 bytes."""

    needs: ClassVar[Needs] = "grid"

    def __init__(self, bank: MemoryBank, device: str | torch.device = "cpu", chunk: int = 8):
        self.device, self.chunk = torch.device(device), chunk
        self.grid = tuple(bank.foreground.shape[1:])
        self.bank = bank.embeddings.flatten(1, 2).to(self.device)  # N x P x D

    @torch.inference_mode()
    def score_grid(self, embeddings: torch.Tensor, foreground: torch.Tensor) -> ImageScore:
        test = embeddings.to(self.device, torch.float32).flatten(0, 1)  # P x D, every window as the official code
        if test.shape[0] != self.bank.shape[1]:
            raise ConfigError("the reference scorer needs images at the run's geometry")
        best = torch.full((test.shape[1],), float("inf"), device=self.device)
        for start in range(0, len(self.bank), self.chunk):
            d = (self.bank[start:start + self.chunk].float() - test).pow(2).sum(1).sqrt()  # chunk x D
            best = torch.minimum(best, d.amin(0))
        return ImageScore(best.max().item(), None, foreground.cpu().numpy())


CORESET_CHUNK = 16_384  # rows per independent greedy (k_center_greedy); 16k x 128 float32 = 8 MB: cache-resident


def k_center_greedy(points: torch.Tensor, count: int, projection_dim: int = 128, seed: int = 0,
                    device: str | torch.device = "cpu", chunk: int | None = None) -> torch.Tensor:
    """Indices of a k-center-greedy coreset (as PatchCore), chosen on a Gaussian random projection.

    Starts from a seeded random point, then repeatedly adds the point farthest from those chosen.
    A bank of more than `chunk` (default CORESET_CHUNK) rows is split by a seeded shuffle into near-equal
    chunks of at most `chunk` rows, each given its share of `count` and reduced by its own greedy: the cost
    falls from O(N x count) to O(N x count x chunk / N) and each step's distances stay in cache; the union's
    covering radius stays close to the one greedy's (tests/test_scorers.py bounds it on small data).
    """
    generator = torch.Generator().manual_seed(seed)
    count = min(count, len(points))
    dim = points.shape[1]
    projection = torch.randn(dim, min(projection_dim, dim), generator=generator) / math.sqrt(min(projection_dim, dim))
    chunk = CORESET_CHUNK if chunk is None else chunk
    if len(points) <= chunk:
        projected = points.float().to(device) @ projection.to(device)
        return _greedy(projected, count, generator)
    pieces = math.ceil(len(points) / chunk)
    order = torch.randperm(len(points), generator=generator)
    groups = order.tensor_split(pieces)
    sizes = torch.tensor([len(g) for g in groups], dtype=torch.float64)
    shares = (sizes * count / len(points)).floor().long()
    remainder = (sizes * count / len(points)) - shares
    shares[remainder.argsort(descending=True)[:count - int(shares.sum())]] += 1  # largest remainders
    projection = projection.to(device)
    chosen = []
    for group, share in zip(groups, shares.tolist()):
        if share:
            projected = points[group].float().to(device) @ projection
            chosen.append(group[_greedy(projected, share, generator)])
    return torch.cat(chosen)


def _greedy(projected: torch.Tensor, count: int, generator: torch.Generator) -> torch.Tensor:
    """k-center greedy over the rows of `projected`: a seeded random start, then the farthest row, `count` in all."""
    chosen = [int(torch.randint(len(projected), (), generator=generator))]
    nearest = (projected - projected[chosen[0]]).pow(2).sum(-1)
    for _ in range(count - 1):
        index = int(nearest.argmax())
        chosen.append(index)
        nearest = torch.minimum(nearest, (projected - projected[index]).pow(2).sum(-1))
    return torch.tensor(chosen)


def build_scorer(name: str, bank: MemoryBank, device: str | torch.device = "cpu", **options) -> Scorer:
    """The scorer called `name` (swssl.registry.SCORERS) over `bank`; options are its keyword arguments."""
    kinds = {kind.name: kind for kind in SCORERS}
    if name not in kinds:
        raise ConfigError(f"unknown scorer {name!r}; choose from {', '.join(kinds)}")
    return load(kinds[name].implementation)(bank, device, **options)


def scorer_options(names: list[str], **values) -> dict[str, dict]:
    """Per scorer, the options among `values` (e.g. the command line's) that its registry row declares."""
    kinds = {kind.name: kind for kind in SCORERS}
    return {name: {key: values[key] for key in kinds[name].options if key in values} for name in names}
