"""One export run: load the checkpoint, make each requested artifact, verify it, write its manifest.

Artifacts go to OUT (default RUN_DIR/export), one folder each, with manifest.json beside the file:

    onnx/model.onnx                   float32 graph (+ model.onnx.data past 2 GB)
    tensorrt-<precision>/model.engine  built from onnx/model.onnx (the ONNX export is made or reused)
    aoti-<cpu|cuda>-<precision>/model.pt2
    tensorrt.timing-cache             shared by every engine build on this GPU / TensorRT version

Dense mode (`--mode dense`, default: the run's own mode) exports the trunk's feature map instead
(images in, cells out: swssl/export/graph.py) to the same folders with a -dense suffix
(onnx-dense/, tensorrt-fp16-dense/, aoti-cpu-fp32-dense/), so both modes live side by side; its
batch profile counts images or tiles per call (default 1,1,1: swssl-infer runs one at a time).

A failed verification still writes the manifest (with "passed": false, so loaders refuse the
artifact) and then raises VerificationError with the numbers.
"""
from __future__ import annotations

import shlex
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import torch

from swssl.registry import ARTIFACTS, BY_NAME, ArtifactKind
from swssl.model.checkpoint import BEST, CHECKPOINT, encoder_from_state, load_checkpoint, weights_digest
from swssl.config import Config
from swssl.device import parse_device
from swssl.export import verify as verification
from swssl.export.errors import ArtifactMismatch, ExportError, MissingRequirement, VerificationError
from swssl.export.graph import GraphSpec
from swssl.export.manifest import (FORMAT, check_manifest, gpu_info, library_versions, mode_flags, read_manifest,
                                   write_manifest)
from swssl.files import sha256_file
from swssl.export.onnx_export import DEFAULT_OPSET, EXTERNAL_DATA_THRESHOLD
from swssl.export.profile import DEFAULT_BATCH, DEFAULT_DENSE_BATCH, BatchProfile
from swssl.export.verify import Probe
from swssl.model.encoder import PatchEncoder

PRECISIONS = ("fp32", "fp16", "bf16", "int8")
CALIBRATION_WINDOWS = 512


@dataclass
class ExportRequest:
    kinds: tuple[str, ...] = ()  # the artifact kinds to make (swssl.registry: onnx, tensorrt, aoti); none: onnx
    precision: str = "fp32"
    batch: BatchProfile | None = None  # None: DEFAULT_BATCH windows, or DEFAULT_DENSE_BATCH images in dense mode
    mode: str | None = None  # exact | dense; None: the run's own geometry.mode
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


