"""A tiny run from generated images, without training: for the export tests and bench/gpu.sh.

The GPU check runs where only torch, onnxruntime, click, safetensors, tifffile and
scikit-learn exist, so this path writes NumPy images (no Pillow), a random-weight encoder and
its checkpoint (no training loop, no tqdm), and imports no optional image reader.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from swssl.model.checkpoint import CHECKPOINT, save_checkpoint
from swssl.config import load_preset
from swssl.model.encoder import build_encoder


def make_tiny_data(root: str | Path, images: int = 6, height: int = 128, width: int = 96, seed: int = 0) -> Path:
    """Normal training images (16-bit .npy: textured body on a dark background) and their manifest.csv."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[:height, :width]
    rows = ["path,label,split"]
    for i in range(images):
        body = ((y - height / 2) / (height / 2.1)) ** 2 + (x / (width * 0.95)) ** 2 < 1
        texture = 0.45 + 0.12 * np.sin(y / 7.0 + rng.random() * 6) * np.cos(x / 5.0) + 0.05 * rng.normal(size=y.shape)
        image = np.where(body, np.clip(texture, 0, 1), 0.0)
        np.save(root / f"train-{i}.npy", np.round(image * 65535).astype(np.uint16))
        rows.append(f"train-{i}.npy,0,train")
    (root / "manifest.csv").write_text("\n".join(rows) + "\n")
    return root


def make_tiny_run(root: str | Path, backbone: str = "resnet18", height: int = 128, width: int = 96, patch: int = 32,
                  step: int = 16, seed: int = 0) -> tuple[Path, Path]:
    """(run_dir, data_dir) under `root`: random weights saved as a checkpoint, made once and reused."""
    root = Path(root)
    run, data = root / "run", root / "data"
    if not (data / "manifest.csv").is_file():
        make_tiny_data(data, height=height, width=width, seed=seed)
    if not (run / CHECKPOINT).is_file():
        config = load_preset("small").override({
            "name": "tiny", "geometry": {"height": height, "width": width, "patch": patch, "step": step},
            "model": {"backbone": backbone, "weights": "none"}}).validate()
        torch.manual_seed(seed)
        encoder = build_encoder(config)
        run.mkdir(parents=True, exist_ok=True)
        save_checkpoint(run / CHECKPOINT, encoder, None, 0, config, [])
        (run / "config.json").write_text(json.dumps(config.to_dict(), indent=2))
    return run, data


def ensure_exports(run: Path, data: Path, batch: str | None = "1,4,16", onnx: bool = True, aoti: bool = True,
                   device: str = "cpu", mode: str = "exact") -> Path:
    """The run's ONNX and AOTInductor exports in `mode` (RUN_DIR/export), made once: an AOTI compile takes ~25 s.

    `batch` None: the mode's default profile."""
    from swssl.export.pipeline import ExportRequest, export_run
    from swssl.export.profile import BatchProfile

    out = Path(run) / "export"
    suffix = "-dense" if mode == "dense" else ""
    wanted = {"onnx": onnx, "aoti": aoti}
    for kind, needed in wanted.items():
        folder = f"onnx{suffix}" if kind == "onnx" else f"aoti-{device}-fp32{suffix}"
        if needed and not (out / folder / "manifest.json").is_file():
            request = ExportRequest(kinds=(kind,), mode=mode, device=device,
                                    batch=BatchProfile.parse(batch) if batch else None, data=Path(data))
            export_run(Path(run), request, echo=lambda text: None)
    return out
