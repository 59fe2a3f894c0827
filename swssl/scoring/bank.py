"""The memory bank: the embeddings of every window of the normal training images, saved once.

The official code recomputes this at every evaluation and keeps it in host memory as float32;
here it is built in batches on the device and saved as safetensors (fp16 by default) with the
metadata that says what it is valid for: the encoder's weight digest, the geometry, the
preprocessing and the grid, plus a sha256 of its tensors. The metadata also says what its scores
mean (swssl.scoring.calibration: the scores of held-out images, per scorer) and what its images
were like (swssl.scoring.domain), both covered by the sha256. Loading it against a different encoder
or input preparation fails with a message naming what differs; a bank whose bytes changed, or
that holds NaN/inf, is refused with the command that rebuilds it.
"""
from __future__ import annotations

import errno
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from swssl.files import atomic_write
from swssl.config import Config
from swssl.data import readers
from swssl.data.datasets import Sample, resize_frame
from swssl.scoring.calibration import Calibration, options_key
from swssl.scoring.domain import Domain, FrameStats
from swssl.windows.embed import Encode
from swssl.errors import SwsslError
from swssl.windows.tiling import ImageWindows

BANK = "bank.safetensors"  # exact mode; dense mode's bank lies beside it, so a run can hold both
DENSE_BANK = "bank-dense.safetensors"
FORMAT = "swssl-bank/2"  # /2: a sha256 of the tensors in the metadata


class BankMismatchError(SwsslError):
    """A bank built for another encoder, geometry or preprocessing than the one at hand."""


class BankDamagedError(SwsslError):
    """A bank file whose bytes changed since it was written (checksum), or that holds NaN/inf."""


def tensors_digest(tensors: dict[str, torch.Tensor], extras: str = "") -> str:
    """SHA-256 of the tensors' names, dtypes, shapes and bytes (and of `extras`, the calibration and domain
    metadata, when there are any): what the bank's metadata records and load checks."""
    digest = hashlib.sha256(extras.encode())
    for name in sorted(tensors):
        tensor = tensors[name].contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)};".encode())
        digest.update(memoryview(tensor.view(torch.uint8).numpy()) if tensor.numel() else b"")
    return digest.hexdigest()


@dataclass
class MemoryBank:
    embeddings: torch.Tensor  # N x R x C x D
    foreground: torch.Tensor  # N x R x C, bool
    config: Config
    encoder_digest: str
    paths: list[str]
    calibrations: dict[str, Calibration] = field(default_factory=dict)  # by calibration.options_key
    domain: Domain | None = None  # what the bank's images were like (None: a bank built before it was kept)
    # Where it was loaded from and its metadata's sha256 (None for a bank built in memory): what a saved
    # FAISS index beside it (swssl.scoring.bank_index) is checked against.
    path: Path | None = field(default=None, compare=False, repr=False)
    sha256: str | None = field(default=None, compare=False, repr=False)

    def calibration(self, scorer: str, options: dict[str, Any]) -> Calibration | None:
        """The calibration of `scorer` with `options`, if the bank holds one."""
        return self.calibrations.get(options_key(scorer, options))

    def _extras(self) -> dict[str, str]:
        extras = {}
        if self.calibrations:
            extras["calibrations"] = json.dumps({key: c.to_dict() for key, c in self.calibrations.items()})
        if self.domain is not None:
            extras["domain"] = json.dumps(self.domain.to_dict())
        return extras

    def save(self, path: str | Path) -> None:
        from safetensors.torch import save_file

        tensors = {"embeddings": self.embeddings.contiguous().cpu(), "foreground": self.foreground.contiguous().cpu()}
        extras = self._extras()
        metadata = {"format": FORMAT, "config": json.dumps(self.config.to_dict()),
                    "encoder_digest": self.encoder_digest, "paths": json.dumps(self.paths),
                    "grid": json.dumps(list(self.foreground.shape[1:])), "images": str(len(self.paths)),
                    "sha256": tensors_digest(tensors, _joined(extras)), **extras}

        def write(tmp: Path) -> None:
            try:
                save_file(tensors, str(tmp), metadata=metadata)
            except Exception as exc:  # safetensors reports a full disk as its own error type
                raise OSError(errno.EIO, f"safetensors: {exc}") from None

        atomic_write(Path(path), write)
        self.path, self.sha256 = Path(path), metadata["sha256"]

    @classmethod
    def load(cls, path: str | Path, config: Config | None = None, encoder_digest: str | None = None) -> "MemoryBank":
        """Load a bank (a file, or a run directory's bank for the config's mode); with `config` /
        `encoder_digest`, refuse one that does not fit them (another mode included)."""
        from safetensors import safe_open

        path = Path(path)
        mode = config.geometry.mode if config is not None else "exact"
        if path.is_dir():
            path = bank_file(path, mode)
        if not path.is_file():
            flag = " --mode dense" if mode == "dense" else ""
            raise SwsslError(f"{path}: no {mode}-mode memory bank here (build one with swssl-bank RUN_DIR "
                             f"--data DIR{flag})")
        rebuild = f"rebuild it with swssl-bank RUN_DIR --data DIR{' --mode dense' if mode == 'dense' else ''}"
        try:
            with safe_open(str(path), framework="pt") as handle:
                metadata = handle.metadata() or {}
                tensors = {name: handle.get_tensor(name) for name in handle.keys()}
            if metadata.get("format") != FORMAT:
                raise BankDamagedError(f"{path}: a memory bank of format {metadata.get('format')!r}, not {FORMAT} "
                                       f"(an older swssl's, without a checksum); {rebuild}")
            extras = {key: metadata[key] for key in ("calibrations", "domain") if key in metadata}
            if tensors_digest(tensors, _joined(extras)) != metadata.get("sha256"):
                raise BankDamagedError(f"{path}: memory bank is damaged (its tensors do not match the checksum "
                                       f"in its metadata); {rebuild}")
            bank = cls(tensors["embeddings"], tensors["foreground"].bool(),
                       Config.from_dict(json.loads(metadata["config"])), metadata["encoder_digest"],
                       json.loads(metadata["paths"]),
                       {key: Calibration.from_dict(c) for key, c in json.loads(extras.get("calibrations", "{}")).items()},
                       Domain.from_dict(json.loads(extras["domain"])) if "domain" in extras else None,
                       path, metadata["sha256"])
        except BankDamagedError:
            raise
        except Exception as exc:
            raise BankDamagedError(f"{path}: corrupt or not a swssl memory bank ({type(exc).__name__}: "
                                   f"{' '.join(str(exc).split())[:200]}); {rebuild}") from None
        if not torch.isfinite(bank.embeddings).all():
            bad = int((~torch.isfinite(bank.embeddings)).sum())
            raise BankDamagedError(f"{path}: memory bank holds {bad} NaN/inf value(s); {rebuild}")
        if config is not None:
            check_compatible(bank, config, encoder_digest, path)
        return bank


