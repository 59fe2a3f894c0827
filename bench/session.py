"""One benchmark run: what to measure on which device, in what order, within what time budget.

Order per backbone: setup (run directory, memory bank), FLOPs per window, the official way, then
each of our paths (torch eager first, then the exported ones, each exported just before it is
measured): encoder throughput over the batch sizes, then the runner end to end; last, one large
slide through the native path on the fastest end-to-end path. A failing step is recorded with
its error and the run goes on; once `budget` seconds have passed, the steps not yet started
are listed as skipped. The report (md, json, png) is rewritten after every step, so a run cut
short still leaves what it measured.
"""
from __future__ import annotations

import importlib.util
import shutil
import sys
import tempfile
import time
import traceback
from functools import partial
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import torch

from swssl.registry import BACKENDS, BY_BACKEND, TORCH_BACKENDS
from swssl.bench import flops, machine, report, suites, workload
from swssl.inference import batch_probe

PRECISIONS = ("fp32", "bf16", "fp16", "int8")

# Defaults per device type. CPU: `make bench` in about 4-6 minutes on 2 cores; CUDA: bench/gpu.sh.
DEFAULTS: dict[str, dict[str, Any]] = {
    "cpu": {"backbones": ["resnet18"], "backends": ["torch", "onnxruntime", "aoti"], "precisions": ["fp32", "bf16"],
            "modes": ["exact", "dense"],
            "export_precisions": ["fp32", "int8"], "batches": [1, 4, 16, 64, 256], "e2e_batch": None, "slides": 8,
            "bank_images": 4, "slide_size": 4096, "official_windows": 200, "warmup": 2, "repeats": 5,
            "min_seconds": 0.5, "peak_size": 2048, "bank_sizes": [10_000, 100_000]},
    "cuda": {"backbones": ["resnet18"], "backends": ["torch", "onnxruntime", "aoti", "tensorrt"], "modes": ["exact", "dense"],
             "precisions": ["fp32", "bf16", "fp16"], "export_precisions": ["fp16"], "batches": [1, 8, 32, 128, 512],
             "e2e_batch": None, "slides": 16, "bank_images": 8, "slide_size": 8192, "official_windows": 300,
             "warmup": 3, "repeats": 10, "min_seconds": 0.2, "peak_size": 8192, "bank_sizes": [10_000, 100_000]},
}
# --smoke: seconds, for the tests and a dry run of bench/gpu.sh's Python part.
SMOKE = {"backbones": ["resnet18"], "batches": [1, 4], "e2e_batch": 16, "slides": 2, "bank_images": 2, "bank_sizes": [2000],
         "slide_size": 256, "official_windows": 8, "warmup": 0, "repeats": 1, "min_seconds": 0.0, "peak_size": 256,
         "data": "synthetic"}


@dataclass
class Options:
    device: torch.device
    backbones: list[str]
    backends: list[str]
    precisions: list[str]
    modes: list[str]  # geometry modes: exact (window by window) and / or dense (one trunk pass per slice)
    export_precisions: list[str]
    batches: list[int]
    e2e_batch: int | None  # None: probed per path, as swssl-infer does (swssl.inference.batch_probe)
    slides: int
    bank_images: int
    slide_size: int
    official_windows: int
    warmup: int
    repeats: int
    min_seconds: float
    peak_size: int
    bank_sizes: list[int]  # rows of the bank-scaling table (bench/bank_scaling.py); [] or [0]: none
    out: Path
    data: str = "auto"
    budget: float = 0.0  # seconds; 0: no limit
    work: Path | None = None
    keep_work: bool = False
    smoke: bool = False
    seed: int = 0
    command: str = ""
    name: str | None = None  # report file stem; default <device>-<date>

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data.update(device=str(self.device), out=str(self.out), work=None if self.work is None else str(self.work))
        return data


def make_options(device: torch.device, out: Path, smoke: bool = False, **given: Any) -> Options:
    """Options from the device's defaults (and --smoke's), overridden by whatever was given (None = default)."""
    values = dict(DEFAULTS[device.type])
    if device.type == "cpu" and not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        values["precisions"] = ["fp32"]  # emulated bf16 (no AVX512-BF16 / AMX): minutes per peak GEMM, nothing to learn
    if smoke:
        values.update(SMOKE)
    values.update({k: v for k, v in given.items() if v is not None})
    return Options(device=device, out=Path(out), smoke=smoke, **values)


@dataclass
class OurPath:
    """One of our paths: a backend kind at a precision, in a geometry mode."""

    kind: str
    precision: str
    mode: str = "exact"

    @property
    def label(self) -> str:
        return suites.path_label(self.kind, self.precision, self.mode)


