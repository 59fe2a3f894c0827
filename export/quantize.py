"""INT8 ONNX for the CPU: ONNX Runtime static quantization of the float32 export.

The float32 graph (onnx/ or onnx-dense/) is quantized to QDQ form (QuantizeLinear /
DequantizeLinear pairs around each convolution, which ONNX Runtime fuses into QLinearConv at load):
weights per output channel, activations uint8 per tensor with ranges calibrated on normal
training windows (exact mode) or whole training images (dense mode). Two choices come from measurement
(demo run: trained mobilenet_v2, stages 2 + 3, 256 held-out windows, cosine to float32 per window, min / median;
"simulated" = the same QDQ graph run unfused, in float, i.e. the quantization error alone):

- The first convolution (the one that reads the image) stays float32 (`FLOAT_FIRST_CONV`): with it quantized,
  the image itself is rounded to 256 levels and the subtle contrast of a mammogram is lost: simulated min 0.75 /
  median 0.93; the first convolution in float: 0.89 / 0.985. No other layer comes close (every depthwise
  convolution left in float as well: 0.92 / 0.99, at 13 more float layers).
- Weight type by the CPU that builds it (`weight_type_for`): U8S8 (int8 weights) is the pair MLAS runs with
  VNNI (VPDPBUSD) exactly; on CPUs without VNNI its AVX2 kernel (VPMADDUBSW) saturates its int16 sums: there,
  fused U8S8 gave min cosine -0.13 where the simulation gives 0.75, while U8U8 (uint8 weights) matches the
  simulation (0.7485 against 0.7488). So U8U8 without VNNI, U8S8 with it; an U8S8 graph is refused on a CPU
  without VNNI (swssl.inference.backends) rather than run wrong. reduce_range (7-bit weights) also avoids the
  saturation but loses more (simulated 0.68 / 0.89).

Calibration method (CALIBRATION_METHOD): percentile (99.999) by default; minmax and entropy were no better on the
demo. Even so the demo's int8 export stays below the verification tolerance (min cosine 0.98): 8-bit activations
per tensor are too coarse for that trained mobilenet, so its export is refused, as it must be; a random resnet18
passes (min cosine 0.994). README "INT8 on the CPU".

`kernel_profile` runs the quantized graph once with ONNX Runtime's profiler and sums the time per
operator type, so the manifest says whether the work ran in integer kernels (QLinearConv,
QLinearAdd, ...) or fell back to float ones (Conv after DequantizeLinear).
"""
from __future__ import annotations

import contextlib
import io
import json
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from swssl.export.errors import ExportError

METHODS = ("minmax", "percentile", "entropy")
CALIBRATION_METHOD = "percentile"
CALIBRATION_NOTE = ("percentile 99.999 (ONNX Runtime's default), the first convolution in float32, the weight type by "
                    "the CPU's VNNI: see export/quantize.py and README 'INT8 on the CPU'")
PERCENTILE = 99.999  # of each activation's histogram (ORT's default); clips rare outliers
CALIBRATION_BATCH = 32  # windows per calibration call (memory: the histograms grow with the batch)
INTEGER_OPS = ("QLinear", "ConvInteger", "MatMulInteger", "DynamicQuantize")


def quantize_onnx(fp32: Path, out: Path, inputs: list[np.ndarray], method: str = CALIBRATION_METHOD) -> dict[str, Any]:
    """Write the static INT8 (QDQ) version of the float32 graph `fp32` to `out`, its activation ranges calibrated
    on `inputs` (arrays the graph takes: window batches or single images); returns the facts for the manifest."""
    from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType,
                                          quantize_static)
    from onnxruntime.quantization.shape_inference import quant_pre_process

    if method not in METHODS:
        raise ExportError(f"unknown INT8 calibration method {method!r}; choose from {', '.join(METHODS)}")
    if not inputs:
        raise ExportError("INT8 calibration needs at least one input")
    name = _input_name(fp32)

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.items: Iterator[np.ndarray] = iter(inputs)

        def get_next(self) -> dict[str, np.ndarray] | None:
            item = next(self.items, None)
            return None if item is None else {name: np.ascontiguousarray(item, dtype=np.float32)}

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.unlink(missing_ok=True)
    weights = weight_type_for(cpu_int8_flags())
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="swssl-int8-") as scratch:
        prepared = Path(scratch) / "prepared.onnx"
        quant_pre_process(str(fp32), str(prepared), skip_symbolic_shape=True)
        float_nodes = first_convolution(prepared) if FLOAT_FIRST_CONV else []
        extra = {"CalibPercentile": PERCENTILE} if method == "percentile" else {}
        with contextlib.redirect_stdout(io.StringIO()):  # ORT prints its calibration steps
            quantize_static(str(prepared), str(out), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                            activation_type=QuantType.QUInt8, weight_type=getattr(QuantType, WEIGHT_TYPES[weights]),
                            calibrate_method=getattr(CalibrationMethod,
                                                     {"minmax": "MinMax"}.get(method, method.title())),
                            nodes_to_exclude=float_nodes,
                            extra_options={**extra, "CalibTensorRangeSymmetric": False})
    return {"method": method, "format": "QDQ", "weights": f"{weights}, per output channel",
            "activations": "uint8, per tensor", "pair": PAIRS[weights], "float_nodes": float_nodes,
            "percentile": PERCENTILE if method == "percentile" else None, "note": CALIBRATION_NOTE,
            "inputs": len(inputs), "samples": int(sum(len(item) for item in inputs)),
            "seconds": round(time.perf_counter() - started, 2)}