def _joined(extras: dict[str, str]) -> str:
    return "".join(f"{key}={extras[key]};" for key in sorted(extras))


def bank_file(run_dir: str | Path, mode: str = "exact") -> Path:
    """Where a run keeps its bank for the given geometry mode."""
    return Path(run_dir) / (DENSE_BANK if mode == "dense" else BANK)


def check_compatible(bank: MemoryBank, config: Config, encoder_digest: str | None, path: Path) -> None:
    """Raise BankMismatchError naming each setting in which the bank and the run differ."""
    ours, theirs = bank.config.to_dict(), config.to_dict()
    differences = [f"{section}.{key}: bank {ours[section][key]!r}, run {theirs[section][key]!r}"
                   for section in ("geometry", "preprocess", "model") for key in ours[section]
                   if ours[section][key] != theirs[section][key] and (section, key) != ("model", "weights")]
    if encoder_digest is not None and encoder_digest != bank.encoder_digest:
        differences.append("encoder weights differ from the ones the bank was built with")
    if differences:
        raise BankMismatchError(f"{path}: memory bank does not fit this model ({'; '.join(differences)}); "
                                "rebuild it with swssl-bank RUN_DIR --data DIR")


def build_bank(encode: Encode, samples: list[Sample], config: Config, encoder_digest: str,
               batch_size: int = 256, device: str | torch.device = "cpu",
               dtype: torch.dtype = torch.float16) -> MemoryBank:
    """Embed every window of every sample (a progress bar over images) into a bank, with the samples' domain."""
    embeddings, foreground, stats = [], [], []
    g = config.geometry
    for sample in tqdm(samples, desc="memory bank", unit="img"):
        with readers.open_image(sample.path, config.preprocess.intensity) as reader:  # = datasets.load_resized
            image = resize_frame(reader, sample.frame, g.height, g.width)
            stats.append(FrameStats.of(reader.shape, reader.bit_depth, image))
        emb, fg = ImageWindows(image, config, batch_size, device).embed(encode)
        embeddings.append(emb.to("cpu", dtype))
        foreground.append(fg.cpu())
    return MemoryBank(torch.stack(embeddings), torch.stack(foreground), config, encoder_digest,
                      [str(s.path) for s in samples], domain=Domain.of(stats) if stats else None)
