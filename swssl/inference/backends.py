"""Inference backends: one small interface, a batch of raw windows in, a batch of embeddings out.

Every backend is called as `backend(windows)` with an N x 1 x P x P float32 tensor in [0, 1]
(moved to `backend.device` if it is elsewhere) and returns N x D float32 embeddings on
`backend.device`. Dense mode calls `backend.feature_map(images)` instead: N x 1 x H x W in [0, 1]
(H, W multiples of the trunk's stride) -> the trunk's cells N x D x H/32 x W/32, float32 on
`backend.device`; swssl/windows/dense.py pools windows from them. The torch backend has both; an
exported artifact has the feature map only when exported in dense mode (`swssl-export --mode
dense`), and such an artifact still answers `backend(windows)` (the mean of a window's cells is
its exact embedding). Calls larger than `backend.max_batch` (the artifact's batch profile; None =
unbounded) are split. The runner and the scorers never know which engine is behind it.

- `TorchBackend`: the encoder itself, eager or `torch.compile`d, fp32 / fp16 / bf16.
- `OnnxRuntimeBackend`: the ONNX file; TensorRT / CUDA execution providers on CUDA (IO binding
  on torch device tensors, no host copies), the CPU provider otherwise.
- `TensorRTBackend`: a serialised engine, run with `execute_async_v3` on torch's current stream.
- `AotiBackend`: an AOTInductor package (`torch._inductor.aoti_load_package`).

`load_backend(model, kind, device, precision, mode)` opens a run directory (its checkpoint, or its
exports under RUN_DIR/export/*/manifest.json) or one artifact file, in the run's geometry mode or
`mode`. Every artifact's manifest is checked first (swssl.export.manifest.check_manifest):
changed bytes, other weights, geometry (the mode included), device type, GPU or TensorRT version
are refused with the command that rebuilds the artifact. `auto` takes the
first usable of tensorrt > aoti > onnxruntime > torch on CUDA, onnxruntime > aoti > torch on the
CPU (measured: AUTO_ORDER), and says what it chose and why in `backend.reason`.
"""
from __future__ import annotations

from abc import ABC, abstractmethod

import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from swssl.registry import BACKENDS, BY_BACKEND, BY_NAME, TORCH_BACKENDS, kind_of_file
from swssl.model.checkpoint import BEST, CHECKPOINT, load_encoder, weights_digest
from swssl.config import Config
from swssl.device import import_cpp_extension, parse_device
from swssl.errors import SwsslError
from swssl.model.encoder import PatchEncoder

if TYPE_CHECKING:
    from swssl.export.graph import GraphSpec

KINDS = ("auto", *BACKENDS)
# auto's order, fastest first. On CUDA: engines, then the compiled package, then ONNX Runtime's CUDA
# provider. On the CPU ONNX Runtime beats the AOTInductor package (resnet18, 128 px windows, 256 per
# call, 2 cores: 0.65 s vs 0.87 s; eager torch 1.9 s).
AUTO_ORDER = {"cuda": ("tensorrt", "aoti", "onnxruntime", "torch"),
              "cpu": ("tensorrt", "onnxruntime", "aoti", "torch")}
# auto prefers reduced precision (faster, verified at export); int8 only when asked for by name.
PRECISION_ORDER = ("fp16", "bf16", "fp32")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class BackendError(SwsslError):
    """A backend that cannot run here (missing runtime, no GPU, no such export): an environment error."""

    exit_code = 2