FLOAT_FIRST_CONV = True  # the convolution that reads the image stays float32 (module docstring)
WEIGHT_TYPES = {"int8": "QInt8", "uint8": "QUInt8"}
PAIRS = {"int8": "U8S8", "uint8": "U8U8"}
VNNI = ("avx512_vnni", "avx_vnni", "amx_int8")


def weight_type_for(flags: list[str]) -> str:
    """int8 weights (U8S8) where the CPU has VNNI, uint8 (U8U8) elsewhere: AVX2's U8S8 kernel saturates."""
    return "int8" if any(flag in flags for flag in VNNI) else "uint8"


def first_convolution(path: Path) -> list[str]:
    """The name of the graph's first Conv node (in topological order: the one that reads the image)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return [node.name for node in model.graph.node if node.op_type == "Conv"][:1]


def pair_problem(quantization: dict[str, Any]) -> str | None:
    """Why an INT8 graph with these manifest facts must not run on this CPU (an U8S8 graph without VNNI), or None."""
    if quantization.get("pair", "U8S8") != "U8S8" or any(flag in cpu_int8_flags() for flag in VNNI):
        return None
    return ("it was quantized with int8 weights (U8S8) for a CPU with VNNI; this CPU has none, and its U8S8 kernel "
            "saturates (wrong embeddings): export it again on this machine (swssl-export RUN_DIR --onnx --precision "
            "int8), which picks uint8 weights here")


def _input_name(path: Path) -> str:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    initializers = {t.name for t in model.graph.initializer}
    return next(i.name for i in model.graph.input if i.name not in initializers)


def kernel_profile(path: Path, sample: np.ndarray, threads: int | None = None) -> dict[str, Any]:
    """Time and nodes per operator type of one run of the graph at `path` on `sample` (ONNX Runtime's profiler,
    CPU), and the share of the time spent in integer kernels: whether an INT8 graph really runs as integers."""
    import onnxruntime as ort

    with tempfile.TemporaryDirectory(prefix="swssl-profile-") as scratch:
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.enable_profiling = True
        options.profile_file_prefix = str(Path(scratch) / "profile")
        options.log_severity_level = 3
        if threads:
            options.intra_op_num_threads = threads
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        feed = {session.get_inputs()[0].name: np.ascontiguousarray(sample, dtype=np.float32)}
        session.run(None, feed)
        events = json.loads(Path(session.end_profiling()).read_text())
    per_op: dict[str, float] = {}
    nodes: dict[str, set[str]] = {}
    for event in events:
        args = event.get("args", {})
        if event.get("cat") == "Node" and event.get("name", "").endswith("_kernel_time"):
            op = args.get("op_name", "?")
            per_op[op] = per_op.get(op, 0.0) + float(event.get("dur", 0)) / 1e3
            nodes.setdefault(op, set()).add(event["name"])
    total = sum(per_op.values()) or 1.0
    integer = sum(ms for op, ms in per_op.items() if op.startswith(INTEGER_OPS))
    ranked = dict(sorted(per_op.items(), key=lambda item: -item[1]))
    return {"integer_share": round(integer / total, 4), "ms_per_op": {op: round(ms, 3) for op, ms in ranked.items()},
            "nodes_per_op": {op: len(nodes[op]) for op in ranked}, "cpu_flags": cpu_int8_flags()}


def cpu_int8_flags() -> list[str]:
    """The CPU's integer dot-product extensions MLAS dispatches on (Linux /proc/cpuinfo; empty elsewhere)."""
    try:
        flags = next((line.split(":", 1)[1].split() for line in Path("/proc/cpuinfo").read_text().splitlines()
                      if line.startswith("flags")), [])
    except OSError:
        return []
    return sorted(f for f in set(flags) if f in ("avx512_vnni", "avx_vnni", "avx512bw", "amx_int8", "avx2"))
