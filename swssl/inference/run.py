"""`open_run`: the one way from `--model` (a run directory or any of its artifacts) to what scoring needs.

An artifact may lie inside its run (RUN_DIR/export/<name>/<file>) or anywhere else (`swssl-export
--out`): its manifest records the run it came from. Either way the backend, the configuration, the
weights digest (computed once, from the fp32 weights) and the memory bank come from the same run,
checked against each other.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from swssl.inference.backends import Backend, open_backend
from swssl.scoring.bank import MemoryBank, bank_file, check_compatible
from swssl.config import Config
from swssl.errors import ConfigError, SwsslError


@dataclass
class OpenRun:
    backend: Backend  # backend(windows N x 1 x P x P on backend.device) -> N x D; .name, .device
    config: Config
    bank: MemoryBank
    digest: str
    run_dir: Path
    source: Path  # what --model named


def open_run(model: str | Path, backend: str = "auto", device: str | torch.device = "auto",
             precision: str | None = None, mode: str | None = None, bank: MemoryBank | None = None) -> OpenRun:
    """Backend, configuration and memory bank of a run directory or artifact, checked against each other.

    `mode` (exact | dense) overrides the run's geometry mode: the backend, artifact and bank are
    then those of that mode. `bank`: one already loaded (and checksummed) from this run, e.g. shipped to a
    Ray worker, checked against the backend instead of read again."""
    model = Path(model)
    if not model.exists():
        raise ConfigError(f"{model}: no such run directory or artifact")
    opened = open_backend(model, backend, device, precision, mode)
    if opened.run_dir is None or opened.digest is None:
        raise SwsslError(f"{model}: the run this artifact was exported from is not found (it is not inside "
                         "RUN_DIR/export/, and the run its manifest records holds no checkpoint); the memory "
                         "bank is in the run: pass --model RUN_DIR, or the artifact inside it")
    if bank is None:
        bank = MemoryBank.load(opened.run_dir, config=opened.config, encoder_digest=opened.digest)
    else:
        check_compatible(bank, opened.config, opened.digest, bank_file(opened.run_dir, opened.config.geometry.mode))
    return OpenRun(opened.backend, opened.config, bank, opened.digest, opened.run_dir, model)
