"""Checkpoints: the model, the optimiser, the epoch and the full configuration, written atomically."""
from __future__ import annotations

import hashlib
import pickle
from pathlib import Path
from typing import Any

import torch

from swssl.config import Config
from swssl.errors import CheckpointError
from swssl.files import atomic_write
from swssl.model.encoder import PatchEncoder, build_encoder

CHECKPOINT = "checkpoint.pt"  # the latest state, for --resume
BEST = "best.pt"  # the state selected on the val split


def save_checkpoint(path: Path, encoder: PatchEncoder, optimizer: torch.optim.Optimizer | None,
                    epoch: int, config: Config, history: list[dict[str, float]]) -> None:
    model = encoder.state_dict()
    state = {"model": model, "optimizer": optimizer.state_dict() if optimizer else None,
             "epoch": epoch, "config": config.to_dict(), "history": history, "weights_digest": state_digest(model)}
    atomic_write(path, lambda tmp: torch.save(state, tmp))


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """A checkpoint's contents; a run directory means its best.pt, else its checkpoint.pt."""
    path = Path(path)
    if path.is_dir():
        path = path / BEST if (path / BEST).is_file() else path / CHECKPOINT
    if not path.is_file():
        raise CheckpointError(f"{path}: no checkpoint here (train one with swssl-train)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:  # weights_only=True met code or objects: never run them
        raise CheckpointError(f"{path}: not a plain swssl checkpoint (it holds pickled objects beyond tensors "
                              "and plain containers); refusing to unpickle code") from None
    except Exception as exc:
        raise CheckpointError(f"{path}: corrupt or not a swssl checkpoint ({type(exc).__name__})") from None
    if not isinstance(state, dict) or not {"model", "config", "epoch"} <= state.keys():
        raise CheckpointError(f"{path}: not a swssl checkpoint (model, config or epoch missing)")
    if "weights_digest" in state and state_digest(state["model"]) != state["weights_digest"]:
        raise CheckpointError(f"{path}: damaged checkpoint (its weights do not match the digest saved with them); "
                              "restore it or train again")
    state["config"] = Config.from_dict(state["config"])
    state["path"] = path
    return state


def load_encoder(path: str | Path) -> tuple[PatchEncoder, Config]:
    """The trained encoder of a checkpoint or run directory (evaluation mode, on the CPU) and its config."""
    return encoder_from_state(load_checkpoint(path))


def encoder_from_state(state: dict[str, Any]) -> tuple[PatchEncoder, Config]:
    """The encoder (evaluation mode, on the CPU) and config of a checkpoint already read by `load_checkpoint`."""
    config = state["config"]
    encoder = build_encoder(config, weights="none")
    try:
        encoder.load_state_dict(state["model"])
    except RuntimeError as exc:
        raise CheckpointError(f"{state['path']}: weights do not fit a {config.model.backbone} encoder "
                              f"({str(exc).splitlines()[0]})") from None
    return encoder.eval(), config


def weights_digest(encoder: PatchEncoder) -> str:
    """SHA-256 of the encoder's tensors: what banks and exports record to prove their source."""
    return state_digest(encoder.state_dict())


def state_digest(state: dict[str, torch.Tensor]) -> str:
    """SHA-256 of a state dict's names and tensors; checkpoints carry it (checked on load: torch.load
    checks no checksum, so a flipped bit would otherwise load as other weights)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(state.items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()
