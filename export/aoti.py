"""The encoder as an AOTInductor package (.pt2): torch.export, then Inductor compiles it ahead of time.

The package runs without Python model code on the device it was compiled for (CPU or CUDA),
through `torch._inductor.aoti_load_package`. Interface as every artifact: float32 windows
N x 1 x P x P in, float32 embeddings N x D out, dynamic batch in [MIN, MAX]; in dense mode float32
images N x 1 x H x W in (H, W dynamic multiples of 32), float32 cells N x D x H/32 x W/32 out
(swssl/export/graph.py; the package does not check those bounds, the backend checks the
multiples). For fp16 / bf16
the weights are cast and the graph casts its input and output, so callers never see the
reduced precision. (fp16 on the CPU compiles but runs slowly: use bf16 there.) A resnet18
compiles in ~25 s on 2 CPU cores.
"""
from __future__ import annotations

import time
import warnings
from pathlib import Path
from typing import Any

import torch

from swssl.device import import_cpp_extension
from swssl.export.errors import ExportError
from swssl.export.graph import GraphSpec
from swssl.model.encoder import PatchEncoder

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class CastEncoder(torch.nn.Module):
    """A graph with its weights in `dtype`, taking and returning float32 (the artifact interface)."""

    def __init__(self, encoder: torch.nn.Module, dtype: torch.dtype):
        super().__init__()
        self.encoder = encoder.to(dtype)
        self.dtype = dtype

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.encoder(inputs.to(self.dtype)).float()


def inference_module(encoder: PatchEncoder, spec: GraphSpec, precision: str, device: torch.device) -> torch.nn.Module:
    """The graph of `spec` (a copy of the encoder without the projector) for `precision` on `device`."""
    if precision not in DTYPES:
        raise ExportError(f"AOTInductor exports fp32, fp16 or bf16, not {precision} (int8 needs --trt)")
    model = spec.module(encoder).to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    return (model if precision == "fp32" else CastEncoder(model, DTYPES[precision])).eval()


def export_aoti(encoder: PatchEncoder, spec: GraphSpec, path: Path, device: torch.device,
                precision: str = "fp32") -> dict[str, Any]:
    """Compile the encoder's graph for `spec` into the package `path`; returns export facts (timings)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.unlink(missing_ok=True)
    model = inference_module(encoder, spec, precision, device)
    import_cpp_extension(device)
    started = time.perf_counter()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        exported = torch.export.export(model, (spec.example(device),), dynamic_shapes=spec.dynamic_shapes())
        export_seconds = time.perf_counter() - started
        try:
            torch._inductor.aoti_compile_and_package(exported, package_path=str(path))
        except Exception as exc:  # a compiler or toolchain failure: one line, the cause kept in the chain
            raise ExportError(f"{path}: AOTInductor compilation failed ({type(exc).__name__}: "
                              f"{str(exc).strip().splitlines()[0] if str(exc).strip() else ''})") from exc
    return {"export_seconds": round(export_seconds, 2),
            "compile_seconds": round(time.perf_counter() - started - export_seconds, 2)}


def load_package(path: Path, device: torch.device):
    """The compiled model of a package, bound to `device`'s index on CUDA."""
    import_cpp_extension(device)
    loader = torch._inductor.aoti_load_package
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        try:
            return loader(str(path), device_index=index)
        except TypeError:  # older torch without device_index
            with torch.cuda.device(index):
                return loader(str(path))
    return loader(str(path))