class Backend(ABC):
    """Base class: input conversion, empty batches and splitting above `max_batch`."""

    name = "backend"
    device: torch.device = torch.device("cpu")
    max_batch: int | None = None
    dim: int = 0
    stride: int = 0  # input pixels per feature cell (the backbone's), set by whoever opens the backend
    precision = "fp32"
    artifact: Path | None = None
    reason = ""

    def __call__(self, windows: torch.Tensor) -> torch.Tensor:
        """Embeddings (N x D float32 on self.device) of raw windows (N x 1 x P x P in [0, 1])."""
        return self._batched(self._run, windows, (self.dim,))

    def feature_map(self, images: torch.Tensor) -> torch.Tensor:
        """The trunk's cells (N x D x H/s x W/s float32 on self.device, s its stride) of raw images
        (N x 1 x H x W in [0, 1])."""
        height, width = images.shape[-2:]
        if not self.stride:
            raise BackendError(f"{self.artifact or self.name}: the trunk's stride is unknown; open the backend with "
                               "open_backend / load_backend, which read it from the manifest")
        if height % self.stride or width % self.stride:
            raise BackendError(f"dense mode needs image sides that are multiples of {self.stride} px, "
                               f"not {height} x {width}")
        return self._batched(self._cells, images, (self.dim, height // self.stride, width // self.stride))

    def _batched(self, run, inputs: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
        """`run` on float32 device inputs in chunks of at most max_batch; no inputs: an empty N x `shape` result."""
        inputs = inputs.to(self.device, torch.float32, non_blocking=True)
        if len(inputs) == 0:
            return torch.empty(0, *shape, device=self.device)
        if self.max_batch is None or len(inputs) <= self.max_batch:
            return run(inputs.contiguous())
        return torch.cat([run(chunk.contiguous()) for chunk in inputs.split(self.max_batch)])

    @abstractmethod
    def _run(self, windows: torch.Tensor) -> torch.Tensor:
        """Embeddings of one batch no larger than max_batch, on self.device (each engine runs its own way)."""

    def _cells(self, images: torch.Tensor) -> torch.Tensor:
        """Feature cells of one batch no larger than max_batch, on self.device (backends with a feature map)."""
        raise BackendError(f"the {self.name} backend has no feature map: it cannot run in dense mode")

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
        self.dim, self.stride = encoder.dim, encoder.stride
        if self.device.type == "cuda":
            self.encoder = self.encoder.to(memory_format=torch.channels_last)
        if compile:
            self.name = "torch-compiled"
            import_cpp_extension(self.device)
        # torch.compile is lazy: each graph compiles at its first call, so the unused one costs nothing.
        self.forward = torch.compile(self.encoder, dynamic=True) if compile else self.encoder
        self.cells = torch.compile(self.encoder.feature_map, dynamic=True) if compile else self.encoder.feature_map

    def _run(self, windows: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return self.forward(windows.to(self.dtype)).float()

    def _cells(self, images: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return self.cells(images.to(self.dtype)).float()


class ArtifactBackend(Backend):
    """An exported graph: exact (windows -> embeddings) or dense (images -> cells; `dense` True).

    A dense graph answers windows too (the mean of a window's cells is its exact embedding), so
    every caller of a backend keeps working; an exact graph has no feature map.
    """

    dense = False

    @classmethod
    @abstractmethod
    def from_manifest(cls, artifact: Path, manifest: dict[str, Any], device: torch.device, spec: GraphSpec | None,
                      dim: int) -> ArtifactBackend:
        """The backend of the artifact a manifest describes (`spec`: its interface, when recorded; `dim`: its
        embedding size)."""

    @abstractmethod
    def _infer(self, inputs: torch.Tensor) -> torch.Tensor:
        """The graph's float32 output for one batch no larger than max_batch, on self.device."""

    def _run(self, windows: torch.Tensor) -> torch.Tensor:
        out = self._infer(windows)
        return out.mean(dim=(2, 3)) if self.dense else out

    def feature_map(self, images: torch.Tensor) -> torch.Tensor:
        if not self.dense:
            raise BackendError(f"{self.artifact}: an exact-mode artifact (windows in, embeddings out) has no feature "
                               "map for dense mode; export one with --mode dense (swssl-export RUN_DIR --mode dense)")
        return super().feature_map(images)

    def _cells(self, images: torch.Tensor) -> torch.Tensor:
        return self._infer(images)

    def _output_shape(self, inputs: torch.Tensor) -> tuple[int, ...]:
        """The graph's output shape for `inputs`: N x D, or N x D x H/s x W/s for a dense graph."""
        if not self.dense:
            return len(inputs), self.dim
        return len(inputs), self.dim, inputs.shape[2] // self.stride, inputs.shape[3] // self.stride


class OnnxRuntimeBackend(ArtifactBackend):
    """An ONNX file in ONNX Runtime; on CUDA, inputs and outputs stay in torch device memory (IO binding).

    `spec` (the interface its manifest records) gives the TensorRT provider its input profile.
    """

    name = "onnxruntime"

    def __init__(self, path: str | Path, device: str | torch.device = "cpu", providers: list | None = None,
                 spec: GraphSpec | None = None, threads: int | None = None):
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
        # ONNX Runtime's threads spin after each run by default, taking the cores from the scorer and the window
        # cutting in torch between runs: on 2 CPU cores the aligned scorer took 51-61 ms per DBT slice with
        # spinning and 25-26 ms without, the encoder's own time unchanged (swssl-infer --profile, demo run).
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        if providers is None:
            providers = default_providers(self.device, ort.get_available_providers(), self.artifact, spec)
        try:
            self.session = ort.InferenceSession(str(self.artifact), options, providers=providers)
        except Exception as exc:
            raise BackendError(f"{self.artifact}: ONNX Runtime cannot load it ({type(exc).__name__}: {exc})") from None
        self.providers = self.session.get_providers()
        self.input_name = self.session.get_inputs()[0].name
        output = self.session.get_outputs()[0]
        self.output_name = output.name
        self.dense = len(output.shape) == 4  # N x D x h x w cells, not N x D embeddings
        self.dim = output.shape[1] if isinstance(output.shape[1], int) else 0
        on_gpu = self.providers[0] in ("CUDAExecutionProvider", "TensorrtExecutionProvider")
        self.io_binding = self.device.type == "cuda" and on_gpu
        if self.providers[0] == "TensorrtExecutionProvider" and spec:
            self.max_batch = spec.batch.max
        self.name = f"onnxruntime ({self.providers[0].removesuffix('ExecutionProvider')})"

    @classmethod
    def from_manifest(cls, artifact: Path, manifest: dict[str, Any], device: torch.device, spec: GraphSpec | None,
                      dim: int) -> OnnxRuntimeBackend:
        if manifest.get("precision") == "int8":
            from swssl.export.quantize import pair_problem

            problem = pair_problem(manifest.get("quantization") or {})
            if problem:
                raise BackendError(f"{artifact}: {problem}")
        return cls(artifact, device, spec=spec)

    def _infer(self, inputs: torch.Tensor) -> torch.Tensor:
        if not self.io_binding:
            array = inputs.detach().cpu().numpy()
            out = self.session.run([self.output_name], {self.input_name: array})[0]
            return torch.from_numpy(out).to(self.device).float()
        index = self.device.index if self.device.index is not None else torch.cuda.current_device()
        out = torch.empty(self._output_shape(inputs), dtype=torch.float32, device=self.device)
        binding = self.session.io_binding()
        binding.bind_input(self.input_name, "cuda", index, np.float32, tuple(inputs.shape), inputs.data_ptr())
        binding.bind_output(self.output_name, "cuda", index, np.float32, tuple(out.shape), out.data_ptr())
        torch.cuda.current_stream(self.device).synchronize()  # ORT runs on its own stream: inputs must be ready
        self.session.run_with_iobinding(binding)
        binding.synchronize_outputs()
        return out


def default_providers(device: torch.device, available: list[str], artifact: Path,
                      spec: GraphSpec | None = None) -> list:
    """TensorRT EP (when TensorRT is installed and the artifact's interface `spec` is known), then CUDA EP, on
    CUDA; else CPU. The TensorRT profile spans the spec's batch range (and image sides, for a dense graph)."""
    if device.type != "cuda":
        return ["CPUExecutionProvider"]
    index = device.index if device.index is not None else torch.cuda.current_device()
    chosen: list = []
    if "TensorrtExecutionProvider" in available and spec and importlib.util.find_spec("tensorrt"):
        profile = {f"trt_profile_{key}_shapes": f"{spec.input_name}:{'x'.join(map(str, shape))}"
                   for key, shape in spec.shapes().items()}
        chosen.append(("TensorrtExecutionProvider", {"device_id": index, "trt_engine_cache_enable": True,
                                                     "trt_engine_cache_path": str(artifact.parent / "ort-trt-cache"),
                                                     "trt_timing_cache_enable": True, **profile}))
    if "CUDAExecutionProvider" in available:
        chosen.append(("CUDAExecutionProvider", {"device_id": index}))
    chosen.append("CPUExecutionProvider")
    return chosen


class TensorRTBackend(ArtifactBackend):
    """A serialised TensorRT engine, executed on torch's current CUDA stream with torch tensors' memory.

    The input shape is set per call and the output shape read back from the execution context
    (TensorRT 10 API), so one code path serves exact engines and dense ones (any H x W in the profile).
    """

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
        output_shape = tuple(self.engine.get_tensor_shape(self.output_name))  # -1 where dynamic
        self.dense = len(output_shape) == 4
        self.dim = int(output_shape[1])
        self.out_dtype = torch.from_numpy(np.empty(0, dtype=trt.nptype(self.engine.get_tensor_dtype(self.output_name)))).dtype
        shapes = self.engine.get_tensor_profile_shape(self.input_name, 0)  # min, opt, max
        self.profile = [tuple(int(d) for d in dims) for dims in shapes]
        self.min_batch, self.max_batch = self.profile[0][0], self.profile[2][0]

    @classmethod
    def from_manifest(cls, artifact: Path, manifest: dict[str, Any], device: torch.device, spec: GraphSpec | None,
                      dim: int) -> TensorRTBackend:
        return cls(artifact, device, bool(manifest.get("tensorrt", {}).get("version_compatible")))

    def _infer(self, inputs: torch.Tensor) -> torch.Tensor:
        count = len(inputs)
        if count < self.min_batch:  # below the profile: pad with empty inputs, drop their rows
            inputs = torch.cat([inputs, inputs.new_zeros(self.min_batch - count, *inputs.shape[1:])])
        if not self.context.set_input_shape(self.input_name, tuple(inputs.shape)):
            raise BackendError(f"{self.artifact}: input shape {tuple(inputs.shape)} is outside the engine's profile "
                               f"({self.profile[0]} to {self.profile[2]})")
        out = torch.empty(tuple(self.context.get_tensor_shape(self.output_name)), dtype=self.out_dtype,
                          device=self.device)
        self.context.set_tensor_address(self.input_name, inputs.data_ptr())
        self.context.set_tensor_address(self.output_name, out.data_ptr())
        stream = torch.cuda.current_stream(self.device)
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise BackendError(f"{self.artifact}: TensorRT execution failed")
        return out[:count].float()


class AotiBackend(ArtifactBackend):
    """An AOTInductor package compiled for this device type (`dense`: of the feature map, from its manifest)."""

    name = "aoti"

    def __init__(self, path: str | Path, device: str | torch.device = "cpu", batch: dict[str, int] | None = None,
                 dim: int = 0, dense: bool = False):
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
        self.dense = dense

    @classmethod
    def from_manifest(cls, artifact: Path, manifest: dict[str, Any], device: torch.device, spec: GraphSpec | None,
                      dim: int) -> AotiBackend:
        return cls(artifact, device, manifest.get("batch") or None, dim, bool(spec and spec.dense))

    def _infer(self, inputs: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            out = self.model(inputs)
        return (out[0] if isinstance(out, (list, tuple)) else out).float()


@dataclass
class Opened:
    """A backend with what it was opened from: the configuration its inputs need, the run it came from
    (None for an artifact whose run is not found) and the fp32 weights digest (computed once)."""

    backend: Backend
    config: Config
    run_dir: Path | None
    digest: str | None


def load_backend(model: str | Path, kind: str = "auto", device: str | torch.device = "cpu",
                 precision: str | None = None, mode: str | None = None) -> tuple[Backend, Config]:
    """The backend for a run directory or artifact file, and the configuration its inputs need
    (`open_backend` without the run and digest)."""
    opened = open_backend(model, kind, device, precision, mode)
    return opened.backend, opened.config


def open_backend(model: str | Path, kind: str = "auto", device: str | torch.device = "cpu",
                 precision: str | None = None, mode: str | None = None) -> Opened:
    """The backend for a run directory or artifact file, its configuration, run and weights digest.

    `kind`: auto | torch | torch-compiled | onnxruntime | tensorrt | aoti. `precision` restricts
    the exports considered (auto never picks int8 unless asked). `mode` (exact | dense; None: the
    run's own) sets the returned configuration's geometry.mode before artifacts are matched, so
    only artifacts exported in that mode are used (ConfigError where the geometry cannot be dense).
    `backend.reason` says what was chosen and why the faster kinds were passed over.
    """
    if kind not in KINDS:
        raise BackendError(f"unknown backend {kind!r}; choose from {', '.join(KINDS)}")
    device = parse_device(device)
    path = Path(model)
    if not path.exists():
        raise BackendError(f"{path}: no such run directory or artifact")
    if path.is_dir():
        return _from_run(path, kind, device, precision, mode)
    return _from_file(path, kind, device, mode)


def _from_run(run: Path, kind: str, device: torch.device, precision: str | None,
              mode: str | None) -> Opened:
    from swssl.export.errors import ArtifactMismatch
    from swssl.export.manifest import check_manifest

    encoder, config = load_encoder(run)
    config = config.with_mode(mode)
    digest = weights_digest(encoder)  # of the fp32 weights, before a torch backend casts them
    torch_precision = precision if precision in DTYPES else "fp32"
    if kind in TORCH_BACKENDS:
        if precision is not None and precision not in DTYPES:
            raise BackendError(f"the torch backend runs fp32, fp16 or bf16, not {precision} (int8: an ONNX export with --precision int8, or a TensorRT engine)")
        backend = TorchBackend(encoder, device, compile=kind == "torch-compiled", precision=torch_precision)
        backend.reason = f"{backend.name}: asked for; the run's checkpoint on {device} ({torch_precision})"
        return Opened(backend, config, run, digest)
    manifests, notes = _run_manifests(run)
    wanted = AUTO_ORDER.get(device.type, AUTO_ORDER["cpu"]) if kind == "auto" else (kind,)
    for candidate in wanted:
        if candidate == "torch":
            backend = TorchBackend(encoder, device, precision=torch_precision)
            backend.reason = (f"auto chose torch (eager, {torch_precision})"
                              + (f"; passed over {'; '.join(notes)}" if notes else ""))
            return Opened(backend, config, run, digest)
        usable = _runtime_problem(candidate, device)
        if usable is not None:
            if kind != "auto":
                raise BackendError(f"{run}: {candidate} backend unusable here: {usable}")
            notes.append(f"{candidate}: {usable}")
            continue
        options = _ordered(manifests, candidate, device, precision, config.geometry.mode)
        if not options:
            if candidate == "onnxruntime" and precision in ("fp16", "bf16"):
                message = f"ONNX exports are fp32 or int8 ({precision} asked for)"
            else:
                message = _no_export(run, candidate, device, precision, config.geometry.mode)
            if kind != "auto":  # an unreadable manifest is the likelier cause: it comes first
                raise BackendError("; ".join([*notes, f"{run}: {message}"]))
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
            return Opened(backend, config, run, digest)
    raise BackendError(f"{run}: no usable {kind} backend ({'; '.join(notes)})")


def _no_export(run: Path, kind: str, device: torch.device, precision: str | None, mode: str) -> str:
    """Why there is no artifact to try, with the command that makes one."""
    flags = BY_BACKEND[kind].flag + (f" --precision {precision}" if precision else "")
    flags += f" --device {device.type}" if BY_BACKEND[kind].device_bound else ""
    flags += " --mode dense" if mode == "dense" else ""
    return (f"no {kind} export for {device.type}" + (f" in {precision}" if precision else "")
            + (" in dense mode" if mode == "dense" else "") + f" (make one: swssl-export {run} {flags})")


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


def _ordered(manifests: list[dict[str, Any]], kind: str, device: torch.device, precision: str | None,
             mode: str = "exact") -> list[dict[str, Any]]:
    """The exports a backend kind could run, best first: the run's mode, matching device, preferred precision.

    Exports of the other mode stay last, so that when none of this mode exists the check refuses
    them (asked for) or auto passes them over, saying which mode to export."""
    from swssl.export.manifest import manifest_mode

    found = [m for m in manifests if m.get("kind") in BY_NAME and BY_NAME[m["kind"]].backend == kind
             and (m.get("precision") == precision if precision else m.get("precision") != "int8")]
    rank = {p: i for i, p in enumerate(PRECISION_ORDER)}
    return sorted(found, key=lambda m: (manifest_mode(m) != mode,
                                        m.get("device", "any") not in ("any", device.type),
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
    """The backend of an artifact kind (swssl.registry) for the artifact a manifest describes."""
    from swssl.export.graph import GraphSpec

    artifact = Path(manifest["_folder"]) / manifest["artifact"]
    spec = GraphSpec.from_manifest(manifest) if manifest.get("batch") else None
    dim = int(manifest.get("output", {}).get("shape", [0, 0])[1] or 0)
    backend = BY_BACKEND[kind].load("backend_class").from_manifest(artifact, manifest, device, spec, dim)
    backend.dim = backend.dim or dim
    backend.stride = Config.from_dict(manifest.get("config", {})).stride
    backend.precision = manifest.get("precision", "fp32")
    backend.manifest = manifest
    return backend


def _from_file(path: Path, kind: str, device: torch.device, mode: str | None) -> Opened:
    from swssl.export.manifest import check_manifest, manifest_mode, read_manifest

    file_kind = kind_of_file(path.suffix)
    if file_kind is None:
        raise BackendError(f"{path}: not a model (a run directory, or a .onnx, .engine/.plan, .pt2 or .pt file)")
    if kind not in ("auto", file_kind) and not (file_kind == "torch" and kind == "torch-compiled"):
        raise BackendError(f"{path}: a {file_kind} file cannot run on the {kind} backend")
    if file_kind == "torch":
        encoder, config = load_encoder(path)
        digest = weights_digest(encoder)
        backend = TorchBackend(encoder, device, compile=kind == "torch-compiled")
        backend.reason = f"{backend.name}: checkpoint {path} on {device}"
        return Opened(backend, config.with_mode(mode), path.parent, digest)
    manifest = read_manifest(path)
    if manifest.get("artifact") != path.name:
        raise BackendError(f"{path}: the manifest beside it describes {manifest.get('artifact')!r}, not this file")
    run = source_run(path, manifest)
    digest = None
    config = Config.from_dict(manifest["config"])  # without its run, the artifact's own (checked for the mode)
    if run is not None:
        encoder, config = load_encoder(run)
        digest = weights_digest(encoder)
    # An artifact named on its own is used in its own mode unless another is asked for (then refused).
    config = config.with_mode(mode or manifest_mode(manifest))
    check_manifest(manifest, digest=digest, config=config, device=device, run_dir=run)
    backend = _open(file_kind, manifest, device)
    backend.reason = (f"{backend.name} from {path} ({backend.precision}, {device})"
                      + ("" if run is not None else "; its run's checkpoint was not found, so the weights "
                                                    "digest was not checked (the file's sha256 was)"))
    return Opened(backend, config, run, digest or (manifest.get("source") or {}).get("weights_digest"))


def source_run(path: Path, manifest: dict[str, Any]) -> Path | None:
    """The run an artifact came from: the folder above the `export/` folder it lies in
    (RUN_DIR/export/<name>/<file>), else the run the manifest records (an export written with
    --out elsewhere); None when neither holds a checkpoint."""

    folder = path.resolve().parent
    candidates = [parent.parent for parent in (folder, *folder.parents) if parent.name == "export"][:1]
    if (manifest.get("source") or {}).get("run_dir"):
        candidates.append(Path(manifest["source"]["run_dir"]))
    for run in candidates:
        if any((run / name).is_file() for name in (BEST, CHECKPOINT)):
            return run
    return None
