"""One device parser for every command: `--device auto|cpu|cuda|cuda:N`, refused in one line when unusable."""
from __future__ import annotations

import importlib
import logging
import re

import torch

from swssl.errors import ConfigError

DEVICE_HELP = "auto, cpu, cuda or cuda:N"
_PATTERN = re.compile(r"cpu|cuda(:\d+)?")
CUDA_NOTICE = "No CUDA runtime is found"  # what torch.utils.cpp_extension logs on import with a toolkit but no GPU


def parse_device(device: str | torch.device, auto_cuda: bool = True) -> torch.device:
    """The torch device for `device`; "auto" is the first CUDA GPU when there is one (and `auto_cuda`), else the CPU.

    ConfigError (exit status 2) for anything else or for a GPU this machine does not have.
    """
    text = str(device).strip().lower()
    if text == "auto":
        return torch.device("cuda" if auto_cuda and torch.cuda.is_available() else "cpu")
    if not _PATTERN.fullmatch(text):
        raise ConfigError(f"--device {device}: not a device; use {DEVICE_HELP}")
    parsed = torch.device(text)
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"--device {device}: CUDA is not available here (no GPU, or a CPU-only torch); "
                              "use --device cpu")
        if parsed.index is not None and parsed.index >= torch.cuda.device_count():
            raise ConfigError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return parsed


def import_cpp_extension(device: torch.device) -> None:
    """Import torch.utils.cpp_extension now, as Inductor (torch.compile, AOTInductor) does to compile or load,
    and for the CPU without its notice "No CUDA runtime is found": it is logged on that import wherever a CUDA
    toolkit is installed without a GPU, which is no news on a CPU machine. Its other records still show."""
    logger = logging.getLogger("torch.utils.cpp_extension")
    if device.type == "cpu":
        logger.addFilter(_not_the_cuda_notice)
    try:
        importlib.import_module("torch.utils.cpp_extension")
    finally:
        logger.removeFilter(_not_the_cuda_notice)


def _not_the_cuda_notice(record: logging.LogRecord) -> bool:
    return not record.getMessage().startswith(CUDA_NOTICE)