class Session:
    """The result being built, the clock the budget runs on, and the report rewritten as steps finish."""

    def __init__(self, options: Options):
        self.options = options
        self.started = time.perf_counter()
        now = datetime.now(timezone.utc)
        stem = options.name or f"{options.device.type}-{now.date().isoformat()}"
        self.result: dict[str, Any] = {
            "format": report.FORMAT, "date": now.date().isoformat(), "started": now.isoformat(timespec="seconds"),
            "command": options.command, "device": options.device.type, "smoke": options.smoke,
            "machine": machine.describe(options.device), "options": options.to_dict(), "peaks": {}, "models": [],
            "skipped": [], "errors": [], "stem": stem}
        self._plotted = -1

    # --- bookkeeping -----------------------------------------------------------------------------

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def say(self, text: str) -> None:
        print(f"[{self.elapsed():5.0f} s] {text}", file=sys.stderr, flush=True)

    def over_budget(self) -> bool:
        return self.options.budget > 0 and self.elapsed() > self.options.budget

    def skip(self, where: dict[str, Any], what: str, why: str) -> None:
        where["skipped"].append({"what": what, "why": why})
        self.say(f"skipped: {what} ({why})")

    def step(self, where: dict[str, Any], what: str, action: Callable[[], Any]) -> Any:
        """Run one step unless the budget is spent; a failure is recorded and the run goes on."""
        self.save()  # everything measured so far, in case this step is the one a timeout kills
        if self.over_budget():
            self.skip(where, what, f"time budget of {self.options.budget:g} s spent")
            return None
        self.say(what)
        try:
            return action()
        except Exception as exc:  # the report says what broke; the next step still runs
            text = " ".join(f"{type(exc).__name__}: {exc}".split())[:500]
            where["errors"].append({"step": what, "error": text, "traceback": traceback.format_exc(limit=8)})
            self.say(f"failed: {what}: {text}")
            return None

    def save(self, final: bool = False) -> list[Path]:
        """Rewrite the report; the plot only at the end or when encoder numbers were added since the last one."""
        self.result["wall_seconds"] = self.elapsed()
        rows = sum(len(m.get("encoder", [])) for m in self.result["models"])
        draw = final or rows != self._plotted
        self._plotted = rows if draw else self._plotted
        return report.write_report(self.result, self.options.out, self.result["stem"], draw=draw)


# --- planning ------------------------------------------------------------------------------------


def unavailable(kind: str, device: torch.device) -> str | None:
    """Why a backend kind cannot be measured here (None: it can)."""
    from swssl.inference.backends import _runtime_problem

    if kind not in BACKENDS:
        return f"unknown backend (choose from {', '.join(BACKENDS)})"
    if kind == "onnxruntime":
        missing = [m for m in ("onnx", "onnxscript", "onnxruntime") if importlib.util.find_spec(m) is None]
        if missing:
            return f"{', '.join(missing)} not installed (pip install 'swssl[export]')"
    return _runtime_problem(kind, device)


def plan_paths(options: Options, where: dict[str, Any], session: Session) -> list[OurPath]:
    """Our paths to measure, torch eager first; unavailable backends are listed as skipped with the reason."""
    paths: list[OurPath] = []
    for kind in options.backends:
        problem = unavailable(kind, options.device)
        if problem:
            session.skip(where, kind, problem)
            continue
        if kind in TORCH_BACKENDS:
            precisions = options.precisions
        elif kind == "onnxruntime":
            precisions = ["fp32", *(["int8"] if "int8" in options.export_precisions else [])]  # ONNX: fp32 or int8
        else:  # AOTInductor: no int8 (TensorRT's int8 is calibrated at export as well)
            precisions = [p for p in options.export_precisions if kind == "tensorrt" or p != "int8"]
        for precision in precisions:
            if precision not in PRECISIONS:
                session.skip(where, f"{kind} {precision}", f"unknown precision (choose from {', '.join(PRECISIONS)})")
                continue
            paths += [OurPath(kind, precision, mode) for mode in options.modes]
    return sorted(paths, key=lambda p: (p.kind not in TORCH_BACKENDS, options.backends.index(p.kind),
                                        options.modes.index(p.mode)))


def peak_key(path: OurPath, device: torch.device) -> str:
    """Which measured matmul peak a path is held against: its own precision; on CUDA, fp32 paths that run
    convolutions in TF32 (torch's cuDNN default, ONNX Runtime's CUDA default) against the TF32 peak."""
    if path.precision != "fp32" or device.type != "cuda":
        return path.precision
    if path.kind in TORCH_BACKENDS and torch.backends.cudnn.allow_tf32:
        return "tf32"
    return "tf32" if path.kind == "onnxruntime" else "fp32"


