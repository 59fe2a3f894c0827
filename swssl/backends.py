"""Inference backends: one small interface, a batch of raw windows in, a batch of embeddings out.

Every backend is called as `backend(windows)` with an N x 1 x P x P float32 tensor in [0, 1]
(moved to `backend.device` if it is elsewhere) and returns N x D float32 embeddings on
`backend.device`. Calls larger than `backend.max_batch` (the artifact's batch profile; None =
unbounded) are split. The runner and the scorers never know which engine is behind it.

- `TorchBackend`: the encoder itself, eager or `torch.compile`d, fp32 / fp16 / bf16.
- `OnnxRuntimeBackend`: the ONNX file; TensorRT / CUDA execution providers on CUDA (IO binding
  on torch device tensors, no host copies), the CPU provider otherwise.
- `TensorRTBackend`: a serialised engine, run with `execute_async_v3` on torch's current stream.
- `AotiBackend`: an AOTInductor package (`torch._inductor.aoti_load_package`).

`load_backend(model, kind, device)` opens a run directory (its checkpoint, or its exports under
RUN_DIR/export/*/manifest.json) or one artifact file. Every artifact's manifest is checked first
(swssl.export.manifest.check_manifest): changed bytes, other weights, geometry, device type, GPU
or TensorRT version are refused with the command that rebuilds the artifact. `auto` takes the
first usable of tensorrt > aoti > onnxruntime > torch on CUDA, onnxruntime > aoti > torch on the
CPU (measured: AUTO_ORDER), and says what it chose and why in `backend.reason`.
"""
from __future__ import annotations

from abc import ABC, abstractmethod

import importlib.util
from pathlib import Path
from typing import Any

import numpy as np
import torch

from swssl.checkpoint import load_encoder, weights_digest
from swssl.config import Config
from swssl.errors import SwsslError
from swssl.model import PatchEncoder

KINDS = ("auto", "torch", "torch-compiled", "onnxruntime", "tensorrt", "aoti")
# auto's order, fastest first. On CUDA: engines, then the compiled package, then ONNX Runtime's CUDA
# provider. On the CPU ONNX Runtime beats the AOTInductor package (resnet18, 128 px windows, 256 per
# call, 2 cores: 0.65 s vs 0.87 s; eager torch 1.9 s).
AUTO_ORDER = {"cuda": ("tensorrt", "aoti", "onnxruntime", "torch"),
              "cpu": ("tensorrt", "onnxruntime", "aoti", "torch")}
SUFFIX_KIND = {".onnx": "onnxruntime", ".engine": "tensorrt", ".plan": "tensorrt", ".pt2": "aoti", ".pt": "torch",
               ".pth": "torch"}
ARTIFACT_BACKEND = {"onnx": "onnxruntime", "tensorrt": "tensorrt", "aoti": "aoti"}
EXPORT_FLAG = {"onnxruntime": "--onnx", "tensorrt": "--trt", "aoti": "--aoti"}
# auto prefers reduced precision (faster, verified at export); int8 only when asked for by name.
PRECISION_ORDER = ("fp16", "bf16", "fp32")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class BackendError(SwsslError):
    """A backend that cannot run here (missing runtime, no GPU, no such export)."""


class Backend(ABC):
    """Base class: input conversion, empty batches and splitting above `max_batch`."""

    name = "backend"
    device: torch.device = torch.device("cpu")
    max_batch: int | None = None
    dim: int = 0
    precision = "fp32"
    artifact: Path | None = None
    reason = ""

    def __call__(self, windows: torch.Tensor) -> torch.Tensor:
        windows = windows.to(self.device, torch.float32, non_blocking=True)
        if len(windows) == 0:
            return torch.empty(0, self.dim, device=self.device)
        if self.max_batch is None or len(windows) <= self.max_batch:
            return self._run(windows.contiguous())
        return torch.cat([self._run(chunk.contiguous()) for chunk in windows.split(self.max_batch)])

    @abstractmethod
    def _run(self, windows: torch.Tensor) -> torch.Tensor:
        """Embeddings of one batch no larger than max_batch, on self.device (each engine runs its own way)."""

    def __repr__(self) -> str:
        where = f", artifact={self.artifact}" if self.artifact else ""
        return f"{type(self).__name__}(device={self.device}, precision={self.precision}, max_batch={self.max_batch}{where})"


