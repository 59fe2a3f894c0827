"""What an artifact's graph takes and gives, in each geometry mode: one place for every exporter.

- exact: raw windows N x 1 x P x P in, embeddings N x D out ("windows" -> "embeddings"), P fixed.
- dense: raw images or tiles N x 1 x H x W in (H, W multiples of the trunk's stride), the trunk's
  feature cells N x D x H/32 x W/32 out ("images" -> "cells"), H and W dynamic. Windows are
  pooled from the cells in torch (swssl/windows/dense.py), never inside the graph: tiles are stitched at
  the cell level, so a window straddling a tile border is pooled from cells of both tiles.

Dense artifacts are built for image sides from one stride to a whole tile with its halos
(DEFAULT_TILE + 2 x halo: 2496 px for the ResNets), tuned for a 1024 px slice (TensorRT's
optimisation profile; the other exporters record the range).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from swssl.config import Config
from swssl.windows.dense import DEFAULT_TILE
from swssl.export.profile import BatchProfile
from swssl.model.encoder import PatchEncoder

INPUT, OUTPUT = "windows", "embeddings"
DENSE_INPUT, DENSE_OUTPUT = "images", "cells"
OPT_SIDE = 1024  # a 1024 x 768 slice is one call: the shape dense engines are tuned for
PROFILE_KEYS = ("min", "opt", "max")


def io_names(mode: str) -> tuple[str, str]:
    """The graph's input and output names in `mode`."""
    return (DENSE_INPUT, DENSE_OUTPUT) if mode == "dense" else (INPUT, OUTPUT)


def named_axes(mode: str) -> dict[str, dict[int, str]]:
    """The dynamic axes of the input and output in `mode`, named (the legacy ONNX exporter's form)."""
    if mode != "dense":
        return {INPUT: {0: "batch"}, OUTPUT: {0: "batch"}}
    return {DENSE_INPUT: {0: "batch", 2: "height", 3: "width"},
            DENSE_OUTPUT: {0: "batch", 2: "cell_rows", 3: "cell_cols"}}


class FeatureMapGraph(nn.Module):
    """The encoder's feature map as a module's forward, so exporters trace the dense interface."""

    def __init__(self, encoder: PatchEncoder):
        super().__init__()
        self.encoder = encoder

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.encoder.feature_map(images)


@dataclass(frozen=True)
class GraphSpec:
    """The interface of one artifact: its mode, window size, batch profile, image sides (px) and the trunk's
    stride (image sides of a dense graph are multiples of it)."""

    mode: str
    patch: int
    batch: BatchProfile
    sides: dict[str, int]  # min / opt / max image side; the patch at all three in exact mode
    stride: int

    @classmethod
    def of(cls, config: Config, batch: BatchProfile, tile: int = DEFAULT_TILE) -> "GraphSpec":
        """The spec of a run's configuration (its geometry.mode) for a batch profile."""
        patch, features = config.geometry.patch, config.features
        if config.geometry.mode != "dense":
            return cls.exact(patch, batch, features.stride)
        top = tile + 2 * features.halo
        return cls("dense", patch, batch, {"min": features.stride, "opt": min(OPT_SIDE, top), "max": top},
                   features.stride)

    @classmethod
    def exact(cls, patch: int, batch: BatchProfile, stride: int) -> "GraphSpec":
        """Windows of `patch` px in, embeddings out."""
        return cls("exact", patch, batch, dict.fromkeys(PROFILE_KEYS, patch), stride)

    @classmethod
    def from_manifest(cls, manifest: dict[str, Any]) -> "GraphSpec":
        """The spec an artifact was built for (manifests of exact artifacts record no sides)."""
        config = Config.from_dict(manifest.get("config", {}))
        geometry, stride = config.geometry, config.stride
        batch = BatchProfile.from_dict(manifest["batch"])
        sides = manifest.get("input", {}).get("sides")
        return cls(geometry.mode, geometry.patch, batch, sides, stride) if sides else cls.exact(geometry.patch, batch,
                                                                                                 stride)

    @property
    def dense(self) -> bool:
        return self.mode == "dense"

    @property
    def input_name(self) -> str:
        return io_names(self.mode)[0]

    @property
    def output_name(self) -> str:
        return io_names(self.mode)[1]

    def folder(self, base: str) -> str:
        """The artifact folder's name: dense artifacts get a -dense suffix, so both modes live in RUN_DIR/export."""
        return f"{base}-dense" if self.dense else base

    def module(self, encoder: PatchEncoder) -> nn.Module:
        """A CPU float32 copy of the encoder without the projector (inference never uses it), in eval mode."""
        model = copy.deepcopy(encoder).float().cpu().eval()
        model.projector = nn.Identity()
        return FeatureMapGraph(model).eval() if self.dense else model

    def example(self, device: str | torch.device = "cpu") -> torch.Tensor:
        """A tracing input: batch >= 2 and, in dense mode, unequal sides (no 0/1 or H == W specialisation)."""
        count = max(2, min(self.batch.opt, 4))
        height, width = (3 * self.stride, 2 * self.stride) if self.dense else (self.patch, self.patch)
        return torch.rand(count, 1, height, width, device=device)

    def dynamic_shapes(self) -> tuple[dict[int, Any]]:
        """torch.export dynamic shapes (positional: wrappers name their argument as they like): the batch;
        in dense mode H and W, as multiples of the stride."""
        Dim = torch.export.Dim
        axes: dict[int, Any] = {0: Dim("batch", min=1, max=max(self.batch.max, 2))}
        if self.dense:
            low, high = self.sides["min"] // self.stride, self.sides["max"] // self.stride
            axes[2] = self.stride * Dim("h_cells", min=low, max=high)
            axes[3] = self.stride * Dim("w_cells", min=low, max=high)
        return (axes,)

    def shapes(self) -> dict[str, tuple[int, int, int, int]]:
        """min / opt / max input shapes (TensorRT optimisation profiles): square images, or windows."""
        return {key: (getattr(self.batch, key), 1, self.sides[key], self.sides[key]) for key in PROFILE_KEYS}

    def manifest_io(self, dim: int) -> tuple[dict[str, Any], dict[str, Any]]:
        """The manifest's "input" and "output" entries."""
        if not self.dense:
            return ({"name": INPUT, "shape": ["batch", 1, self.patch, self.patch], "dtype": "float32",
                     "range": [0.0, 1.0],
                     "note": "raw grayscale windows; channel replication and normalisation are inside the graph"},
                    {"name": OUTPUT, "shape": ["batch", dim], "dtype": "float32"})
        return ({"name": DENSE_INPUT, "shape": ["batch", 1, "height", "width"], "dtype": "float32",
                 "range": [0.0, 1.0], "multiple_of": self.stride, "sides": dict(self.sides),
                 "note": "raw grayscale images or tiles, sides multiples of the stride; channel replication "
                         "and normalisation are inside the graph"},
                {"name": DENSE_OUTPUT, "shape": ["batch", dim, f"height/{self.stride}", f"width/{self.stride}"],
                 "dtype": "float32", "note": "the trunk's feature cells; windows are pooled from them in torch"})
