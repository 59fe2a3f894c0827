"""The SWSSL patch encoder: a torchvision trunk, global average pooling, and the loss's projector.

The encoder takes raw windows, N x 1 x P x P in [0, 1]; replicating the grayscale to three
channels and the normalisation happen inside, so training, the bank, inference and every
exported graph see identical inputs.
"""
from __future__ import annotations

import pickle

import socket
import threading
import urllib.request
from collections import OrderedDict
from pathlib import Path

import torch
import torchvision
from torch import nn

from swssl.config import Config
from swssl.errors import WeightsError

BACKBONES = ("wide_resnet50_2", "resnet50", "resnet18")


class PatchEncoder(nn.Module):
    """Window -> embedding (the features scored against the bank); `project` feeds only the loss."""

    def __init__(self, backbone: str = "wide_resnet50_2", mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)):
        super().__init__()
        if backbone not in BACKBONES:
            raise WeightsError(f"unknown backbone {backbone!r}; choose from {', '.join(BACKBONES)}")
        net = getattr(torchvision.models, backbone)(weights=None)
        self.backbone_name = backbone
        # Everything before avgpool and fc, keeping torchvision's names so its state dicts load as they are.
        self.trunk = nn.Sequential(OrderedDict(list(net.named_children())[:-2]))
        self.dim = net.fc.in_features
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1))
        # The official projector: Linear -> BatchNorm1d -> ReLU -> Linear, no biases, width = embedding.
        self.projector = nn.Sequential(
            nn.Linear(self.dim, self.dim, bias=False), nn.BatchNorm1d(self.dim), nn.ReLU(inplace=True),
            nn.Linear(self.dim, self.dim, bias=False))

    def forward(self, windows: torch.Tensor) -> torch.Tensor:
        """Embeddings (N x D) of raw windows (N x 1 x P x P, values in [0, 1])."""
        return self.feature_map(windows).mean(dim=(2, 3))

    def feature_map(self, images: torch.Tensor) -> torch.Tensor:
        """The trunk's cells (N x D x H/32 x W/32) of raw images of any size (N x 1 x H x W in [0, 1]): dense mode."""
        return self.trunk((images.expand(-1, 3, -1, -1) - self.mean) / self.std)

    def project(self, embeddings: torch.Tensor) -> torch.Tensor:
        return self.projector(embeddings)


def build_encoder(config: Config, weights: str | None = None) -> PatchEncoder:
    """The encoder of a configuration, its trunk initialised from `weights` (default: the config's)."""
    encoder = PatchEncoder(config.model.backbone, config.preprocess.mean, config.preprocess.std)
    weights = config.model.weights if weights is None else weights
    if weights != "none":
        state = imagenet_state_dict(config.model.backbone) if weights == "imagenet" else _read_state_dict(weights)
        load_trunk_weights(encoder, state, source=weights)
    return encoder


def load_trunk_weights(encoder: PatchEncoder, state: dict[str, torch.Tensor], source: str) -> None:
    """Load a torchvision classifier state dict (its fc is ignored) into the encoder's trunk."""
    trunk_state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    try:
        encoder.trunk.load_state_dict(trunk_state, strict=True)
    except RuntimeError as exc:
        missing = set(encoder.trunk.state_dict()) - set(trunk_state)
        detail = f"{len(missing)} trunk tensors missing" if missing else str(exc).splitlines()[-1].strip()
        raise WeightsError(f"{source}: not a {encoder.backbone_name} state dict ({detail})") from None


def _read_state_dict(path: str) -> dict[str, torch.Tensor]:
    try:
        state = torch.load(Path(path), map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise WeightsError(f"{path}: no such weights file (use --weights imagenet|none|PATH)") from None
    except pickle.UnpicklingError:  # what weights_only=True raises for anything but tensors and plain containers
        raise WeightsError(f"{path}: `--weights FILE` is not a plain state dict; refusing to unpickle code") from None
    except Exception as exc:  # corrupt or foreign file: one line, not a traceback
        raise WeightsError(f"{path}: cannot read weights ({type(exc).__name__}: {exc})") from None
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise WeightsError(f"{path}: not a state dict")
    return state


def imagenet_state_dict(backbone: str, timeout: float = 5.0) -> dict[str, torch.Tensor]:
    """torchvision's ImageNet weights from its cache, or downloaded where a network exists.

    Offline, fails within `timeout` seconds instead of waiting on the network.
    """
    weights = torchvision.models.get_model_weights(backbone).DEFAULT
    cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(weights.url).name
    if cached.is_file():
        return _read_state_dict(str(cached))
    host = weights.url.split("/")[2]
    if not _reachable(weights.url, timeout):
        raise WeightsError(
            f"ImageNet weights for {backbone} are not in the torchvision cache ({cached}) and "
            f"{host} cannot be reached; download them elsewhere and pass --weights PATH, or use --weights none")
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(15)
    try:
        return weights.get_state_dict(progress=True)
    except Exception as exc:
        raise WeightsError(f"downloading ImageNet weights for {backbone} failed ({exc}); "
                           "pass --weights PATH (a local torchvision state dict)") from None
    finally:
        socket.setdefaulttimeout(previous)


def _reachable(url: str, timeout: float) -> bool:
    """Whether an HTTPS HEAD request for `url` answers in time (DNS and TLS included).

    Runs in a daemon thread joined with a timeout, so a black-holed network cannot hang us; a
    bare TCP connect is not enough, since sandbox proxies accept connections they never serve.
    """
    result: list[bool] = []

    def probe() -> None:
        try:
            with urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=timeout):
                result.append(True)
        except Exception:
            result.append(False)

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout)
    return bool(result and result[0])