def load_source(run_dir: Path, mode: str | None = None) -> Source:
    """The run's checkpoint, its encoder and configuration (in `mode` when given: ConfigError if invalid there)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise MissingRequirement(f"{run_dir}: no such run directory (train one with swssl-train)")
    if not any((run_dir / name).is_file() for name in (BEST, CHECKPOINT)):
        raise MissingRequirement(f"{run_dir}: no checkpoint here ({BEST} or {CHECKPOINT}; train one with swssl-train)")
    state = load_checkpoint(run_dir)
    encoder, config = encoder_from_state(state)
    facts = {"run_dir": str(run_dir.resolve()), "checkpoint": state["path"].name,
             "checkpoint_sha256": sha256_file(state["path"]), "weights_digest": weights_digest(encoder),
             "epoch": state["epoch"], "backbone": config.model.backbone, "run_mode": config.geometry.mode}
    config = config.with_mode(mode)
    return Source(run_dir, encoder, config, facts)


def export_run(run_dir: Path, request: ExportRequest, echo: Callable[[str], None] = print) -> list[Path]:
    """Make every requested artifact of `run_dir`; returns their manifest paths."""
    if request.precision not in PRECISIONS:
        raise ExportError(f"unknown precision {request.precision!r}; choose from {', '.join(PRECISIONS)}")
    if request.batch is not None:
        request.batch.validate()
    unknown = [name for name in request.kinds if name not in BY_NAME]
    if unknown:
        raise ExportError(f"unknown artifact kind {unknown[0]!r}; choose from {', '.join(BY_NAME)}")
    kinds = [kind for kind in ARTIFACTS if kind.name in (request.kinds or ("onnx",))]
    device = _device(request, kinds)
    _check_requirements({kind.name for kind in kinds}, request, device)  # before any work
    source = load_source(run_dir, request.mode)
    spec = _spec(source, request)
    out = Path(request.out) if request.out is not None else source.run_dir / "export"
    probe = verification.make_probe(source.encoder, source.config, spec, source.run_dir, request.data,
                                    request.verify_windows)
    echo(f"verification: {probe.where}")
    if any(kind.name == "onnx" for kind in kinds) and request.precision in ("fp16", "bf16"):
        echo(f"note: the ONNX file is float32; {request.precision} is built by TensorRT from it (--trt)")
    written: list[Path] = []
    failed: dict[str, str] = {}
    for kind in kinds:
        if kind.builds_from in failed:
            continue  # nothing is built from an artifact that failed its verification
        for made, path, failure in kind.load("exporter")(source, out, request, device, probe, echo):
            written.append(path)
            if failure:
                failed[made] = failure
    if failed:
        raise VerificationError("; ".join(failed.values()))
    return written


def _check_requirements(kinds: set[str], request: ExportRequest, device: torch.device) -> None:
    """What the machine and the request must have for these artifact kinds: fail before any work."""
    if "tensorrt" in kinds:
        from swssl.export.tensorrt_build import require_tensorrt

        require_tensorrt()
        if device.type != "cuda":
            raise MissingRequirement(f"--trt builds engines for a CUDA device, not --device {request.device}")
    if kinds & {"onnx", "tensorrt"}:
        from swssl.export.onnx_export import require_onnx

        require_onnx()
    if "aoti" in kinds and request.precision == "int8":
        raise ExportError("AOTInductor exports fp32, fp16 or bf16; INT8 needs --onnx (CPU) or --trt")


def _spec(source: Source, request: ExportRequest) -> GraphSpec:
    """The graph interface of this export: the source's mode, the request's batch profile or the mode's default."""
    dense = source.config.geometry.mode == "dense"
    if dense and "tensorrt" in request.kinds and request.precision == "int8":
        raise ExportError("dense engines are not INT8-calibrated (calibration runs at the profile's 1024 px OPT "
                          "shape); use --precision fp16 or bf16 with --mode dense, or int8 in exact mode")
    if request.batch is None:
        request.batch = BatchProfile.parse(DEFAULT_DENSE_BATCH if dense else DEFAULT_BATCH)
    return GraphSpec.of(source.config, request.batch)


def _device(request: ExportRequest, kinds: list[ArtifactKind]) -> torch.device:
    """The device for kinds compiled for one (--aoti, --trt): auto is CUDA when there is one."""
    return parse_device(request.device, auto_cuda=any(kind.device_bound for kind in kinds))


def base_manifest(source: Source, kind: str, artifact: Path, precision: str, request: ExportRequest,
                  device: str, spec: GraphSpec) -> dict[str, Any]:
    inputs, output = spec.manifest_io(source.encoder.dim)
    manifest = {
        "format": FORMAT, "kind": kind, "artifact": artifact.name, "artifact_sha256": sha256_file(artifact),
        "external_data": {}, "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "source": source.facts, "config": source.config.to_dict(), "input": inputs, "output": output,
        "precision": precision, "batch": request.batch.to_dict(), "device": device,
        "versions": library_versions(), "gpu": None,
    }
    manifest["command"] = _command(source, kind, precision, device, request, spec)
    return manifest


def _command(source: Source, kind: str, precision: str, device: str, request: ExportRequest, spec: GraphSpec) -> str:
    parts = ["swssl-export", str(source.run_dir), BY_NAME[kind].flag]
    if kind != "onnx":
        parts += ["--precision", precision, "--device", device]
    elif precision == "int8":
        parts += ["--precision", precision]
    parts += mode_flags(spec.mode, source.facts["run_mode"])
    parts += ["--batch", request.batch.text]
    if request.out is not None:
        parts += ["--out", str(request.out)]
    if request.data is not None:
        parts += ["--data", str(request.data)]
    if kind == "tensorrt" and request.version_compatible:
        parts.append("--version-compatible")
    return " ".join(shlex.quote(p) for p in parts)


