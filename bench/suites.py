"""The measurements: encoder throughput, the runner end to end, one large native slide, the official way.

Each returns plain dicts (JSON-ready) and never decides what to measure; bench.session does.
"""
from __future__ import annotations

import contextlib
import itertools
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from swssl import profiling
from swssl.registry import TORCH_BACKENDS
from swssl.bench.memory import PeakMemory
from swssl.bench.timing import measure
from swssl.bench.workload import Run
from swssl.inference.run import open_run

# Backend kinds as the bench names them -> the kind load_backend / open_run take.


def path_label(kind: str, precision: str, mode: str = "exact") -> str:
    """How reports name one of our paths: 'torch eager fp32', 'onnxruntime fp32 dense', 'aoti fp16', ..."""
    return f"{'torch eager' if kind == 'torch' else kind} {precision}" + (" dense" if mode == "dense" else "")


def open_backend(run: Run, kind: str, precision: str, device: torch.device, mode: str = "exact"):
    """The backend for one path: the encoder itself for torch kinds, else the run's verified export of that mode."""
    from swssl.inference.backends import TorchBackend, load_backend

    if kind in TORCH_BACKENDS:
        return TorchBackend(run.fresh_encoder(), device, compile=kind == "torch-compiled", precision=precision)
    return load_backend(run.folder, kind, device, precision, mode)[0]


def first_slice(run: Run, images: Any) -> np.ndarray:
    """The first benchmark slice at the run's geometry (what the runner embeds in resize geometry)."""
    from swssl.data.datasets import load_resized

    return load_resized(images.slides[0], run.config.geometry, run.config.preprocess.intensity)


def sample_windows(run: Run, data: Path, count: int) -> torch.Tensor:
    """`count` real foreground windows of the training images (count x 1 x P x P, CPU), as the export check uses."""
    from swssl.export.verify import training_windows

    return training_windows(run.config, run.folder, data, count)[0]


def encoder_throughput(backend: Any, windows: torch.Tensor, batches: list[int], device: torch.device, *,
                       warmup: int, repeats: int, min_seconds: float,
                       stop: Callable[[], bool] = lambda: False) -> list[dict[str, Any]]:
    """Windows/s of `backend(windows)` per batch size, inputs already on the device (no transfer timed)."""
    rows = []
    for batch in batches:
        if stop():
            break
        x = windows[torch.arange(batch) % len(windows)].to(device).contiguous()
        with PeakMemory(device) as peak:
            timing = measure(lambda: backend(x), warmup=warmup, repeats=repeats, device=device,
                             min_seconds=min_seconds)
        rows.append({"batch": batch, "windows_per_s": timing.rate(batch), **timing.to_dict(), **peak.to_dict()})
    return rows


def dense_throughput(backend: Any, image: np.ndarray, config: Any, device: torch.device, *, warmup: int,
                     repeats: int, min_seconds: float) -> dict[str, Any]:
    """Windows/s of dense embedding: one slice (already on the device) through `backend.feature_map` (in
    tiles when large), every window of its grid pooled from the cells, the foreground test included."""
    from swssl.windows.dense import embed_dense
    from swssl.windows.geometry import grid

    pixels = torch.as_tensor(image, dtype=torch.float32).to(device)
    rows, cols = grid(config.geometry, *pixels.shape)
    windows = len(rows) * len(cols)
    with PeakMemory(device) as peak:
        timing = measure(lambda: embed_dense(backend.feature_map, pixels, config), warmup=warmup, repeats=repeats,
                         device=device, min_seconds=min_seconds)
    return {"batch": "slice", "windows_per_slice": windows, "windows_per_s": timing.rate(windows),
            **timing.to_dict(), **peak.to_dict()}


def official_way(encoder: torch.nn.Module, image: np.ndarray, config: Any, device: torch.device, *, windows: int,
                 warmup: int) -> dict[str, Any]:
    """The official evaluate.py's way with the same weights: the resized image as a PIL image, each window
    cropped on the host and converted with ToTensor, one forward pass per window (batch 1) in a Python
    loop, its features copied back to the host. Timed over `windows` grid positions spread over the
    official (H - P) // step grid; the seconds per slide are extrapolated to that grid's full count."""
    import copy

    from PIL import Image
    from torchvision.transforms.functional import to_tensor

    from swssl.windows.geometry import window_starts

    g = config.geometry
    rows = window_starts(g.height, g.patch, g.step, "reference")
    cols = window_starts(g.width, g.patch, g.step, "reference")
    grid_count = len(rows) * len(cols)
    positions = [(int(y), int(x)) for y in rows for x in cols]
    picked = [positions[i] for i in np.linspace(0, grid_count - 1, min(windows, grid_count)).round().astype(int)]
    picture = Image.fromarray(np.round(np.clip(image, 0, 1) * 255).astype(np.uint8))  # an 8-bit slice, as theirs
    model = copy.deepcopy(encoder).float().eval().to(device)
    cycle = itertools.cycle(picked)
    kept: list[torch.Tensor] = []

    def one_window() -> None:
        y, x = next(cycle)
        window = to_tensor(picture.crop((x, y, x + g.patch, y + g.patch))).unsqueeze(0).to(device)
        with torch.no_grad():
            kept.append(model(window).cpu())

    with PeakMemory(device) as peak:
        timing = measure(one_window, warmup=warmup, repeats=len(picked), device=device)
    rate = timing.rate(1)
    return {"windows_timed": len(picked), "windows_per_s": rate, "grid": [len(rows), len(cols)],
            "grid_windows": grid_count, "seconds_per_slide_extrapolated": grid_count / rate,
            **timing.to_dict(), **peak.to_dict()}