class TorchBackend(Backend):
    """The PyTorch encoder itself (eager; `compile=True` wraps it in torch.compile); fp16/bf16 cast its weights."""

    name = "torch"

    def __init__(self, encoder: PatchEncoder, device: str | torch.device = "cpu", compile: bool = False,
                 precision: str = "fp32"):
        if precision not in DTYPES:
            raise BackendError(f"the torch backend runs fp32, fp16 or bf16, not {precision}")
        self.device = torch.device(device)
        self.precision, self.dtype = precision, DTYPES[precision]
        self.encoder = encoder.to(self.device, self.dtype).eval()
        self.dim = encoder.dim
        if self.device.type == "cuda":
            self.encoder = self.encoder.to(memory_format=torch.channels_last)
        if compile:
            self.name = "torch-compiled"
        self.forward = torch.compile(self.encoder, dynamic=True) if compile else self.encoder

    def _run(self, windows: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return self.forward(windows.to(self.dtype)).float()


class OnnxRuntimeBackend(Backend):
    """An ONNX file in ONNX Runtime; on CUDA, inputs and outputs stay in torch device memory (IO binding)."""

    name = "onnxruntime"

    def __init__(self, path: str | Path, device: str | torch.device = "cpu", providers: list | None = None,
                 batch: dict[str, int] | None = None, threads: int | None = None):
        try:
            import onnxruntime as ort
        except ImportError:
            raise BackendError("onnxruntime is not installed: pip install 'swssl[export]' "
                               "(or onnxruntime-gpu for CUDA)") from None
        self.artifact = Path(path)
        self.device = torch.device(device)
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3
        if threads:
            options.intra_op_num_threads = threads
        if providers is None:
            providers = default_providers(self.device, ort.get_available_providers(), self.artifact, batch)
        try:
            self.session = ort.InferenceSession(str(self.artifact), options, providers=providers)
        except Exception as exc:
            raise BackendError(f"{self.artifact}: ONNX Runtime cannot load it ({type(exc).__name__}: {exc})") from None
        self.providers = self.session.get_providers()
        self.input_name = self.session.get_inputs()[0].name
        self.output_name = self.session.get_outputs()[0].name
        dim = self.session.get_outputs()[0].shape[-1]
        self.dim = dim if isinstance(dim, int) else 0
        on_gpu = self.providers[0] in ("CUDAExecutionProvider", "TensorrtExecutionProvider")
        self.io_binding = self.device.type == "cuda" and on_gpu
        if self.providers[0] == "TensorrtExecutionProvider" and batch:
            self.max_batch = int(batch["max"])
        self.name = f"onnxruntime ({self.providers[0].removesuffix('ExecutionProvider')})"

    def _run(self, windows: torch.Tensor) -> torch.Tensor:
        if not self.io_binding:
            array = windows.detach().cpu().numpy()
            out = self.session.run([self.output_name], {self.input_name: array})[0]
            return torch.from_numpy(out).to(self.device).float()
        index = self.device.index if self.device.index is not None else torch.cuda.current_device()
        out = torch.empty((len(windows), self.dim), dtype=torch.float32, device=self.device)
        binding = self.session.io_binding()
        binding.bind_input(self.input_name, "cuda", index, np.float32, tuple(windows.shape), windows.data_ptr())
        binding.bind_output(self.output_name, "cuda", index, np.float32, tuple(out.shape), out.data_ptr())
        torch.cuda.current_stream(self.device).synchronize()  # ORT runs on its own stream: inputs must be ready
        self.session.run_with_iobinding(binding)
        binding.synchronize_outputs()
        return out


def default_providers(device: torch.device, available: list[str], artifact: Path,
                      batch: dict[str, int] | None = None) -> list:
    """TensorRT EP (when TensorRT is installed and a batch profile is known), then CUDA EP, on CUDA; else CPU."""
    if device.type != "cuda":
        return ["CPUExecutionProvider"]
    index = device.index if device.index is not None else torch.cuda.current_device()
    chosen: list = []
    if "TensorrtExecutionProvider" in available and batch and importlib.util.find_spec("tensorrt"):
        patch = batch.get("patch")
        shape = (lambda n: f"windows:{n}x1x{patch}x{patch}") if patch else None
        options: dict[str, Any] = {"device_id": index, "trt_engine_cache_enable": True,
                                   "trt_engine_cache_path": str(artifact.parent / "ort-trt-cache"),
                                   "trt_timing_cache_enable": True}
        if shape:
            options.update(trt_profile_min_shapes=shape(batch["min"]), trt_profile_opt_shapes=shape(batch["opt"]),
                           trt_profile_max_shapes=shape(batch["max"]))
        chosen.append(("TensorrtExecutionProvider", options))
    if "CUDAExecutionProvider" in available:
        chosen.append(("CUDAExecutionProvider", {"device_id": index}))
    chosen.append("CPUExecutionProvider")
    return chosen


class TensorRTBackend(Backend):
    """A serialised TensorRT engine, executed on torch's current CUDA stream with torch tensors' memory."""

    name = "tensorrt"

    def __init__(self, path: str | Path, device: str | torch.device = "cuda", version_compatible: bool = False):
        try:
            import tensorrt as trt
        except ImportError:
            raise BackendError("TensorRT is not installed: pip install 'swssl[gpu]'") from None
        self.device = torch.device(device)
        if self.device.type != "cuda" or not torch.cuda.is_available():
            raise BackendError(f"TensorRT engines run on a CUDA GPU, not {self.device}")
        self.artifact = Path(path)
        self._trt = trt
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.runtime = trt.Runtime(self.logger)
        if version_compatible:
            self.runtime.engine_host_code_allowed = True
        with torch.cuda.device(self.device):
            self.engine = self.runtime.deserialize_cuda_engine(self.artifact.read_bytes())
            if self.engine is None:
                raise BackendError(f"{self.artifact}: TensorRT cannot deserialise this engine")
            self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        outputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        if len(inputs) != 1 or len(outputs) != 1:
            raise BackendError(f"{self.artifact}: expected one input and one output, found {inputs} -> {outputs}")
        self.input_name, self.output_name = inputs[0], outputs[0]
        self.dim = int(self.engine.get_tensor_shape(self.output_name)[-1])
        self.out_dtype = torch.from_numpy(np.empty(0, dtype=trt.nptype(self.engine.get_tensor_dtype(self.output_name)))).dtype
        low, _, high = self.engine.get_tensor_profile_shape(self.input_name, 0)
        self.min_batch, self.max_batch = int(low[0]), int(high[0])

    def _run(self, windows: torch.Tensor) -> torch.Tensor:
        count = len(windows)
        if count < self.min_batch:  # below the profile: pad with empty windows, drop their rows
            windows = torch.cat([windows, windows.new_zeros(self.min_batch - count, *windows.shape[1:])])
        out = torch.empty((len(windows), self.dim), dtype=self.out_dtype, device=self.device)
        self.context.set_input_shape(self.input_name, tuple(windows.shape))
        self.context.set_tensor_address(self.input_name, windows.data_ptr())
        self.context.set_tensor_address(self.output_name, out.data_ptr())
        stream = torch.cuda.current_stream(self.device)
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise BackendError(f"{self.artifact}: TensorRT execution failed")
        return out[:count].float()


class AotiBackend(Backend):
    """An AOTInductor package compiled for this device type."""

    name = "aoti"

    def __init__(self, path: str | Path, device: str | torch.device = "cpu", batch: dict[str, int] | None = None,
                 dim: int = 0):
        from swssl.export.aoti import load_package

        self.artifact = Path(path)
        self.device = torch.device(device)
        try:
            self.model = load_package(self.artifact, self.device)
        except Exception as exc:
            raise BackendError(f"{self.artifact}: cannot load the AOTInductor package ({type(exc).__name__}: "
                               f"{str(exc).strip().splitlines()[0] if str(exc).strip() else ''})") from None
        self.max_batch = int(batch["max"]) if batch else None
        self.dim = dim

    def _run(self, windows: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            out = self.model(windows)
        return (out[0] if isinstance(out, (list, tuple)) else out).float()


def resolve_device(device: str | torch.device) -> torch.device:
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise BackendError(f"device {device} asked for, but CUDA is not available here")
    return device


def load_backend(model: str | Path, kind: str = "auto", device: str | torch.device = "cpu",
                 precision: str | None = None) -> tuple[Backend, Config]:
    """The backend for a run directory or artifact file, and the configuration its inputs need.

    `kind`: auto | torch | torch-compiled | onnxruntime | tensorrt | aoti. `precision` restricts
    the exports considered (auto never picks int8 unless asked). `backend.reason` says what
    was chosen and why the faster kinds were passed over.
    """
    if kind not in KINDS:
        raise BackendError(f"unknown backend {kind!r}; choose from {', '.join(KINDS)}")
    device = resolve_device(device)
    path = Path(model)
    if not path.exists():
        raise BackendError(f"{path}: no such run directory or artifact")
    if path.is_dir():
        return _from_run(path, kind, device, precision)
    return _from_file(path, kind, device)


def _from_run(run: Path, kind: str, device: torch.device, precision: str | None) -> tuple[Backend, Config]:
    from swssl.export.errors import ArtifactMismatch
    from swssl.export.manifest import check_manifest

    encoder, config = load_encoder(run)
    torch_precision = precision if precision in DTYPES else "fp32"
    if kind in ("torch", "torch-compiled"):
        if precision is not None and precision not in DTYPES:
            raise BackendError(f"the torch backend runs fp32, fp16 or bf16, not {precision} (int8 needs a TensorRT engine)")
        backend = TorchBackend(encoder, device, compile=kind == "torch-compiled", precision=torch_precision)
        backend.reason = f"{backend.name}: asked for; the run's checkpoint on {device} ({torch_precision})"
        return backend, config
    digest = weights_digest(encoder)
    manifests, notes = _run_manifests(run)
    wanted = AUTO_ORDER.get(device.type, AUTO_ORDER["cpu"]) if kind == "auto" else (kind,)
    for candidate in wanted:
        if candidate == "torch":
            backend = TorchBackend(encoder, device, precision=torch_precision)
            backend.reason = (f"auto chose torch (eager, {torch_precision})"
                              + (f"; passed over {'; '.join(notes)}" if notes else ""))
            return backend, config
        usable = _runtime_problem(candidate, device)
        if usable is not None:
            if kind != "auto":
                raise BackendError(f"{run}: {candidate} backend unusable here: {usable}")
            notes.append(f"{candidate}: {usable}")
            continue
        options = _ordered(manifests, candidate, device, precision)
        if not options:
            if candidate == "onnxruntime" and precision not in (None, "fp32"):
                message = f"the ONNX export is fp32 only ({precision} asked for)"
            else:
                flags = EXPORT_FLAG[candidate] + (f" --precision {precision}" if precision else "")
                flags += f" --device {device.type}" if candidate == "aoti" else ""
                message = (f"no {candidate} export for {device.type}" + (f" in {precision}" if precision else "")
                           + f" (make one: swssl-export {run} {flags})")
            if kind != "auto":
                raise BackendError(f"{run}: {message}")
            notes.append(f"{candidate}: {message}")
            continue
        for manifest in options:
            try:
                check_manifest(manifest, digest=digest, config=config, device=device, run_dir=run)
                backend = _open(candidate, manifest, device)
            except (ArtifactMismatch, BackendError) as exc:
                if kind != "auto":
                    raise
                notes.append(f"{candidate}: {exc}")
                continue
            lead = "auto chose" if kind == "auto" else "asked for"
            backend.reason = (f"{lead} {backend.name} ({backend.artifact}, {backend.precision}, {device})"
                              + (f"; passed over {'; '.join(notes)}" if notes else ""))
            return backend, config
    raise BackendError(f"{run}: no usable {kind} backend ({'; '.join(notes)})")


def _run_manifests(run: Path) -> tuple[list[dict[str, Any]], list[str]]:
    from swssl.export.errors import ArtifactMismatch
    from swssl.export.manifest import MANIFEST, read_manifest

    manifests, notes = [], []
    for path in sorted((run / "export").glob(f"*/{MANIFEST}")):
        try:
            manifests.append(read_manifest(path.parent))
        except ArtifactMismatch as exc:
            notes.append(str(exc))
    return manifests, notes


def _ordered(manifests: list[dict[str, Any]], kind: str, device: torch.device,
             precision: str | None) -> list[dict[str, Any]]:
    """The exports a backend kind could run, best first: matching device, then preferred precision."""
    found = [m for m in manifests if ARTIFACT_BACKEND.get(m.get("kind")) == kind
             and (m.get("precision") == precision if precision else m.get("precision") != "int8")]
    rank = {p: i for i, p in enumerate(PRECISION_ORDER)}
    return sorted(found, key=lambda m: (m.get("device", "any") not in ("any", device.type),
                                        rank.get(m.get("precision"), len(rank))))


def _runtime_problem(kind: str, device: torch.device) -> str | None:
    """Why a backend kind cannot run on this machine and device (None: it can)."""
    if kind == "tensorrt":
        if device.type != "cuda":
            return f"needs a CUDA device (asked for {device.type})"
        if importlib.util.find_spec("tensorrt") is None:
            return "TensorRT is not installed (pip install 'swssl[gpu]')"
    if kind == "onnxruntime":
        if importlib.util.find_spec("onnxruntime") is None:
            return "onnxruntime is not installed (pip install 'swssl[export]')"
        if device.type == "cuda":
            import onnxruntime

            if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
                return "this onnxruntime has no CUDA provider (pip install onnxruntime-gpu)"
    return None


def _open(kind: str, manifest: dict[str, Any], device: torch.device) -> Backend:
    artifact = Path(manifest["_folder"]) / manifest["artifact"]
    batch = dict(manifest.get("batch") or {}) or None
    if batch is not None:
        batch["patch"] = manifest.get("config", {}).get("geometry", {}).get("patch")
    dim = int(manifest.get("output", {}).get("shape", [0, 0])[-1] or 0)
    if kind == "onnxruntime":
        backend: Backend = OnnxRuntimeBackend(artifact, device, batch=batch)
    elif kind == "tensorrt":
        backend = TensorRTBackend(artifact, device, bool(manifest.get("tensorrt", {}).get("version_compatible")))
    elif kind == "aoti":
        backend = AotiBackend(artifact, device, batch, dim)
    else:
        raise BackendError(f"unknown artifact kind {kind!r}")
    backend.dim = backend.dim or dim
    backend.precision = manifest.get("precision", "fp32")
    backend.manifest = manifest
    return backend


def _from_file(path: Path, kind: str, device: torch.device) -> tuple[Backend, Config]:
    from swssl.checkpoint import BEST, CHECKPOINT
    from swssl.export.manifest import check_manifest, read_manifest

    file_kind = SUFFIX_KIND.get(path.suffix.lower())
    if file_kind is None:
        raise BackendError(f"{path}: not a model (a run directory, or a .onnx, .engine/.plan, .pt2 or .pt file)")
    if kind not in ("auto", file_kind) and not (file_kind == "torch" and kind == "torch-compiled"):
        raise BackendError(f"{path}: a {file_kind} file cannot run on the {kind} backend")
    if file_kind == "torch":
        encoder, config = load_encoder(path)
        backend = TorchBackend(encoder, device, compile=kind == "torch-compiled")
        backend.reason = f"{backend.name}: checkpoint {path} on {device}"
        return backend, config
    manifest = read_manifest(path)
    if manifest.get("artifact") != path.name:
        raise BackendError(f"{path}: the manifest beside it describes {manifest.get('artifact')!r}, not this file")
    run = _source_run(path, manifest, (BEST, CHECKPOINT))
    digest = config = None
    if run is not None:
        encoder, config = load_encoder(run)
        digest = weights_digest(encoder)
    check_manifest(manifest, digest=digest, config=config, device=device, run_dir=run)
    backend = _open(file_kind, manifest, device)
    backend.reason = (f"{backend.name} from {path} ({backend.precision}, {device})"
                      + ("" if run is not None else "; its run's checkpoint was not found, so the weights "
                                                    "digest was not checked (the file's sha256 was)"))
    return backend, config if config is not None else Config.from_dict(manifest["config"])


def _source_run(path: Path, manifest: dict[str, Any], checkpoints: tuple[str, ...]) -> Path | None:
    """The run an artifact came from: RUN_DIR/export/<name>/<file> by position, else the manifest's record."""
    folder = path.resolve().parent
    candidates = [folder.parent.parent] if folder.parent.name == "export" else []
    if manifest.get("source", {}).get("run_dir"):
        candidates.append(Path(manifest["source"]["run_dir"]))
    for run in candidates:
        if any((run / name).is_file() for name in checkpoints):
            return run
    return None
