"""Which machine a report's numbers come from: CPU model and cores, GPU, driver, library versions.

A speed without its machine is not a result; every report starts with this. Nothing here
needs more than the standard library and torch (nvidia-smi is asked for the driver when present).
"""
from __future__ import annotations

import os
import platform
import re
import shutil
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

LIBRARIES = ("torch", "torchvision", "numpy", "onnx", "onnxruntime", "onnxruntime-gpu", "tensorrt", "matplotlib")


def cpu_model() -> str:
    """The CPU's marketing name from /proc/cpuinfo (Linux), else what platform knows."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        text = ""
    match = re.search(r"^model name\s*:\s*(.+)$", text, re.MULTILINE)
    return (match.group(1).strip() if match else platform.processor() or platform.machine()) or "unknown CPU"


def usable_cores() -> int:
    """Cores this process may run on (the affinity mask, which containers narrow), else os.cpu_count()."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def memory_total_gib() -> float | None:
    try:
        match = re.search(r"^MemTotal:\s+(\d+) kB", Path("/proc/meminfo").read_text(), re.MULTILINE)
    except OSError:
        return None
    return round(int(match.group(1)) / 2 ** 20, 1) if match else None


def library_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {}
    for name in LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    versions["torch"] = torch.__version__  # the running one
    return versions


def gpu(device: torch.device) -> dict[str, Any] | None:
    """Name, compute capability, memory and driver of a CUDA device (None on the CPU)."""
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    index = device.index if device.index is not None else torch.cuda.current_device()
    props = torch.cuda.get_device_properties(index)
    return {"name": props.name, "compute_capability": f"{props.major}.{props.minor}",
            "memory_gib": round(props.total_memory / 2 ** 30, 1), "multiprocessors": props.multi_processor_count,
            "driver": nvidia_driver(index), "cuda_runtime": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version(), "tf32_conv": torch.backends.cudnn.allow_tf32,
            "tf32_matmul": torch.backends.cuda.matmul.allow_tf32}


def nvidia_driver(index: int = 0) -> str | None:
    tool = shutil.which("nvidia-smi")
    if tool is None:
        return None
    try:
        out = subprocess.run([tool, "--query-gpu=driver_version", "--format=csv,noheader", f"--id={index}"],
                             capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    return out.stdout.strip().splitlines()[0] if out.stdout.strip() else None


def describe(device: torch.device) -> dict[str, Any]:
    """Everything a reader needs to know where the numbers were measured."""
    return {"cpu": cpu_model(), "cores": usable_cores(), "torch_threads": torch.get_num_threads(),
            "memory_gib": memory_total_gib(), "os": f"{platform.system()} {platform.release()}",
            "python": platform.python_version(), "device": str(device), "gpu": gpu(device),
            "versions": library_versions()}


def one_line(machine: dict[str, Any]) -> str:
    """'NVIDIA H100 80GB HBM3 (cc 9.0, driver 550.x, CUDA 12.x); host AMD EPYC, 16 cores; torch 2.x' or the CPU form."""
    versions = machine.get("versions", {})
    host = f"{machine['cpu']}, {machine['cores']} cores"
    if machine.get("memory_gib"):
        host += f", {machine['memory_gib']:g} GiB RAM"
    software = f"torch {versions.get('torch')}"
    ort = versions.get("onnxruntime") or versions.get("onnxruntime-gpu")
    if ort:
        software += f", onnxruntime {ort}"
    if versions.get("tensorrt"):
        software += f", TensorRT {versions['tensorrt']}"
    software += f", Python {machine.get('python')}, {machine.get('os')}"
    info = machine.get("gpu")
    if info:
        return (f"{info['name']} ({info['memory_gib']:g} GiB, compute capability {info['compute_capability']}, driver "
                f"{info.get('driver') or 'unknown'}, CUDA {info.get('cuda_runtime')}); host {host}; {software}")
    return f"{host} ({machine['torch_threads']} torch threads), no GPU used; {software}"