PROFILED_SLIDES = 4  # CUDA: the slides of the stage profile, run after the timed ones


def end_to_end(run: Run, slides: list[Path], kind: str, precision: str, device: torch.device, batch: int | None,
               out: Path, mode: str = "exact") -> dict[str, Any]:
    """swssl-infer's runner (`run_inference`, the run's resize geometry, aligned scorer) over `slides`, after
    a warm-up slide, at `batch` windows per call (None: probed, as swssl-infer). Model loading is timed apart;
    slides/s is over the whole call (reading, resizing, windows, encoding, scoring, result files); seconds per
    slide are the runner's own per-slide times; `stages` (swssl.profiling) says where they went: measured in
    the timed run on a CPU, in a run of PROFILED_SLIDES slides after it on CUDA."""
    from swssl.inference.runner import choose_settings, read_results, run_inference

    started = time.perf_counter()
    model = open_run(run.folder, kind, device, precision, mode)
    load_seconds = time.perf_counter() - started
    chosen = _batch(model, batch)
    settings = choose_settings(model.config, None, None, None, chosen.batch, False)
    quiet = lambda text: None  # noqa: E731
    run_inference(slides[:1], model, out / "warm-up", settings, progress=False, echo=quiet)
    apart = device.type == "cuda"  # the stage clock synchronises CUDA at every stage: not in the timed run there
    with PeakMemory(device) as peak, contextlib.nullcontext() if apart else profiling.profiling() as clock:
        started = time.perf_counter()
        summary = run_inference(slides, model, out / "timed", settings, progress=False, echo=quiet)
        wall = time.perf_counter() - started
    if apart:
        with profiling.profiling() as clock:
            run_inference(slides[:PROFILED_SLIDES], model, out / "profiled", settings, progress=False, echo=quiet)
    return {"backend": getattr(model.backend, "name", kind), "load_seconds": load_seconds, "wall_seconds": wall,
            **_slide_stats(read_results(out / "timed"), wall), "failures": [list(f) for f in summary.failures],
            "scorer": settings.scorer_name, "geometry": settings.geometry, **_batch_fields(chosen),
            "stages": clock.to_dict(), **peak.to_dict()}


def _batch(model: Any, batch: int | None) -> Any:
    """The runner's encoder batch for `model`: `batch`, or probed as swssl-infer does."""
    from swssl.inference.batch_probe import choose_batch

    g = model.config.geometry
    return choose_batch(batch, model.backend, g.mode, g.patch, model.backend.device)


def _batch_fields(chosen: Any) -> dict[str, Any]:
    return {"batch": chosen.batch, "batch_how": chosen.how, "batch_rates": {str(b): r for b, r in chosen.rates.items()}}


def native_slide(run: Run, slide: Path, kind: str, precision: str, device: torch.device, batch: int | None,
                 out: Path, mode: str = "exact") -> dict[str, Any]:
    """One large slide through the runner's native streaming path (scale 1, global scorer, background skipped)."""
    from swssl.inference.runner import choose_settings, read_results, run_inference

    model = open_run(run.folder, kind, device, precision, mode)
    chosen = _batch(model, batch)
    settings = choose_settings(model.config, None, None, 1.0, chosen.batch, False)
    with PeakMemory(device) as peak:
        started = time.perf_counter()
        summary = run_inference([slide], model, out, settings, progress=False, echo=lambda text: None)
        wall = time.perf_counter() - started
    return {"backend": getattr(model.backend, "name", kind), "wall_seconds": wall,
            **_slide_stats(read_results(out), wall), "failures": [list(f) for f in summary.failures],
            "scorer": settings.scorer_name, "geometry": settings.geometry, **_batch_fields(chosen), **peak.to_dict()}


def _slide_stats(records: list[dict[str, Any]], wall: float) -> dict[str, Any]:
    """Slides/s, seconds per slide (median, p95), windows/s and the background share of the runner's records."""
    from swssl.bench.timing import Timing

    ok = [r for r in records if r.get("status") == "ok" and r.get("frame") != "volume"]
    if not ok:
        return {"slides": 0}
    seconds = Timing([float(r["seconds"]) for r in ok])
    scored = sum(int(r["windows_scored"]) for r in ok)
    skipped = sum(int(r["windows_skipped"]) for r in ok)
    return {"slides": len(ok), "slides_per_s": len(ok) / wall, "seconds_per_slide_median": seconds.median,
            "seconds_per_slide_p95": seconds.p95, "windows_scored": scored, "windows_skipped": skipped,
            "windows_per_s": scored / wall, "skipped_share": skipped / max(1, scored + skipped),
            "shape": ok[0].get("shape"), "grid": ok[0].get("grid")}
