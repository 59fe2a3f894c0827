"""The extension points, one table each: artifact kinds, scorers and backbone names (their specs:
swssl.model.backbones, which imports torch; the names here let `--help` list them without it).

Read by the loaders, the exporter, the benchmarks and every command line, so that adding one is a
row here and its implementation:
- an artifact kind: a row in ARTIFACTS, a backend class with `from_manifest` (swssl.inference.backends) and
  an exporter (swssl.export.pipeline);
- a scorer: a row in SCORERS (its options from SCORER_OPTIONS, or a new one there) and its class
  (swssl.scoring.scorers, the `Scorer` interface);
- a backbone: its name in BACKBONE_NAMES and its `BackboneSpec` in swssl.model.backbones.BACKBONES.
Implementations are named ("module:attribute"), not imported, so that reading a table (e.g. for
`--help`) never loads torch or a runtime.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class ArtifactKind:
    name: str  # the manifest's "kind" and the stem of its export folder
    backend: str  # the runtime that runs it: a swssl-infer --backend choice
    flag: str  # the swssl-export option that makes it
    help: str  # that option's --help text
    file: str  # the artifact's file name in its folder
    suffixes: tuple[str, ...]  # file suffixes that swssl-infer --model recognises as this kind
    device_bound: bool  # compiled for one device type (its folder and rebuild command name it)
    backend_class: str  # "module:Class" of its backend (swssl.inference.backends)
    exporter: str  # "module:function" that makes and verifies it (swssl.export.pipeline)
    builds_from: str | None = None  # the kind it is made from: not attempted when that one failed verification

    def load(self, what: str) -> Any:
        """The backend class (what="backend_class") or the exporter (what="exporter"), imported now."""
        return load(getattr(self, what))


# In export order: a TensorRT engine is built from the ONNX file.
ARTIFACTS = (
    ArtifactKind("onnx", "onnxruntime", "--onnx", "ONNX graph, float32 (the default when no format is given).",
                 "model.onnx", (".onnx",), False, "swssl.inference.backends:OnnxRuntimeBackend",
                 "swssl.export.pipeline:export_onnx_artifact"),
    ArtifactKind("tensorrt", "tensorrt", "--trt", "TensorRT engine built from the ONNX file (needs TensorRT and a "
                 "CUDA GPU).", "model.engine", (".engine", ".plan"), True, "swssl.inference.backends:TensorRTBackend",
                 "swssl.export.pipeline:export_tensorrt_artifact", builds_from="onnx"),
    ArtifactKind("aoti", "aoti", "--aoti", "AOTInductor package (.pt2) for --device.", "model.pt2", (".pt2",), True,
                 "swssl.inference.backends:AotiBackend", "swssl.export.pipeline:export_aoti_artifact"),
)
BY_NAME = {kind.name: kind for kind in ARTIFACTS}
BY_BACKEND = {kind.backend: kind for kind in ARTIFACTS}
TORCH_BACKENDS = ("torch", "torch-compiled")  # the checkpoint itself, eager or through torch.compile
BACKENDS = (*TORCH_BACKENDS, *BY_BACKEND)  # every --backend choice but auto
CHECKPOINT_SUFFIXES = (".pt", ".pth")


def kind_of_file(suffix: str) -> str | None:
    """The backend that runs a file with this suffix ("torch" for a checkpoint); None: not a model file."""
    if suffix.lower() in CHECKPOINT_SUFFIXES:
        return "torch"
    return next((kind.backend for kind in ARTIFACTS if suffix.lower() in kind.suffixes), None)


@dataclass(frozen=True)
class ScorerOption:
    flag: str  # the command-line option (swssl-eval, swssl-infer)
    default: Any
    type: type
    help: str


@dataclass(frozen=True)
class ScorerKind:
    name: str
    implementation: str  # "module:Class" (swssl.scoring.scorers)
    options: tuple[str, ...]  # its keyword arguments that the command line sets (keys of SCORER_OPTIONS)
    help: str


SCORER_OPTIONS = {
    "radius": ScorerOption("--radius", 0, int, "also compare with bank windows within +-R grid positions."),
    "k": ScorerOption("--k", 1, int, "number of nearest bank windows averaged."),
    "coreset_ratio": ScorerOption("--coreset", None, float, "keep this share of bank windows (k-center greedy), "
                                                            "e.g. 0.1."),
    "top": ScorerOption("--top-k", 1, int, "image (slide) score = mean of the K highest window scores."),
    "index": ScorerOption("--index", None, str, "search the bank with a FAISS index (flat: exact, ivf: "
                                                "approximate; needs faiss-cpu; swssl-bank saves it beside the "
                                                "bank); default: brute force below 100k rows, ivf from there."),
}
SCORERS = (
    ScorerKind("aligned", "swssl.scoring.scorers:AlignedScorer", ("radius", "top"),
               "each window against the bank's windows at its grid position (the paper's; the run's geometry)"),
    ScorerKind("global", "swssl.scoring.scorers:GlobalScorer", ("k", "top", "coreset_ratio", "index"),
               "each window against its k nearest bank windows anywhere (any image size)"),
    ScorerKind("reference", "swssl.scoring.scorers:ReferenceScorer", (),
               "the official evaluate.py score (no window map; the run's geometry)"),
)
SCORER_NAMES = tuple(kind.name for kind in SCORERS)
# The keys of swssl.model.backbones.BACKBONES, in its order (a test checks that they agree).
BACKBONE_NAMES = ("wide_resnet50_2", "resnet50", "resnet18", "mobilenet_v2")


def load(implementation: str) -> Any:
    """The attribute a "module:attribute" name points at, imported now."""
    module, name = implementation.split(":")
    return getattr(importlib.import_module(module), name)