def _finish(folder: Path, manifest: dict[str, Any], report: dict[str, Any], echo,
            label: str) -> tuple[str, Path, str | None]:
    manifest["verification"] = report
    path = write_manifest(folder, manifest)
    artifact = folder / manifest["artifact"]
    if not report["passed"]:
        echo(f"{label}: {artifact} FAILED verification ({verification.summary(report)})")
        return manifest["kind"], path, verification.failure_message(artifact, report, manifest["precision"])
    echo(f"{label}: {artifact} (verified: {verification.summary(report)})")
    return manifest["kind"], path, None


# What an exporter made: per artifact its kind, its manifest and its verification failure (None: it passed).
Made = list[tuple[str, Path, str | None]]


def export_onnx_artifact(source: Source, out: Path, request: ExportRequest, device: torch.device, probe: Probe,
                         echo) -> Made:
    """The ONNX graph (float32, checked on ONNX Runtime's CPU provider whatever `device`); with --precision int8
    also its statically quantized version (onnx-int8/, swssl/export/quantize.py)."""
    from swssl.export.onnx_export import export_onnx

    folder = out / probe.spec.folder("onnx")
    artifact = folder / BY_NAME["onnx"].file
    (folder / "manifest.json").unlink(missing_ok=True)  # no stale manifest beside a half-made artifact
    info = export_onnx(source.encoder, probe.spec, artifact, request.opset, request.external_data_threshold)
    manifest = base_manifest(source, "onnx", artifact, "fp32", request, "any", probe.spec)
    manifest["external_data"] = {name: sha256_file(folder / name) for name in info.pop("external_data")}
    manifest["export"] = info
    made = [_checked_on_cpu(folder, manifest, probe, "fp32", echo, "onnx")]
    if request.precision == "int8" and not made[0][2]:
        made.append(export_onnx_int8(source, out, request, artifact, manifest, probe, echo))
    return made


def export_onnx_int8(source: Source, out: Path, request: ExportRequest, fp32: Path, fp32_manifest: dict[str, Any],
                     probe: Probe, echo) -> tuple[str, Path, str | None]:
    """The float32 graph quantized to INT8 (QDQ), calibrated on normal training windows (dense: whole images)."""
    from swssl.export.quantize import kernel_profile, quantize_onnx

    folder = out / probe.spec.folder("onnx-int8")
    artifact = folder / BY_NAME["onnx"].file
    (folder / "manifest.json").unlink(missing_ok=True)
    echo(f"onnx int8: calibrating on {_calibration_what(probe.spec, request)}")
    inputs = _calibration_inputs(source, request, probe.spec)
    info = quantize_onnx(fp32, artifact, inputs)
    manifest = base_manifest(source, "onnx", artifact, "int8", request, "cpu", probe.spec)
    manifest["export"] = {**fp32_manifest["export"], "from": str(fp32), "from_sha256": fp32_manifest["artifact_sha256"]}
    manifest["quantization"] = {**info, "kernels": kernel_profile(artifact, inputs[0][:1])}
    return _checked_on_cpu(folder, manifest, probe, "int8", echo, "onnx int8")


def _calibration_what(spec: GraphSpec, request: ExportRequest) -> str:
    if spec.dense:
        return f"{verification.CALIBRATION_IMAGES} normal training images"
    return f"{request.calibration_windows} normal training windows"


def _calibration_inputs(source: Source, request: ExportRequest, spec: GraphSpec) -> list:
    """What INT8 calibration runs the float32 graph on: batches of windows (seed 1: not the verification ones), or
    whole images (dense), as numpy arrays."""
    from swssl.export.quantize import CALIBRATION_BATCH

    if spec.dense:
        images, _ = verification.training_canvases(source.config, source.run_dir, request.data,
                                                   verification.CALIBRATION_IMAGES, avoid=verification.DENSE_IMAGES)
        return [image[None, None].numpy() for image in images]
    windows, _ = verification.training_windows(source.config, source.run_dir, request.data,
                                               request.calibration_windows, seed=1)
    return [chunk.numpy() for chunk in windows.split(CALIBRATION_BATCH)]


