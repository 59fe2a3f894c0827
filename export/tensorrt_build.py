"""A TensorRT engine built from the ONNX file with the TensorRT (10.x) Python API.

- One optimisation profile for the batch range (MIN, OPT, MAX) of the dynamic "windows" input;
  for a dense graph ("images", swssl/export/graph.py) also over the image sides: one stride to a
  whole tile with its halos (32 to 2496 px), tuned for 1024 x 1024. Dense engines are not
  calibrated for INT8 (its calibration runs at the profile's OPT shape: a 1024 px image per batch).
- fp32 (TF32 disabled, so it can meet the fp32 tolerance), FP16 or BF16 builder flags; the
  engine's inputs and outputs stay float32, so every backend has the same interface.
- INT8 by post-training *calibration* (IInt8EntropyCalibrator2) on normal windows from the
  training data, with a calibration cache beside the engine. Why calibration and not explicit
  Q/DQ: explicit quantisation needs a Q/DQ-annotated ONNX file, i.e. NVIDIA ModelOpt (or
  pytorch-quantization) at export time, a heavy dependency this project does not carry;
  entropy calibration needs only TensorRT and the same real windows the verification uses,
  and the cache makes rebuilds reproducible. FP16 is enabled too, so layers TensorRT will not
  run in INT8 fall back to FP16 rather than FP32. (TensorRT 10 marks implicit quantisation as
  deprecated; the path to explicit Q/DQ is ModelOpt when it becomes a dependency.)
- A timing cache persisted across builds (same GPU and TensorRT version), so rebuilds and
  other precisions skip most kernel timing.
- Optional version-compatible engines (BuilderFlag.VERSION_COMPATIBLE): they run on later
  TensorRT releases of the same major version, at some speed cost; loaders then allow that.

Needs TensorRT and a CUDA GPU; `require_tensorrt` raises MissingRequirement (exit status 2) otherwise.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from swssl.export.errors import ExportError, MissingRequirement
from swssl.export.graph import GraphSpec

WORKSPACE_BYTES = 4 << 30
INSTALL_HINT = "pip install 'swssl[gpu]' (or the tensorrt wheel for your CUDA, e.g. pip install tensorrt-cu12)"


def require_tensorrt(device: torch.device | None = None):
    """The tensorrt module, or MissingRequirement naming what is missing and what to install."""
    try:
        import tensorrt
    except ImportError:
        raise MissingRequirement(f"TensorRT is not installed: {INSTALL_HINT}; --onnx and --aoti work without it") from None
    if not torch.cuda.is_available():
        raise MissingRequirement("TensorRT needs a CUDA GPU and none is visible (torch.cuda.is_available() is False; "
                                 "install a CUDA build of torch and the NVIDIA driver, or export --onnx / --aoti)")
    if device is not None and device.type != "cuda":
        raise MissingRequirement(f"TensorRT engines run on CUDA devices, not {device}")
    return tensorrt


def build_engine(onnx_path: Path, engine_path: Path, spec: GraphSpec, precision: str,
                 device: torch.device, timing_cache: Path, calibration_windows: torch.Tensor | None = None,
                 calibration_cache: Path | None = None, version_compatible: bool = False,
                 workspace: int = WORKSPACE_BYTES) -> dict[str, Any]:
    """Build and write the engine; returns build facts. All TensorRT calls follow the TensorRT 10 Python API."""
    trt = require_tensorrt(device)
    logger = trt.Logger(trt.Logger.WARNING)
    started = time.perf_counter()
    with torch.cuda.device(device):
        builder = trt.Builder(logger)
        network = builder.create_network(0)  # explicit batch is the only mode in TensorRT 10
        parser = trt.OnnxParser(network, logger)
        if not parser.parse_from_file(str(onnx_path)):
            errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
            raise ExportError(f"{onnx_path}: TensorRT cannot parse the ONNX file: {errors}")
        config = builder.create_builder_config()
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace)
        shapes = spec.shapes()
        optimisation = builder.create_optimization_profile()
        optimisation.set_shape(spec.input_name, shapes["min"], shapes["opt"], shapes["max"])
        config.add_optimization_profile(optimisation)
        calibration = None
        if precision == "fp32":
            config.clear_flag(trt.BuilderFlag.TF32)
        elif precision == "fp16":
            config.set_flag(trt.BuilderFlag.FP16)
        elif precision == "bf16":
            config.set_flag(trt.BuilderFlag.BF16)
        elif precision == "int8":
            if calibration_windows is None or not len(calibration_windows):
                raise ExportError("INT8 needs calibration windows from the training data")
            config.set_flag(trt.BuilderFlag.INT8)
            config.set_flag(trt.BuilderFlag.FP16)
            calibration = make_calibrator(trt, calibration_windows, min(spec.batch.opt, len(calibration_windows)),
                                          calibration_cache, device)
            config.int8_calibrator = calibration
            config.set_calibration_profile(optimisation)
        else:
            raise ExportError(f"unknown precision {precision!r}")
        if version_compatible:
            config.set_flag(trt.BuilderFlag.VERSION_COMPATIBLE)
        cache_bytes = timing_cache.read_bytes() if timing_cache.is_file() else b""
        cache = config.create_timing_cache(cache_bytes)
        config.set_timing_cache(cache, ignore_mismatch=False)
        serialized = builder.build_serialized_network(network, config)
        if serialized is None:
            raise ExportError(f"{onnx_path}: TensorRT could not build a {precision} engine (see its log above)")
        engine_path.parent.mkdir(parents=True, exist_ok=True)
        engine_path.write_bytes(bytes(serialized))
        timing_cache.parent.mkdir(parents=True, exist_ok=True)
        timing_cache.write_bytes(bytes(config.get_timing_cache().serialize()))
    return {"seconds": round(time.perf_counter() - started, 2), "tensorrt_version": trt.__version__,
            "timing_cache": str(timing_cache), "workspace_bytes": workspace,
            "int8": ({"method": "calibration (IInt8EntropyCalibrator2)", "windows": len(calibration_windows),
                      "cache": str(calibration_cache)} if calibration is not None else None),
            "version_compatible": version_compatible}


def make_calibrator(trt, windows: torch.Tensor, batch: int, cache: Path | None, device: torch.device):
    """An entropy calibrator feeding normal training windows from CUDA memory (no pycuda needed)."""

    class WindowCalibrator(trt.IInt8EntropyCalibrator2):
        def __init__(self):
            trt.IInt8EntropyCalibrator2.__init__(self)
            self.windows = windows.float().contiguous()
            self.index = 0
            self.current: torch.Tensor | None = None  # keeps the batch alive while TensorRT reads it

        def get_batch_size(self) -> int:
            return batch

        def get_batch(self, names):  # noqa: ARG002 (one input)
            if self.index + batch > len(self.windows):
                return None
            self.current = self.windows[self.index:self.index + batch].to(device).contiguous()
            self.index += batch
            torch.cuda.current_stream(device).synchronize()
            return [int(self.current.data_ptr())]

        def read_calibration_cache(self):
            return cache.read_bytes() if cache is not None and cache.is_file() else None

        def write_calibration_cache(self, data) -> None:
            if cache is not None:
                cache.write_bytes(bytes(data))

    return WindowCalibrator()
