"""The encoder as an AOTInductor package (.pt2): torch.export, then Inductor compiles it ahead of time.

The package runs without Python model code on the device it was compiled for (CPU or CUDA),
through `torch._inductor.aoti_load_package`. Interface as every artifact: float32 windows
N x 1 x P x P in, float32 embeddings N x D out, dynamic batch in [MIN, MAX]. For fp16 / bf16
the weights are cast and the graph casts its input and output, so callers never see the
reduced precision. (fp16 on the CPU compiles but runs slowly: use bf16 there.) A resnet18
compiles in ~25 s on 2 CPU cores.
"""
from __future__ import annotations

import copy
import time
import warnings
from pathlib import Path
from typing import Any

import torch

from swssl.export.errors import ExportError
from swssl.export.profile import BatchProfile
from swssl.model import PatchEncoder

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class CastEncoder(torch.nn.Module):
    """The encoder with its weights in `dtype`, taking and returning float32 (the artifact interface)."""

    def __init__(self, encoder: PatchEncoder, dtype: torch.dtype):
        super().__init__()
        self.encoder = encoder.to(dtype)
        self.dtype = dtype

    def forward(self, windows: torch.Tensor) -> torch.Tensor:
        return self.encoder(windows.to(self.dtype)).float()


def inference_module(encoder: PatchEncoder, precision: str, device: torch.device) -> torch.nn.Module:
    """A copy of the encoder for `precision` on `device`, without the projector (inference never uses it)."""
    if precision not in DTYPES:
        raise ExportError(f"AOTInductor exports fp32, fp16 or bf16, not {precision} (int8 needs --trt)")
    model = copy.deepcopy(encoder).float().eval()
    model.projector = torch.nn.Identity()
    model = model.to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    return (model if precision == "fp32" else CastEncoder(model, DTYPES[precision])).eval()


def export_aoti(encoder: PatchEncoder, patch: int, path: Path, profile: BatchProfile, device: torch.device,
                precision: str = "fp32") -> dict[str, Any]:
    """Compile the encoder into the package `path`; returns export facts (timings)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.unlink(missing_ok=True)
    model = inference_module(encoder, precision, device)
    example = torch.rand(max(2, min(profile.opt, 4)), 1, patch, patch, device=device)
    batch = torch.export.Dim("batch", min=1, max=max(profile.max, 2))
    started = time.perf_counter()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        exported = torch.export.export(model, (example,), dynamic_shapes={"windows": {0: batch}})
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
    loader = torch._inductor.aoti_load_package
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        try:
            return loader(str(path), device_index=index)
        except TypeError:  # older torch without device_index
            with torch.cuda.device(index):
                return loader(str(path))
    return loader(str(path))