def _checked_on_cpu(folder: Path, manifest: dict[str, Any], probe: Probe, precision: str, echo,
                    label: str) -> tuple[str, Path, str | None]:
    """Verify an ONNX file on ONNX Runtime's CPU provider (the reference runtime for the graph itself)."""
    from swssl.inference.backends import OnnxRuntimeBackend

    backend = OnnxRuntimeBackend(folder / manifest["artifact"], "cpu")
    backend.stride = probe.spec.stride
    report = probe.check(backend, precision, "cpu")
    report["runtime"] = f"onnxruntime {manifest['versions']['onnxruntime']} CPUExecutionProvider"
    return _finish(folder, manifest, report, echo, label)


def _reusable_onnx(folder: Path, source: Source, request: ExportRequest) -> dict[str, Any] | None:
    """An existing ONNX export of these weights with this batch profile (so --trt alone does not redo it)."""
    try:
        manifest = read_manifest(folder)
        check_manifest(manifest, digest=source.digest, config=source.config)
    except ArtifactMismatch:
        return None
    return manifest if manifest.get("batch") == request.batch.to_dict() else None


def export_tensorrt_artifact(source: Source, out: Path, request: ExportRequest, device: torch.device, probe: Probe,
                             echo) -> Made:
    """A TensorRT engine, built from the ONNX export of these weights and batch profile (made first when
    there is none)."""
    from swssl.inference.backends import TensorRTBackend
    from swssl.export.tensorrt_build import build_engine

    made: Made = []
    onnx_folder = out / probe.spec.folder("onnx")
    onnx_manifest = _reusable_onnx(onnx_folder, source, request)
    if onnx_manifest is None:
        made = export_onnx_artifact(source, out, request, device, probe, echo)
        if made[0][2]:
            return made
        onnx_manifest = read_manifest(onnx_folder)
    precision = request.precision
    folder = out / probe.spec.folder(f"tensorrt-{precision}")
    artifact = folder / BY_NAME["tensorrt"].file
    (folder / "manifest.json").unlink(missing_ok=True)
    calibration = calibration_cache = None
    if precision == "int8":
        calibration, _ = verification.training_windows(source.config, source.run_dir, request.data,
                                                       request.calibration_windows, seed=1)
        calibration_cache = folder / f"calibration-{source.digest[:12]}.cache"
    onnx_path = Path(onnx_manifest["_folder"]) / onnx_manifest["artifact"]
    info = build_engine(onnx_path, artifact, probe.spec, precision, device,
                        request.timing_cache or out / "tensorrt.timing-cache", calibration, calibration_cache,
                        request.version_compatible)
    manifest = base_manifest(source, "tensorrt", artifact, precision, request, "cuda", probe.spec)
    manifest["versions"]["tensorrt"] = info.pop("tensorrt_version")
    manifest["gpu"] = gpu_info(device)
    manifest["tensorrt"] = {**info, "onnx": str(onnx_path), "onnx_sha256": onnx_manifest["artifact_sha256"]}
    backend = TensorRTBackend(artifact, device, request.version_compatible)
    backend.stride = probe.spec.stride
    report = probe.check(backend, precision, device)
    return [*made, _finish(folder, manifest, report, echo, f"tensorrt {precision}")]


def export_aoti_artifact(source: Source, out: Path, request: ExportRequest, device: torch.device, probe: Probe,
                         echo) -> Made:
    """An AOTInductor package compiled for `device` in the request's precision."""
    from swssl.inference.backends import AotiBackend
    from swssl.export.aoti import export_aoti

    precision = request.precision
    folder = out / probe.spec.folder(f"aoti-{device.type}-{precision}")
    artifact = folder / BY_NAME["aoti"].file
    (folder / "manifest.json").unlink(missing_ok=True)
    echo(f"aoti: compiling for {device} ({precision}); this takes a while")
    with strict_fp32(device, precision):  # no TF32 baked into an fp32 package's kernels
        info = export_aoti(source.encoder, probe.spec, artifact, device, precision)
    manifest = base_manifest(source, "aoti", artifact, precision, request, device.type, probe.spec)
    manifest["gpu"] = gpu_info(device)
    manifest["export"] = info
    backend = AotiBackend(artifact, device, request.batch.to_dict(), source.encoder.dim, probe.spec.dense)
    backend.stride = probe.spec.stride
    with strict_fp32(device, precision):
        report = probe.check(backend, precision, device)
    return [_finish(folder, manifest, report, echo, f"aoti {device.type} {precision}")]


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
