"""One configuration object for a run, saved inside every checkpoint and artifact.

An artifact always knows how its inputs must be prepared: the geometry (resize, patch,
step, grid policy), the intensity scaling of the readers and the normalisation of the
encoder travel with it. Presets ship as TOML package data; a user file overrides any
subset of their keys.
"""
from __future__ import annotations

import dataclasses
import json
import tomllib
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

from swssl.errors import ConfigError

if TYPE_CHECKING:  # swssl.model.backbones imports torch: not needed to merely read a configuration
    from swssl.model.backbones import FeatureLayout

MODES = ("exact", "dense")


@dataclass
class Geometry:
    """Images are resized to height x width, then cut into patch x patch windows every step px."""

    height: int = 1024
    width: int = 768
    patch: int = 128
    step: int = 32
    # "cover": the last row/column of windows is aligned to the border, so every pixel is covered;
    # "reference": the official (size - patch) // step positions per axis (the border strip is never seen).
    grid: str = "cover"
    # How swssl-infer cuts a slide: "resize" (the run's own geometry: the image resized to height x
    # width, as training and swssl-eval do) or "native" (windows cut from the full-resolution grid,
    # for images too large to resize sensibly; swssl-infer --scale F forces it).
    inference: str = "resize"
    # How window embeddings are computed: "exact" (the trunk runs on each window on its own, as the
    # official code) or "dense" (the trunk runs once over the image and each window averages the
    # feature cells it covers: about patch^2 / step^2 times less arithmetic; see swssl/windows/dense.py).
    mode: str = "exact"


@dataclass
class Preprocess:
    """How stored pixel values become the encoder's input."""

    # "bits": divide by the largest value the stored type / bit depth can hold (streamable, one
    # scale for every image); "minmax": stretch each image's own min..max to 0..1.
    intensity: str = "bits"
    # A window whose largest pixel is not above this is empty (air) and never sampled or scored.
    foreground_threshold: float = 0.0
    # Normalisation applied inside the encoder after the grayscale is replicated to 3 channels.
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)


@dataclass
class Model:
    backbone: str = "wide_resnet50_2"
    # "imagenet" (torchvision cache or download), "none" (random) or a path to a torchvision state dict.
    weights: str = "imagenet"
    # The trunk stages whose feature maps make the embedding (1-based, shallow to deep; the backbone's spec
    # lists them): (4,) the last, as the paper; (2, 3) mid-level features at stride 16, as PatchCore's.
    stages: tuple[int, ...] = (4,)
    # Each cell averaged with its neighbours in a square of this many cells (odd; 1: none), before pooling.
    neighbourhood: int = 1


@dataclass
class Augment:
    """Per-view augmentation of the official code (chest values by default)."""

    crop_scale: tuple[float, float] = (0.4, 1.0)  # RandomResizedCrop back to the patch size
    jitter_p: float = 0.8
    brightness: float = 0.4
    contrast: float = 0.4
    blur_p: float = 0.1
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    solarize_p: float = 0.2


@dataclass
class Train:
    epochs: int = 10000  # 0: no training; the run's encoder is its initialisation (a baseline to measure against)
    batch_size: int = 300  # windows per step (each window brings a second view and a neighbour)
    windows_per_image: int = 1  # windows drawn from each training image per epoch (official: 1)
    lr: float = 1e-4
    momentum: float = 0.9
    weight_decay: float = 1e-5
    grad_clip: float = 0.1  # gradient value clipping
    neighbour_range: int = 3  # a neighbour lies within this many grid steps on each axis
    offdiag_weight: float = 1e-6
    # How the pair and neighbour terms map a cosine: "sigmoid" (the paper's; saturates, see swssl/training/loss.py)
    # or "rescaled" ((1 + cos) / 2, the named remedy).
    similarity: str = "sigmoid"
    workers: int = 4
    # Under torchrun: BatchNorm statistics over the global batch (SyncBatchNorm; swssl.training.distributed says
    # why it is off by default). One process: no effect.
    sync_bn: bool = False
    val_every: int = 10  # epochs between checkpoints and validations
    val_scorer: str = "aligned"  # the scorer whose val AUROC selects the checkpoint
    val_bank_images: int = 0  # training images in the validation bank (0: all; fewer is faster)
    seed: int = 0


