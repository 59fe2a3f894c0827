"""Timing that can be trusted: warm-up calls first, several repetitions, medians, device synchronisation.

Every measurement is wall-clock time as the host sees it (`time.perf_counter`), with the device
synchronised before the clock starts and after each repetition, so queued GPU work is never
mistaken for finished work and kernel-launch overhead counts, as it does for a user. Medians
(and p95) rather than means keep one stray slow repetition (a page fault, another process)
from moving the number.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) with linear interpolation between order statistics (numpy's default)."""
    if not values:
        raise ValueError("percentile of no values")
    if not 0 <= q <= 100:
        raise ValueError(f"percentile must lie in 0..100, not {q}")
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100
    low, high = math.floor(position), math.ceil(position)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


@dataclass
class Timing:
    """Seconds per repetition, and the statistics the reports quote."""

    samples: list[float]

    @property
    def median(self) -> float:
        return percentile(self.samples, 50)

    @property
    def p95(self) -> float:
        return percentile(self.samples, 95)

    @property
    def mean(self) -> float:
        return sum(self.samples) / len(self.samples)

    @property
    def min(self) -> float:
        return min(self.samples)

    def rate(self, items: float) -> float:
        """Items per second at the median repetition (e.g. windows/s for `items` windows per call)."""
        return items / self.median if self.median > 0 else math.inf

    def to_dict(self) -> dict[str, Any]:
        return {"repetitions": len(self.samples), "median_s": self.median, "p95_s": self.p95, "mean_s": self.mean,
                "min_s": self.min}


def synchronize(device: torch.device | str | None) -> None:
    """Wait for the device's queued work (a no-op on the CPU)."""
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def measure(fn: Callable[[], Any], *, warmup: int = 2, repeats: int = 5, device: torch.device | str | None = None,
            min_seconds: float = 0.0, max_repeats: int | None = None,
            clock: Callable[[], float] = time.perf_counter) -> Timing:
    """Time `fn()`: `warmup` untimed calls, then at least `repeats` timed ones, more (up to `max_repeats`,
    default 10 x repeats) while their total is under `min_seconds`, so very short calls get enough samples."""
    if repeats < 1:
        raise ValueError(f"repeats must be at least 1, not {repeats}")
    limit = max(repeats, max_repeats if max_repeats is not None else 10 * repeats)
    for _ in range(max(0, warmup)):
        fn()
    synchronize(device)
    samples: list[float] = []
    while len(samples) < repeats or (sum(samples) < min_seconds and len(samples) < limit):
        started = clock()
        fn()
        synchronize(device)
        samples.append(clock() - started)
    return Timing(samples)
