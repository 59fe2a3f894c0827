"""One export run: load the checkpoint, make each requested artifact, verify it, write its manifest.

Artifacts go to OUT (default RUN_DIR/export), one folder each, with manifest.json beside the file:

    onnx/model.onnx                   float32 graph (+ model.onnx.data past 2 GB)
    tensorrt-<precision>/model.engine  built from onnx/model.onnx (the ONNX export is made or reused)
    aoti-<cpu|cuda>-<precision>/model.pt2
    tensorrt.timing-cache             shared by every engine build on this GPU / TensorRT version

A failed verification still writes the manifest (with "passed": false, so loaders refuse the
artifact) and then raises VerificationError with the numbers.
"""
from __future__ import annotations

import shlex
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import torch

from swssl.checkpoint import BEST, CHECKPOINT, load_checkpoint, load_encoder, weights_digest
from swssl.config import Config
from swssl.export import verify as verification
from swssl.export.errors import ArtifactMismatch, ExportError, MissingRequirement, VerificationError
from swssl.export.manifest import (FORMAT, check_manifest, gpu_info, library_versions, read_manifest,
                                   sha256_file, write_manifest)
from swssl.export.onnx_export import DEFAULT_OPSET, EXTERNAL_DATA_THRESHOLD, INPUT, OUTPUT
from swssl.export.profile import BatchProfile
from swssl.model import PatchEncoder

PRECISIONS = ("fp32", "fp16", "bf16", "int8")
CALIBRATION_WINDOWS = 512


@dataclass
class ExportRequest:
    onnx: bool = False
    trt: bool = False
    aoti: bool = False
    precision: str = "fp32"
    batch: BatchProfile = field(default_factory=BatchProfile)
    out: Path | None = None
    device: str = "auto"
    data: Path | None = None
    verify_windows: int | None = None
    calibration_windows: int = CALIBRATION_WINDOWS
    opset: int = DEFAULT_OPSET
    version_compatible: bool = False
    timing_cache: Path | None = None
    external_data_threshold: int = EXTERNAL_DATA_THRESHOLD


@dataclass
class Source:
    """The run being exported: its encoder, configuration and the facts every manifest records."""

    run_dir: Path
    encoder: PatchEncoder
    config: Config
    facts: dict[str, Any]

    @property
    def digest(self) -> str:
        return self.facts["weights_digest"]


def load_source(run_dir: Path) -> Source:
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise MissingRequirement(f"{run_dir}: no such run directory (train one with swssl-train)")
    if not any((run_dir / name).is_file() for name in (BEST, CHECKPOINT)):
        raise MissingRequirement(f"{run_dir}: no checkpoint here ({BEST} or {CHECKPOINT}; train one with swssl-train)")
    state = load_checkpoint(run_dir)
    encoder, config = load_encoder(state["path"])
    facts = {"run_dir": str(run_dir.resolve()), "checkpoint": state["path"].name,
             "checkpoint_sha256": sha256_file(state["path"]), "weights_digest": weights_digest(encoder),
             "epoch": state["epoch"], "backbone": config.model.backbone}
    return Source(run_dir, encoder, config, facts)


def export_run(run_dir: Path, request: ExportRequest, echo: Callable[[str], None] = print) -> list[Path]:
    """Make every requested artifact of `run_dir`; returns their manifest paths."""
    if request.precision not in PRECISIONS:
        raise ExportError(f"unknown precision {request.precision!r}; choose from {', '.join(PRECISIONS)}")
    request.batch.validate()
    if not (request.onnx or request.trt or request.aoti):
        request.onnx = True
    if request.trt:  # fail before any work when the machine cannot build engines
        from swssl.export.tensorrt_build import require_tensorrt

        require_tensorrt()
    device = _device(request)
    if request.trt and device.type != "cuda":
        raise MissingRequirement(f"--trt builds engines for a CUDA device, not --device {request.device}")
    if request.onnx or request.trt:
        from swssl.export.onnx_export import require_onnx

        require_onnx()
    if request.aoti and request.precision == "int8":
        raise ExportError("AOTInductor exports fp32, fp16 or bf16; INT8 needs --trt")
    source = load_source(run_dir)
    out = Path(request.out) if request.out is not None else source.run_dir / "export"
    count = request.verify_windows or verification.default_window_count(request.batch)
    windows, where = verification.training_windows(source.config, source.run_dir, request.data, count)
    reference = verification.reference_embeddings(source.encoder, windows)
    echo(f"verification: {where}")
    written: list[Path] = []
    failures: list[str] = []

    def keep(result: tuple[Path, str | None]) -> None:
        written.append(result[0])
        if result[1]:
            failures.append(result[1])

    onnx_manifest = None
    if request.onnx or request.trt:
        if request.onnx and request.precision != "fp32":
            echo(f"note: the ONNX file is float32; {request.precision} is built by TensorRT from it (--trt)")
        onnx_manifest = _reusable_onnx(out / "onnx", source, request) if not request.onnx else None
        if onnx_manifest is None:
            keep(export_onnx_artifact(source, out / "onnx", request, windows, reference, where, echo))
            onnx_manifest = read_manifest(out / "onnx")
    if request.trt and not failures:
        keep(export_tensorrt_artifact(source, out, onnx_manifest, request, device, windows, reference, where, echo))
    if request.aoti:
        keep(export_aoti_artifact(source, out, request, device, windows, reference, where, echo))
    if failures:
        raise VerificationError("; ".join(failures))
    return written


