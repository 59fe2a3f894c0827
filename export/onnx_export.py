"""The encoder as an ONNX graph: raw windows (N x 1 x P x P, float32 in [0, 1]) in, embeddings (N x D) out;
in dense mode raw images (N x 1 x H x W) in, feature cells (N x D x H/32 x W/32) out (swssl/export/graph.py).

The channel replication and the normalisation are inside the graph (they are in
PatchEncoder.forward); the projector, which only the loss uses, is not. The batch axis is
dynamic ("batch"), and so are H and W of a dense graph. The file is float32: TensorRT builds its
reduced precisions from it (`--trt --precision fp16|bf16|int8`), and `--onnx --precision int8`
quantizes a copy of it for ONNX Runtime on the CPU (swssl/export/quantize.py).

Exporter: torch.export-based (`dynamo=True`, the default since torch 2.9) at opset 18. Measured
on 2 CPU cores with torch 2.14: resnet18 2.6 s, wide_resnet50_2 6.5 s (64 px windows); the
legacy TorchScript exporter is faster (1.6 s / 3.5 s) but deprecated; it is used for opset 17,
which the new exporter cannot target. Both give the same graph (BatchNorm folded into the
convolutions) and the same outputs (max abs error ~1e-6 of the embedding scale).
"""
from __future__ import annotations

import time
import warnings
from pathlib import Path
from typing import Any

import torch

from swssl.export.errors import ExportError, MissingRequirement
from swssl.export.graph import GraphSpec, io_names, named_axes
from swssl.model.encoder import PatchEncoder

DEFAULT_OPSET = 18
PROTOBUF_LIMIT = 2 * 1024**3  # a single ONNX protobuf cannot exceed 2 GB
EXTERNAL_DATA_THRESHOLD = int(PROTOBUF_LIMIT * 0.9)  # headroom for the graph itself


def require_onnx() -> None:
    try:
        import onnx  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError as exc:
        raise MissingRequirement(f"ONNX export needs onnx and onnxscript ({exc.name} is not installed): "
                                 "pip install 'swssl[export]'") from None


def export_onnx(encoder: PatchEncoder, spec: GraphSpec, path: Path, opset: int = DEFAULT_OPSET,
                external_data_threshold: int = EXTERNAL_DATA_THRESHOLD) -> dict[str, Any]:
    """Write the encoder's graph for `spec` to `path` (+ `path`.data past the threshold); returns export facts."""
    require_onnx()
    if opset < 17:
        raise ExportError(f"--opset must be 17 or more, not {opset}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in (path, path.with_name(path.name + ".data")):
        stale.unlink(missing_ok=True)
    model = spec.module(encoder)
    weight_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    external = weight_bytes > external_data_threshold
    example = spec.example()
    names = {"input_names": [spec.input_name], "output_names": [spec.output_name], "opset_version": opset}
    started = time.perf_counter()
    exporter = "dynamo" if opset >= 18 else "torchscript"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if exporter == "dynamo":
            torch.onnx.export(model, (example,), str(path), dynamo=True, dynamic_shapes=spec.dynamic_shapes(),
                              external_data=external, optimize=True, verbose=False, **names)
        else:
            torch.onnx.export(model, (example,), str(path), dynamo=False, dynamic_axes=named_axes(spec.mode), **names)
            if external:
                _move_to_external_data(path)
    seconds = time.perf_counter() - started
    info = check_onnx(path, spec.mode)
    data = path.with_name(path.name + ".data")
    return {"exporter": exporter, "opset": info["opset"], "seconds": round(seconds, 2),
            "weight_bytes": weight_bytes, "external_data": [data.name] if data.is_file() else []}


def _move_to_external_data(path: Path) -> None:
    import onnx

    model = onnx.load(str(path))
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=path.name + ".data", size_threshold=1024)


def check_onnx(path: Path, mode: str = "exact") -> dict[str, Any]:
    """onnx.checker on the file (by path, so external data works), plus the interface we promise in `mode`."""
    import onnx

    try:
        onnx.checker.check_model(str(path), full_check=False)
    except Exception as exc:
        raise ExportError(f"{path}: onnx.checker rejects the exported model: {exc}") from None
    model = onnx.load(str(path), load_external_data=False)
    opset = max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=0)
    if opset < 17:
        raise ExportError(f"{path}: opset {opset} < 17")
    inputs = [i for i in model.graph.input if i.name not in {t.name for t in model.graph.initializer}]
    expected = list(io_names(mode))
    if [i.name for i in inputs] + [o.name for o in model.graph.output] != expected:
        raise ExportError(f"{path}: expected input {expected[0]!r} and output {expected[1]!r}, found "
                          f"{[i.name for i in inputs]} -> {[o.name for o in model.graph.output]}")
    for value in (inputs[0], model.graph.output[0]):
        dims = value.type.tensor_type.shape.dim
        for axis in named_axes(mode)[value.name]:
            if not dims[axis].dim_param:
                raise ExportError(f"{path}: axis {axis} of {value.name!r} is not dynamic")
    return {"opset": opset}
