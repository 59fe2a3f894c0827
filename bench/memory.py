"""Peak memory of one stage: host resident set (RSS) and device memory, reset at the stage's start.

Linux keeps the peak RSS of a process (VmHWM) and lets the process reset it (writing 5 to
/proc/self/clear_refs), so each stage gets its own peak rather than the process's lifetime
maximum. Where that is not possible, the lifetime peak (getrusage) is reported and marked so.
Device memory is what torch's caching allocator handed out (torch.cuda.max_memory_allocated);
memory that ONNX Runtime or TensorRT allocate themselves is not in it.
"""
from __future__ import annotations

import re
import resource
import sys
from pathlib import Path
from typing import Any

import torch

STATUS = Path("/proc/self/status")
CLEAR_REFS = Path("/proc/self/clear_refs")


def reset_host_peak() -> bool:
    """Reset the process's peak RSS to its current RSS; False where the OS does not allow it."""
    try:
        CLEAR_REFS.write_text("5")
        return True
    except OSError:
        return False


def host_peak_mib() -> float:
    """Peak RSS in MiB: since the last reset (VmHWM), else since the process started (getrusage)."""
    try:
        match = re.search(r"^VmHWM:\s+(\d+) kB", STATUS.read_text(), re.MULTILINE)
        if match:
            return int(match.group(1)) / 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2 ** 20 if sys.platform == "darwin" else peak / 1024  # bytes on macOS, KiB elsewhere


class PeakMemory:
    """`with PeakMemory(device) as peak: ...` then `peak.to_dict()`: the stage's peak host and device memory."""

    def __init__(self, device: torch.device | str):
        self.device = torch.device(device)
        self.host_mib: float | None = None
        self.device_mib: float | None = None
        self.since_reset = False

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        self.since_reset = reset_host_peak()
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.device_mib = torch.cuda.max_memory_allocated(self.device) / 2 ** 20
        self.host_mib = host_peak_mib()

    def to_dict(self) -> dict[str, Any]:
        return {"peak_rss_mib": None if self.host_mib is None else round(self.host_mib, 1),
                "peak_rss_scope": "stage" if self.since_reset else "process",
                "peak_device_mib": None if self.device_mib is None else round(self.device_mib, 1)}