@dataclass
class Config:
    name: str = "custom"
    geometry: Geometry = field(default_factory=Geometry)
    preprocess: Preprocess = field(default_factory=Preprocess)
    model: Model = field(default_factory=Model)
    augment: Augment = field(default_factory=Augment)
    train: Train = field(default_factory=Train)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Config":
        return _merge(cls(), data)

    def override(self, data: dict[str, Any]) -> "Config":
        """A copy with the given (nested, partial) keys replaced."""
        return _merge(self, data)

    def with_mode(self, mode: str | None) -> "Config":
        """This configuration in another geometry mode (itself when None); ConfigError if invalid there."""
        return self if mode is None else self.override({"geometry": {"mode": mode}}).validate()

    @property
    def features(self) -> FeatureLayout:
        """The encoder's feature map (channels, stride, receptive field) for the model's stages and neighbourhood."""
        from swssl.model.backbones import backbone_spec

        return backbone_spec(self.model.backbone).layout(self.model.stages, self.model.neighbourhood)

    @property
    def stride(self) -> int:
        """Input pixels per feature cell: dense mode's lattice."""
        return self.features.stride

    def validate(self) -> "Config":
        from swssl.model.backbones import BACKBONES  # torch and torchvision: not needed to merely read a configuration

        g = self.geometry
        if g.grid not in ("cover", "reference"):
            raise ConfigError(f"geometry.grid must be 'cover' or 'reference', not {g.grid!r}")
        if not 0 < g.patch <= min(g.height, g.width):
            raise ConfigError(f"geometry.patch {g.patch} must fit in {g.height} x {g.width}")
        if g.step <= 0:
            raise ConfigError(f"geometry.step must be positive, not {g.step}")
        if g.inference not in ("resize", "native"):
            raise ConfigError(f"geometry.inference must be 'resize' or 'native', not {g.inference!r}")
        if g.mode not in MODES:
            raise ConfigError(f"geometry.mode must be 'exact' or 'dense', not {g.mode!r}")
        self._validate_features(BACKBONES)
        stride = self.stride
        if g.mode == "dense" and (g.patch % stride or g.step % stride):
            raise ConfigError(f"dense mode needs patch and step to be multiples of the feature stride "
                              f"({stride} px), so that every window covers whole feature cells; "
                              f"patch {g.patch} and step {g.step} are not: use --mode exact or change them")
        if len(self.model.stages) > 1 and g.patch % stride:
            raise ConfigError(f"model.stages {list(self.model.stages)} needs geometry.patch to be a multiple of "
                              f"{stride} px, so that every stage's map covers a window in whole cells")
        if self.preprocess.intensity not in ("bits", "minmax"):
            raise ConfigError(f"preprocess.intensity must be 'bits' or 'minmax', not {self.preprocess.intensity!r}")
        if self.train.epochs < 0:
            raise ConfigError(f"train.epochs must be at least 0 (0: no training, the initialisation as it is), "
                              f"not {self.train.epochs}")
        if self.train.similarity not in ("sigmoid", "rescaled"):
            raise ConfigError(f"train.similarity must be 'sigmoid' or 'rescaled', not {self.train.similarity!r}")
        if self.train.batch_size < 2:
            raise ConfigError("train.batch_size must be at least 2 (the loss standardises over the batch)")
        return self


    def _validate_features(self, backbones: dict) -> None:
        m = self.model
        if m.backbone not in backbones:
            raise ConfigError(f"model.backbone must be one of {', '.join(backbones)}, not {m.backbone!r}")
        count = len(backbones[m.backbone].stages)
        if not m.stages or list(m.stages) != sorted(set(m.stages)) or not all(1 <= s <= count for s in m.stages):
            raise ConfigError(f"model.stages must be distinct stages of {m.backbone} from 1 to {count}, shallow "
                              f"to deep (e.g. [{count}] or [2, 3]), not {list(m.stages)}")
        if m.neighbourhood < 1 or m.neighbourhood % 2 == 0:
            raise ConfigError(f"model.neighbourhood must be an odd number of cells (1: none), not {m.neighbourhood}")


def _merge(base: Any, data: dict[str, Any]) -> Any:
    known = {f.name: f for f in dataclasses.fields(base)}
    changes = {}
    for key, value in data.items():
        if key not in known:
            raise ConfigError(f"unknown configuration key {key!r} in {type(base).__name__.lower()}")
        current = getattr(base, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise ConfigError(f"configuration key {key!r} must be a table")
            changes[key] = _merge(current, value)
        elif isinstance(current, tuple):
            changes[key] = tuple(value)
        else:
            changes[key] = value
    return dataclasses.replace(base, **changes)


def preset_names() -> list[str]:
    return sorted(p.name.removesuffix(".toml") for p in resources.files("swssl.presets").iterdir()
                  if p.name.endswith(".toml"))


def load_preset(name: str) -> Config:
    path = resources.files("swssl.presets") / f"{name}.toml"
    if not path.is_file():
        raise ConfigError(f"unknown preset {name!r}; choose from {', '.join(preset_names())}")
    return Config(name=name).override(tomllib.loads(path.read_text())).validate()


def read_config_file(path: str | Path) -> dict[str, Any]:
    """A partial configuration from a TOML or JSON file."""
    path = Path(path)
    try:
        text = path.read_text()
        return json.loads(text) if path.suffix == ".json" else tomllib.loads(text)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{path}: cannot read configuration: {exc}") from None


def build_config(preset: str, config_file: str | Path | None = None, **overrides: Any) -> Config:
    """Preset, then the user's file, then command-line overrides (dotted keys such as train.epochs)."""
    config = load_preset(preset)
    if config_file is not None:
        config = config.override(read_config_file(config_file))
    for dotted, value in overrides.items():
        if value is None:
            continue
        section, key = dotted.split(".")
        config = config.override({section: {key: value}})
    return config.validate()