def _device(request: ExportRequest) -> torch.device:
    """The device for --aoti / --trt: auto is CUDA when there is one (TensorRT always needs it)."""
    if request.device == "auto":
        return torch.device("cuda" if (torch.cuda.is_available() and (request.trt or request.aoti)) else "cpu")
    device = torch.device(request.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise MissingRequirement(f"--device {request.device}: CUDA is not available here (no GPU, or a CPU-only torch)")
    if device.type not in ("cpu", "cuda"):
        raise ExportError(f"--device must be cpu or cuda[:N], not {request.device}")
    return device


def base_manifest(source: Source, kind: str, artifact: Path, precision: str, request: ExportRequest,
                  device: str) -> dict[str, Any]:
    patch, dim = source.config.geometry.patch, source.encoder.dim
    manifest = {
        "format": FORMAT, "kind": kind, "artifact": artifact.name, "artifact_sha256": sha256_file(artifact),
        "external_data": {}, "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "source": source.facts, "config": source.config.to_dict(),
        "input": {"name": INPUT, "shape": ["batch", 1, patch, patch], "dtype": "float32", "range": [0.0, 1.0],
                  "note": "raw grayscale windows; channel replication and normalisation are inside the graph"},
        "output": {"name": OUTPUT, "shape": ["batch", dim], "dtype": "float32"},
        "precision": precision, "batch": request.batch.to_dict(), "device": device,
        "versions": library_versions(), "gpu": None,
    }
    manifest["command"] = _command(source.run_dir, kind, precision, device, request)
    return manifest


def _command(run_dir: Path, kind: str, precision: str, device: str, request: ExportRequest) -> str:
    parts = ["swssl-export", str(run_dir), {"onnx": "--onnx", "tensorrt": "--trt", "aoti": "--aoti"}[kind]]
    if kind != "onnx":
        parts += ["--precision", precision, "--device", device]
    parts += ["--batch", request.batch.text]
    if request.out is not None:
        parts += ["--out", str(request.out)]
    if request.data is not None:
        parts += ["--data", str(request.data)]
    if kind == "tensorrt" and request.version_compatible:
        parts.append("--version-compatible")
    return " ".join(shlex.quote(p) for p in parts)


def _finish(folder: Path, manifest: dict[str, Any], report: dict[str, Any], echo, label: str) -> tuple[Path, str | None]:
    manifest["verification"] = report
    path = write_manifest(folder, manifest)
    artifact = folder / manifest["artifact"]
    if not report["passed"]:
        echo(f"{label}: {artifact} FAILED verification ({verification.summary(report)})")
        return path, verification.failure_message(artifact, report, manifest["precision"])
    echo(f"{label}: {artifact} (verified: {verification.summary(report)})")
    return path, None


def export_onnx_artifact(source: Source, folder: Path, request: ExportRequest, windows: torch.Tensor,
                         reference: torch.Tensor, where: str, echo) -> tuple[Path, str | None]:
    from swssl.backends import OnnxRuntimeBackend
    from swssl.export.onnx_export import export_onnx

    artifact = folder / "model.onnx"
    (folder / "manifest.json").unlink(missing_ok=True)  # no stale manifest beside a half-made artifact
    info = export_onnx(source.encoder, source.config.geometry.patch, artifact, request.batch, request.opset,
                       request.external_data_threshold)
    manifest = base_manifest(source, "onnx", artifact, "fp32", request, "any")
    manifest["external_data"] = {name: sha256_file(folder / name) for name in info.pop("external_data")}
    manifest["export"] = info
    backend = OnnxRuntimeBackend(artifact, "cpu")  # the reference runtime for the graph itself
    report = verification.verify(backend, windows, reference, "fp32", request.batch, where, "cpu")
    report["runtime"] = f"onnxruntime {manifest['versions']['onnxruntime']} CPUExecutionProvider"
    return _finish(folder, manifest, report, echo, "onnx")


def _reusable_onnx(folder: Path, source: Source, request: ExportRequest) -> dict[str, Any] | None:
    """An existing ONNX export of these weights with this batch profile (so --trt alone does not redo it)."""
    try:
        manifest = read_manifest(folder)
        check_manifest(manifest, digest=source.digest, config=source.config)
    except ArtifactMismatch:
        return None
    return manifest if manifest.get("batch") == request.batch.to_dict() else None


def export_tensorrt_artifact(source: Source, out: Path, onnx_manifest: dict[str, Any], request: ExportRequest,
                             device: torch.device, windows: torch.Tensor, reference: torch.Tensor, where: str,
                             echo) -> tuple[Path, str | None]:
    from swssl.backends import TensorRTBackend
    from swssl.export.tensorrt_build import build_engine

    precision = request.precision
    folder = out / f"tensorrt-{precision}"
    artifact = folder / "model.engine"
    (folder / "manifest.json").unlink(missing_ok=True)
    calibration = calibration_cache = None
    if precision == "int8":
        calibration, _ = verification.training_windows(source.config, source.run_dir, request.data,
                                                       request.calibration_windows, seed=1)
        calibration_cache = folder / f"calibration-{source.digest[:12]}.cache"
    onnx_path = Path(onnx_manifest["_folder"]) / onnx_manifest["artifact"]
    info = build_engine(onnx_path, artifact, source.config.geometry.patch, request.batch, precision, device,
                        request.timing_cache or out / "tensorrt.timing-cache", calibration, calibration_cache,
                        request.version_compatible)
    manifest = base_manifest(source, "tensorrt", artifact, precision, request, "cuda")
    manifest["versions"]["tensorrt"] = info.pop("tensorrt_version")
    manifest["gpu"] = gpu_info(device)
    manifest["tensorrt"] = {**info, "onnx": str(onnx_path), "onnx_sha256": onnx_manifest["artifact_sha256"]}
    backend = TensorRTBackend(artifact, device, request.version_compatible)
    report = verification.verify(backend, windows, reference, precision, request.batch, where, str(device))
    return _finish(folder, manifest, report, echo, f"tensorrt {precision}")


def export_aoti_artifact(source: Source, out: Path, request: ExportRequest, device: torch.device,
                         windows: torch.Tensor, reference: torch.Tensor, where: str, echo) -> tuple[Path, str | None]:
    from swssl.backends import AotiBackend
    from swssl.export.aoti import export_aoti

    precision = request.precision
    folder = out / f"aoti-{device.type}-{precision}"
    artifact = folder / "model.pt2"
    (folder / "manifest.json").unlink(missing_ok=True)
    echo(f"aoti: compiling for {device} ({precision}); this takes a while")
    with strict_fp32(device, precision):  # no TF32 baked into an fp32 package's kernels
        info = export_aoti(source.encoder, source.config.geometry.patch, artifact, request.batch, device, precision)
    manifest = base_manifest(source, "aoti", artifact, precision, request, device.type)
    manifest["gpu"] = gpu_info(device)
    manifest["export"] = info
    backend = AotiBackend(artifact, device, request.batch.to_dict(), source.encoder.dim)
    with strict_fp32(device, precision):
        report = verification.verify(backend, windows, reference, precision, request.batch, where, str(device))
    return _finish(folder, manifest, report, echo, f"aoti {device.type} {precision}")


class strict_fp32:
    """No TF32 while an fp32 artifact is made or checked on CUDA: the check is of the artifact, not of TF32."""

    def __init__(self, device: torch.device, precision: str):
        self.active = device.type == "cuda" and precision == "fp32"

    def __enter__(self):
        if self.active:
            self.saved = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
            torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False

    def __exit__(self, *exc):
        if self.active:
            torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = self.saved
