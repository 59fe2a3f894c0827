"""Where a slice's time goes: wall seconds per stage of the runner (read, resize, windows, embed, score, write).

`with profiling() as clock:` switches the stage clock on for the code inside it (`swssl-infer --profile`,
swssl-bench's end-to-end rows); `with stage("embed"):` marks a stage and costs nothing while no clock is on.
Times are exclusive: a stage opened inside another (the reads inside a resize) is not counted twice, so the
stages of one thread add up to that thread's time under them. The streaming reader's prefetch thread has its
own stages (`read, prefetch thread`), which overlap the main thread's: its `wait` stage is what the overlap
does not hide. On CUDA the clock synchronises the device at each stage's edges, so that asynchronous kernels
are charged to the stage that launched them (this costs the launch overlap: profile apart from timing).
"""
from __future__ import annotations

import contextlib
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from swssl.files import atomic_write

FRAME = "frame"  # the whole of a frame, opened by the runner; what its inner stages leave is reported as "other"
PREFETCH = ", prefetch thread"  # suffix of the stages the streaming reader's thread runs beside the main one

_clock: StageClock | None = None


class StageClock:
    """Exclusive wall seconds and calls per stage, from every thread."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.calls: dict[str, int] = {}
        self._lock = threading.Lock()
        self._stacks = threading.local()  # per thread: [name, start, seconds of stages nested in it]

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        stack = self._stacks.__dict__.setdefault("open", [])
        _synchronize()
        entry = [name, time.perf_counter(), 0.0]
        stack.append(entry)
        try:
            yield
        finally:
            _synchronize()
            stack.pop()
            spent = time.perf_counter() - entry[1]
            if stack:
                stack[-1][2] += spent
            with self._lock:
                self.seconds[name] = self.seconds.get(name, 0.0) + spent - entry[2]
                self.calls[name] = self.calls.get(name, 0) + 1

    @property
    def frames(self) -> int:
        return self.calls.get(FRAME, 0)

    def to_dict(self) -> dict[str, Any]:
        """{"frames": n, "stages": {stage: {"seconds", "ms_per_frame", "share"}}}: share of the frames' time (None for
        the prefetch thread's stages, which overlap it)."""
        total = sum(seconds for name, seconds in self.seconds.items() if not name.endswith(PREFETCH))
        frames = max(1, self.frames)
        stages = {}
        for name, seconds in sorted(self.seconds.items(), key=lambda item: -item[1]):
            own_thread = total and not name.endswith(PREFETCH)
            stages["other" if name == FRAME else name] = {
                "seconds": round(seconds, 4), "ms_per_frame": round(1000 * seconds / frames, 2),
                "share": round(seconds / total, 4) if own_thread else None}
        return {"frames": self.frames, "stages": stages}

    def save(self, path: Path) -> None:
        """Write `to_dict()` as JSON to `path` (atomically)."""
        atomic_write(path, lambda tmp: tmp.write_text(json.dumps(self.to_dict(), indent=1)))

    def table(self) -> str:
        """The stages as aligned text lines, largest first (swssl-infer --profile)."""
        data = self.to_dict()
        lines = [f"time per stage over {data['frames']} frame(s) (exclusive wall time; 'other' is the rest of a "
                 "frame: statistics, results, bookkeeping):",
                 f"  {'stage':<26}{'ms/frame':>10}{'share':>8}"]
        for name, row in data["stages"].items():
            share = "overlap" if row["share"] is None else f"{100 * row['share']:.1f} %"
            lines.append(f"  {name:<26}{row['ms_per_frame']:>10.1f}{share:>8}")
        return "\n".join(lines)


def _synchronize() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


@contextlib.contextmanager
def stage(name: str) -> Iterator[None]:
    """Charge the wall time inside to stage `name` while a clock is on (`profiling`); else nothing."""
    clock = _clock
    if clock is None:
        yield
        return
    with clock.stage(name):
        yield


@contextlib.contextmanager
def profiling() -> Iterator[StageClock]:
    """Switch a fresh stage clock on for the code inside (one at a time, process-wide)."""
    global _clock
    if _clock is not None:
        raise RuntimeError("a stage clock is already on")
    _clock = StageClock()
    try:
        yield _clock
    finally:
        _clock = None


def enabled() -> bool:
    return _clock is not None


class TimedEncode:
    """An encoder (a backend or a PatchEncoder) whose calls and feature maps count as the `embed` stage."""

    def __init__(self, encode: Any):
        self.encode = encode

    def __call__(self, windows: torch.Tensor) -> torch.Tensor:
        with stage("embed"):
            return self.encode(windows)

    def feature_map(self, images: torch.Tensor) -> torch.Tensor:
        with stage("embed"):
            return self.encode.feature_map(images)