def batch_profile(options: Options):
    from swssl.export.profile import BatchProfile

    largest = max([*options.batches, options.e2e_batch or 0, *batch_probe.candidates_for(options.device)])
    return BatchProfile(1, options.e2e_batch or largest, largest)


# --- the run -------------------------------------------------------------------------------------


def run(options: Options) -> tuple[dict[str, Any], list[Path]]:
    """Measure everything the options ask for; returns the result and the report files written."""
    workload.ensure_tqdm()
    torch.manual_seed(options.seed)
    session = Session(options)
    result = session.result
    own_work = options.work is None
    work = Path(tempfile.mkdtemp(prefix="swssl-bench-")) if own_work else Path(options.work)
    work.mkdir(parents=True, exist_ok=True)
    try:
        smoke_geometry = workload.SMOKE_GEOMETRY if options.smoke else None
        height, width = (smoke_geometry["height"], smoke_geometry["width"]) if smoke_geometry else (1024, 768)
        images = session.step(result, "images", lambda: workload.choose_images(
            options.data, work, options.slides, options.bank_images, height, width, options.seed))
        if images is None:
            return result, session.save()
        result["images"] = {"source": images.source, "note": images.note, "slides": [str(p) for p in images.slides],
                            "bank": [str(p) for p in images.bank]}
        slide = session.step(result, "large slide", lambda: workload.make_large_slide(
            work / "large-slide.npy", options.slide_size, options.seed))
        result["large_slide"] = slide
        paths = plan_paths(options, result, session)
        for key in sorted({peak_key(path, options.device) for path in paths} | {"fp32"}):
            measure_peak = flops.int8_peak if key == "int8" else partial(flops.matmul_peak, options.device, key)
            measured = session.step(result, f"matmul peak {key}", lambda m=measure_peak: m(
                size=options.peak_size, warmup=max(1, options.warmup), repeats=max(3, options.repeats)))
            if measured:
                result["peaks"][key] = measured
        for backbone in options.backbones:
            run_backbone(session, backbone, paths, images, slide, work / backbone, smoke_geometry)
        measure_bank_scaling(session)
        result["finished"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
        written = session.save(final=True)
        session.say(f"report: {', '.join(str(p) for p in written)}")
        return result, written
    finally:
        if own_work and not options.keep_work:
            shutil.rmtree(work, ignore_errors=True)


def measure_bank_scaling(session: Session) -> None:
    """The global scorer's bank search at the options' bank sizes (bench/bank_scaling.py), on this machine's threads."""
    from swssl.bench.bank_scaling import bank_scaling
    from swssl.scoring.bank_index import faiss_available

    sizes = tuple(rows for rows in session.options.bank_sizes if rows > 0)
    if not sizes:
        return
    if not faiss_available():
        session.skip(session.result, "bank scaling", "faiss is not installed (pip install faiss-cpu)")
        return
    session.result["bank_scaling"] = session.step(session.result, f"bank scaling ({', '.join(map(str, sizes))} rows)",
                                                  lambda: bank_scaling(sizes, threads=torch.get_num_threads()))


def run_backbone(session: Session, backbone: str, paths: list[OurPath], images: workload.Images,
                 slide: dict[str, Any] | None, work: Path, geometry: dict[str, int] | None) -> None:
    """Every measurement of one backbone, in the order of the module docstring, into a new result entry."""
    options, device = session.options, session.options.device
    entry: dict[str, Any] = {"backbone": backbone, "weights": f"random (seed {options.seed}), untrained",
                             "encoder": [], "end_to_end": [], "native": None, "official": None, "exports": [],
                             "skipped": [], "errors": []}
    session.result["models"].append(entry)
    made = session.step(entry, f"{backbone}: run directory and memory banks", lambda: workload.make_run(
        work / "run", backbone, images, device, geometry, options.e2e_batch or max(options.batches), options.seed,
        options.modes))
    if made is None:
        return
    run_: workload.Run = made
    g = run_.config.geometry
    entry.update(geometry={"height": g.height, "width": g.width, "patch": g.patch, "step": g.step, "grid": g.grid},
                 dim=run_.encoder.dim, setup_seconds=run_.seconds, bank_images=len(images.bank))
    entry["flops_per_window"] = session.step(entry, f"{backbone}: FLOPs per window",
                                             lambda: flops.flops_per_window(run_.encoder, g.patch))
    if "dense" in options.modes:
        entry["dense_flops_per_window"] = session.step(entry, f"{backbone}: FLOPs per window in dense mode",
                                                       lambda: flops.dense_flops_per_window(run_.encoder, run_.config))

    def official() -> dict[str, Any]:
        from swssl.data.datasets import load_resized

        image = load_resized(images.slides[0], g, run_.config.preprocess.intensity)
        return suites.official_way(run_.encoder, image, run_.config, device, windows=options.official_windows,
                                   warmup=max(options.warmup, 2))

    entry["official"] = session.step(entry, f"{backbone}: the official way (batch 1, one window per call)", official)
    pool = session.step(entry, f"{backbone}: sample windows", lambda: suites.sample_windows(
        run_, images.data, max(options.batches)))
    profile = batch_profile(options)
    exported: set[tuple[str, str, str]] = set()
    for path in paths:
        artifact = BY_BACKEND[path.kind].name if path.kind in BY_BACKEND else None
        key = (artifact, path.precision, path.mode)
        if artifact and key not in exported:
            made_profile = profile if path.mode == "exact" else None  # dense: the export's own (images per call)
            seconds = session.step(entry, f"{backbone}: export {artifact} {key[1]} {path.mode}", lambda: workload.export(
                run_, images.data, artifact, key[1], device, made_profile, path.mode))
            if seconds is None:
                continue
            exported.add(key)
            entry["exports"].append({"artifact": artifact, "precision": key[1], "mode": path.mode, "seconds": seconds,
                                     "batch_profile": profile.to_dict() if made_profile else None})
        measure_path(session, entry, run_, path, pool, images, work)
    for mode in options.modes:
        measure_native(session, entry, run_, slide, mode, work)


def measure_native(session: Session, entry: dict[str, Any], run_: workload.Run, slide: dict[str, Any] | None,
                   mode: str, work: Path) -> None:
    """The large slide through the native streaming path, on the mode's fastest end-to-end path."""
    rows = [row for row in entry["end_to_end"] if row.get("slides") and row.get("mode", "exact") == mode]
    best = max(rows, key=lambda r: r["slides_per_s"], default=None)
    if slide is None or best is None:
        return
    kind, precision = best["kind"], best["precision"]
    native = session.step(entry, f"{entry['backbone']}: native slide {slide['shape'][0]} x {slide['shape'][1]} "
                                 f"({best['path']})", lambda: suites.native_slide(
        run_, Path(slide["path"]), kind, precision, session.options.device, session.options.e2e_batch,
        work / f"native-{mode}", mode))
    if native is not None:
        entry["native" if mode == "exact" else "native_dense"] = {
            "path": best["path"], "kind": kind, "precision": precision, "mode": mode, **native}


def measure_path(session: Session, entry: dict[str, Any], run_: workload.Run, path: OurPath, pool: torch.Tensor | None,
                 images: workload.Images, work: Path) -> None:
    """Encoder throughput (over the batch sizes; in dense mode, whole slices), then the runner end to end, for
    one of our paths."""
    options, device = session.options, session.options.device
    backbone = entry["backbone"]
    dense = path.mode == "dense"
    if pool is not None:
        backend = session.step(entry, f"{backbone}: open {path.label}", lambda: suites.open_backend(
            run_, path.kind, path.precision, device, path.mode))
        if backend is not None:
            timing = dict(warmup=options.warmup, repeats=options.repeats, min_seconds=options.min_seconds)
            if dense:
                rows = session.step(entry, f"{backbone}: dense embedding throughput, {path.label}", lambda: [
                    suites.dense_throughput(backend, suites.first_slice(run_, images), run_.config.with_mode("dense"),
                                            device, **timing)])
            else:
                rows = session.step(entry, f"{backbone}: encoder throughput, {path.label}", lambda: suites.encoder_throughput(
                    backend, pool, options.batches, device, stop=session.over_budget, **timing))
            peak = session.result["peaks"].get(peak_key(path, device))
            flops_per_window = entry.get("dense_flops_per_window" if dense else "flops_per_window")
            for row in rows or []:
                if flops_per_window and peak:
                    row["percent_of_peak"] = flops.percent_of_peak(flops_per_window, row["windows_per_s"],
                                                                   peak["flops_per_s"])
                    row["peak"] = peak_key(path, device)
                entry["encoder"].append({"path": path.label, "kind": path.kind, "precision": path.precision,
                                         "mode": path.mode, "backend": getattr(backend, "name", path.kind), **row})
            del backend
    e2e = session.step(entry, f"{backbone}: end to end, {path.label}, {len(images.slides)} slides", lambda: suites.end_to_end(
        run_, images.slides, path.kind, path.precision, device, options.e2e_batch,
        work / "e2e" / path.label.replace(" ", "-"), path.mode))
    if e2e is not None:
        entry["end_to_end"].append({"path": path.label, "kind": path.kind, "precision": path.precision,
                                    "mode": path.mode, **e2e})
