"""Windows per encoder call, measured on the backend at hand rather than fixed.

The best batch differs by device, backend and backbone: on 2 CPU cores torch eager embedded 280 windows/s at 16
windows per call and 161 at 256 (bench/reports/cpu-2026-11-27.md: larger batches leave the cache), while a GPU
wants hundreds. `probe_batch` times a few candidates on random windows (one warm-up call, then calls for at
least PROBE_SECONDS each) and keeps the fastest, or the smallest within PROBE_TOLERANCE of it (less memory,
steadier progress). Dense mode runs the trunk on whole images, so there is nothing to choose there.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from swssl.windows.embed import Encode

CANDIDATES = {"cpu": (16, 32, 64, 128, 256), "cuda": (64, 128, 256, 512, 1024)}
PROBE_SECONDS = 0.15  # timed per candidate (at least one call), after its warm-up call
PROBE_TOLERANCE = 0.03  # a smaller batch within 3 % of the fastest is preferred
DENSE_UNUSED = 256  # the batch a dense-mode run carries (it embeds whole images; only exact mode cuts batches)


@dataclass(frozen=True)
class BatchChoice:
    batch: int
    rates: dict[int, float]  # windows/s per candidate measured; empty when not probed
    how: str = "probed"  # or "given" (--batch N) or "dense" (not used)

    def describe(self) -> str:
        if self.how == "given":
            return f"{self.batch} windows per encoder call (--batch)"
        if self.how == "dense":
            return "dense mode: whole images per trunk call (no window batches)"
        measured = ", ".join(f"{b}: {rate:,.0f}" for b, rate in self.rates.items())
        return f"{self.batch} windows per encoder call (probed; windows/s at {measured}; --batch N to fix it)"


def candidates_for(device: torch.device, max_batch: int | None = None) -> tuple[int, ...]:
    """The batch sizes tried on `device` (CPU ones for any non-CUDA device), capped at the backend's max_batch."""
    sizes = CANDIDATES["cuda" if device.type == "cuda" else "cpu"]
    if max_batch is not None:
        sizes = tuple(b for b in sizes if b <= max_batch) or (max_batch,)
    return sizes


@torch.inference_mode()
def probe_batch(encode: Encode, patch: int, device: torch.device, max_batch: int | None = None,
                candidates: tuple[int, ...] | None = None, seconds: float = PROBE_SECONDS) -> BatchChoice:
    """The batch size of the highest windows/s of `encode` on `device` (see the module docstring)."""
    device = torch.device(device)
    sizes = candidates or candidates_for(device, max_batch)
    generator = torch.Generator().manual_seed(0)
    windows = torch.rand(max(sizes), 1, patch, patch, generator=generator).to(device)
    rates: dict[int, float] = {}
    for size in sizes:
        batch = windows[:size]
        _sync(encode(batch), device)  # warm-up: allocations, kernel choices
        calls, started = 0, time.perf_counter()
        while True:
            _sync(encode(batch), device)
            calls += 1
            elapsed = time.perf_counter() - started
            if elapsed >= seconds:
                break
        rates[size] = calls * size / elapsed
    fastest = max(rates.values())
    chosen = min(size for size, rate in rates.items() if rate >= (1 - PROBE_TOLERANCE) * fastest)
    return BatchChoice(chosen, rates)


def _sync(result: torch.Tensor, device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    else:
        result.sum().item()  # ends the call for any asynchronous backend


def choose_batch(requested: int | None, encode: Encode, mode: str, patch: int, device: torch.device) -> BatchChoice:
    """`requested` (--batch N) as it is; None: probed in exact mode, and any in dense mode (whole images per
    trunk call: the batch is not used)."""
    if requested is not None:
        return BatchChoice(requested, {}, "given")
    if mode == "dense":
        return BatchChoice(DENSE_UNUSED, {}, "dense")
    return probe_batch(encode, patch, device, getattr(encode, "max_batch", None))
