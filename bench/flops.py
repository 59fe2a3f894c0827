"""The limit: FLOPs a window costs, and the FLOP/s the device can reach, both measured here.

`count_flops` uses torch.utils.flop_counter (a multiply-add counts as 2 FLOPs; convolutions and
matmuls only, which is where an encoder's work is). `matmul_peak` times a large square matmul
on the device in the given dtype: the best rate a kernel of that precision reaches on this
machine, so windows/s x FLOPs/window over it says how close a path gets to the hardware.
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator

import torch
from torch.utils.flop_counter import FlopCounterMode

from swssl.bench.timing import measure

DTYPES = {"fp32": torch.float32, "tf32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def count_flops(function: Callable[..., Any], *inputs: torch.Tensor) -> int:
    """FLOPs of one call of `function` (a module or a method) on `inputs` (multiply-add = 2)."""
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        function(*inputs)
    return int(counter.get_total_flops())


def flops_per_window(encoder: torch.nn.Module, patch: int) -> int:
    """FLOPs to embed one P x P window (run once on the CPU in float32; the count does not depend on the device)."""
    return _in_eval(encoder, lambda: count_flops(encoder, _random(encoder, patch, patch)))


def dense_flops_per_window(encoder: torch.nn.Module, config: Any) -> int:
    """Dense mode's FLOPs per window: one trunk pass over a slice of the configured size (its dense canvas),
    divided by the windows of its grid."""
    from swssl.windows.geometry import canvas_shape, grid

    g = config.with_mode("dense").geometry
    rows, cols = grid(g)
    image = _random(encoder, *canvas_shape(g.height, g.width, g, config.stride))
    return _in_eval(encoder, lambda: count_flops(encoder.feature_map, image)) // (len(rows) * len(cols))


def _random(encoder: torch.nn.Module, height: int, width: int) -> torch.Tensor:
    parameter = next(encoder.parameters())
    return torch.rand(1, 1, height, width, device=parameter.device, dtype=parameter.dtype)


def _in_eval(encoder: torch.nn.Module, count: Callable[[], int]) -> int:
    was_training = encoder.training
    encoder.eval()
    try:
        return count()
    finally:
        encoder.train(was_training)


@contextlib.contextmanager
def _tf32(enabled: bool) -> Iterator[None]:
    """TF32 on or off for both CUDA matmuls and cuDNN convolutions, restored afterwards."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def matmul_peak(device: torch.device | str, precision: str = "fp32", size: int = 2048, warmup: int = 2,
                repeats: int = 5) -> dict[str, Any]:
    """FLOP/s of an n x n by n x n GEMM (2 n^3 FLOPs) at the median repetition, the better of two kernels:
    torch.mm (the BLAS: MKL / cuBLAS) and the same GEMM as a 1 x 1 convolution (oneDNN / cuDNN), since on
    some CPUs the BLAS runs a slower code path than the convolution library the encoders use.
    "tf32" is fp32 with TF32 allowed on CUDA; "fp32" has it off."""
    device = torch.device(device)
    if precision not in DTYPES:
        raise ValueError(f"no matmul peak for precision {precision!r}; choose from {', '.join(DTYPES)}")
    dtype = DTYPES[precision]
    generator = torch.Generator(device="cpu").manual_seed(0)
    a, b = (torch.randn(size, size, generator=generator).to(device, dtype) for _ in range(2))
    out = torch.empty(size, size, device=device, dtype=dtype)
    rows = 32 if size % 32 == 0 else 1
    image = a.reshape(1, size, rows, size // rows)  # n channels x n pixels
    weight = b.reshape(size, size, 1, 1)
    kernels = {"torch.mm": lambda: torch.mm(a, b, out=out),
               "conv1x1": lambda: torch.nn.functional.conv2d(image, weight)}
    flops = 2 * size ** 3
    results: dict[str, dict[str, Any]] = {}
    with _tf32(precision == "tf32"), torch.no_grad():
        for name, kernel in kernels.items():
            timing = measure(kernel, warmup=warmup, repeats=repeats, device=device)
            results[name] = {"flops_per_s": timing.rate(flops), **timing.to_dict()}
    best = max(results, key=lambda name: results[name]["flops_per_s"])
    return {"precision": precision, "size": size, "kernel": best, "flops_per_s": results[best]["flops_per_s"],
            "repetitions": results[best]["repetitions"], "kernels": results}


def int8_peak(size: int = 2048, warmup: int = 2, repeats: int = 5) -> dict[str, Any]:
    """Integer op/s of an n x n by n x n uint8 x int8 GEMM (2 n^3 ops) in ONNX Runtime's CPU kernels (MatMulInteger,
    MLAS: the kernels an INT8 export's QLinearConv runs on), 2 ops per multiply-add as for FLOPs."""
    import numpy as np
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    weight = numpy_helper.from_array(rng.integers(-128, 128, (size, size), dtype=np.int8), "b")
    graph = helper.make_graph([helper.make_node("MatMulInteger", ["a", "b"], ["c"])], "int8-peak",
                              [helper.make_tensor_value_info("a", TensorProto.UINT8, [size, size])],
                              [helper.make_tensor_value_info("c", TensorProto.INT32, [size, size])], [weight])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    a = rng.integers(0, 256, (size, size), dtype=np.uint8)
    timing = measure(lambda: session.run(None, {"a": a}), warmup=warmup, repeats=repeats, device="cpu")
    return {"precision": "int8", "size": size, "kernel": "onnxruntime MatMulInteger",
            "flops_per_s": timing.rate(2 * size ** 3), "repetitions": timing.to_dict()["repetitions"],
            "kernels": {"onnxruntime MatMulInteger": {"flops_per_s": timing.rate(2 * size ** 3), **timing.to_dict()}}}


def percent_of_peak(flops_per_window: float, windows_per_second: float, peak_flops_per_second: float) -> float:
    """The share of the measured peak a path reaches, in percent."""
    return 100.0 * flops_per_window * windows_per_second / peak_flops_per_second
