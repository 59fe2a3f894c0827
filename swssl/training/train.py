"""SWSSL training, top to bottom: data, encoder, SGD with value clipping, checkpoints, resume.

Plain PyTorch. One step draws B window triplets (two views and a neighbour), runs the three
batches through the encoder separately (as the official code does, so BatchNorm sees each view's
own statistics), and applies the SWSSL loss to the projector outputs.

Under torchrun the same loop runs on every process (swssl.training.distributed: DDP, the loss over
the global batch); rank 0 alone writes and validates, the others wait for it.
"""
from __future__ import annotations

import csv
import json
import shutil
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, DistributedSampler
from tqdm import tqdm

from swssl.scoring.bank import MemoryBank, bank_file
from swssl.model.checkpoint import BEST, CHECKPOINT, load_checkpoint, load_encoder, save_checkpoint, weights_digest
from swssl.config import Config
from swssl.errors import ConfigError, DatasetError, SwsslError
from swssl.files import LOCK, FolderLock, atomic_write
from swssl.data.datasets import Sample, discover, load_resized, select
from swssl.scoring.metrics import format_interval
from swssl.scoring.evaluate import build_calibrated_bank, validation_auroc
from swssl.training.distributed import Ranks, gather, join, leave, per_rank_batch, wrap
from swssl.training.loss import LossTerms, swssl_loss
from swssl.model.encoder import build_encoder
from swssl.training.triplets import WindowTriplets

CACHE_LIMIT_BYTES = 2 << 30  # training images are held in memory (16-bit) when they fit in this
LOG = "train_log.csv"
LOG_PLOT = "train_log.png"  # the loss terms and the val AUROC against the epoch, rewritten at every validation
RUN_MARKERS = {CHECKPOINT, BEST, "config.json", LOG}  # files that say a folder holds a run
LOG_FIELDS = ("epoch", "loss", "twin", "pair", "neighbour", "seconds", "val_auroc")


class CachedImage:
    """A resized training image kept in memory as 16-bit integers (exact for 16-bit sources)."""

    def __init__(self, image: np.ndarray):
        self.pixels = np.round(image * 65535).astype(np.uint16)

    def __call__(self) -> np.ndarray:
        return self.pixels.astype(np.float32) / 65535


class LazyImage:
    """A training image read and resized each time it is drawn (datasets too large to hold)."""

    def __init__(self, sample: Sample, config: Config):
        self.sample, self.config = sample, config

    def __call__(self) -> np.ndarray:
        try:
            return load_resized(self.sample, self.config.geometry, self.config.preprocess.intensity, self.sample.frame)
        except SwsslError as exc:  # read in a DataLoader worker, which re-raises an error by its message alone
            raise DatasetError(f"{exc}") from None


def training_images(samples: list[Sample], config: Config, progress: bool = True) -> list:
    g = config.geometry
    if len(samples) * g.height * g.width * 2 > CACHE_LIMIT_BYTES:
        return [LazyImage(s, config) for s in samples]
    return [CachedImage(LazyImage(s, config)())
            for s in tqdm(samples, desc="loading images", unit="img", disable=not progress)]


class Views(torch.nn.Module):
    """The encoder and projector over the three views of a step, each view its own batch (so BatchNorm
    sees each view's statistics): one forward per step, as DDP wants."""

    def __init__(self, encoder: torch.nn.Module):
        super().__init__()
        self.encoder = encoder

    def forward(self, *views: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(self.encoder.project(self.encoder(x)) for x in views)


def train(config: Config, data: str | Path, out: str | Path, device: str = "auto", resume: bool = False,
          epochs: int | None = None, build_final_bank: bool = True, overwrite: bool = False) -> Path:
    """Train an encoder on the normal images of the train split; returns the selected checkpoint.

    Every `val_every` epochs the run is checkpointed (out/checkpoint.pt, for --resume) and, when
    the data has a val split with both classes, scored on it: the best image AUROC is kept as
    out/best.pt. At the end the memory bank of the selected encoder is built (out/bank.safetensors; bank-dense.safetensors in dense mode).
    With `resume`, continues from out/checkpoint.pt with the configuration saved in it
    (`epochs` may extend the budget); a finished run resumed is left as it is. A folder that already
    holds a run is refused unless `resume` or `overwrite`; one process at a time holds the folder.
    Under torchrun every rank trains (swssl.training.distributed); rank 0 holds the folder.
    """
    out = Path(out)
    ranks, dev = join(device)
    try:
        if not ranks.main:
            ranks.on_main(lambda: None)  # rank 0 prepares the folder
            return _train(config, data, out, dev, resume, epochs, build_final_bank, ranks)
        with FolderLock(out, "swssl-train"):
            ranks.on_main(lambda: _prepare_run_folder(out, resume, overwrite))
            return _train(config, data, out, dev, resume, epochs, build_final_bank, ranks)
    finally:
        leave()


def _prepare_run_folder(out: Path, resume: bool, overwrite: bool) -> None:
    """A new run needs an empty folder: continuing one is --resume, replacing it is --overwrite (which
    clears it, but only when it looks like a run folder: a mistyped --out never deletes other files)."""
    existing = sorted(p.name for p in out.iterdir() if p.name != LOCK)
    if resume or not existing:
        return
    if not overwrite:
        raise ConfigError(f"{out}: the run folder is not empty ({', '.join(existing[:4])}"
                          f"{' ...' if len(existing) > 4 else ''}); use --resume to continue that run, "
                          "--overwrite to replace it, or another --out")
    if not RUN_MARKERS & set(existing):
        raise ConfigError(f"{out}: --overwrite refused: the folder does not look like a run folder "
                          f"(no {' or '.join(sorted(RUN_MARKERS))}); clear it yourself or use another --out")
    for name in existing:
        target = out / name
        shutil.rmtree(target) if target.is_dir() and not target.is_symlink() else target.unlink()


def _train(config: Config, data: str | Path, out: Path, dev: torch.device, resume: bool, epochs: int | None,
           build_final_bank: bool, ranks: Ranks = Ranks()) -> Path:
    start_epoch, history, state = 0, [], None
    if resume:
        state = load_checkpoint(out / CHECKPOINT)
        config, start_epoch, history = state["config"], state["epoch"], state["history"]
    if epochs is not None:
        config = config.override({"train": {"epochs": epochs}})
    tc = config.train
    if resume and start_epoch >= tc.epochs:
        if build_final_bank and _complete(out, start_epoch, say=ranks.main):
            return _selected(out)
        if ranks.main:
                tqdm.write(f"{out}: training already complete ({start_epoch} of {tc.epochs} epochs); nothing to train "
                       "(--epochs N extends it)")

    everything = discover(data)
    samples = select(everything, "train", label=0)
    validation = _validation_split(everything)
    dataset = WindowTriplets(training_images(samples, config, ranks.main), [str(s.path) for s in samples], config)

    torch.manual_seed(tc.seed)
    encoder = build_encoder(config, weights="none" if resume else None).to(dev)
    optimizer = torch.optim.SGD(encoder.parameters(), lr=tc.lr, momentum=tc.momentum, weight_decay=tc.weight_decay)
    if state is not None:
        encoder.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
    if dev.type == "cuda":
        encoder = encoder.to(memory_format=torch.channels_last)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if dev.type == "cuda" else nullcontext()
    forward = wrap(Views(encoder), ranks, dev, tc.sync_bn)

    text = json.dumps(config.to_dict(), indent=2)
    if ranks.main:
        atomic_write(out / "config.json", lambda tmp: tmp.write_text(text))
    generator = torch.Generator()  # re-seeded every epoch; workers start anew each epoch from it
    # Under torchrun each rank takes its share of the images' windows and of the global batch.
    sampler = DistributedSampler(dataset, ranks.world, ranks.rank, seed=tc.seed) if ranks.world > 1 else None
    loader = DataLoader(dataset, batch_size=min(per_rank_batch(tc.batch_size, ranks), len(sampler or dataset)),
                        shuffle=sampler is None, sampler=sampler, generator=generator, num_workers=tc.workers,
                        drop_last=False, pin_memory=dev.type == "cuda")
    if tc.epochs == 0 and not (out / CHECKPOINT).exists() and ranks.main:
        tqdm.write("--epochs 0: no training; the run's encoder is its initialisation")
        save_checkpoint(out / CHECKPOINT, encoder, optimizer, 0, config, history)
    total_steps = (tc.epochs - start_epoch) * len(loader)
    bar = tqdm(total=total_steps, desc="training", unit="step", disable=not ranks.main)
    try:
        for epoch in range(start_epoch, tc.epochs):
            # Seeded by epoch (and rank): resumed runs draw what a straight run draws; one process as before.
            seed = (tc.seed * 1_000_003 + epoch) * ranks.world + ranks.rank
            generator.manual_seed(seed)
            torch.manual_seed(seed)
            if sampler is not None:
                sampler.set_epoch(epoch)
            started, sums, steps = time.perf_counter(), np.zeros(4), 0
            encoder.train()
            for batch in loader:
                bar.update()
                if len(batch[-1]) < 2:  # the loss standardises over the batch (equal on every rank)
                    continue
                loss = train_step(forward, optimizer, batch, tc, dev, autocast, ranks)
                sums += [t.item() for t in (loss.total, loss.twin, loss.pair, loss.neighbour)]
                steps += 1
                bar.set_postfix(epoch=epoch + 1, loss=f"{loss.total.item():.3f}")
            row = dict(zip(("loss", "twin", "pair", "neighbour"), (sums / max(steps, 1)).tolist()))
            history.append({"epoch": epoch + 1, **row, "seconds": time.perf_counter() - started})
            if (epoch + 1) % tc.val_every == 0 or epoch + 1 == tc.epochs:
                ranks.on_main(lambda: _checkpoint(encoder, optimizer, samples, validation, config, dev, history, out))
            if ranks.main:
                _append_log(out / LOG, history[-1])
    except KeyboardInterrupt:
        bar.close()
        if ranks.main:
            save_checkpoint(out / CHECKPOINT, encoder, optimizer, len(history), config, history)
        raise
    bar.close()
    selected = _selected(out)
    if build_final_bank and ranks.main:
        _build_run_bank(selected, everything, dev, out)
    return selected


def _checkpoint(encoder, optimizer, samples, validation, config: Config, device, history, out: Path) -> None:
    """Validation (when there is a val split), the checkpoint and the training plot, at a val_every epoch."""
    if validation:
        history[-1]["val_auroc"] = _validate(encoder, samples, validation, config, device, history, out)
    save_checkpoint(out / CHECKPOINT, encoder, optimizer, history[-1]["epoch"], config, history)
    _plot_log(out / LOG_PLOT, history)


def _validation_split(samples: list[Sample]) -> list[Sample]:
    """The val split when it holds both classes (else no selection: the last checkpoint is used)."""
    val = [s for s in samples if s.split == "val"]
    if {s.label for s in val} != {0, 1}:
        tqdm.write("no val split with normal and abnormal images: the last checkpoint will be used")
        return []
    return val


def _validate(encoder, train_samples, val_samples, config: Config, device, history, out: Path) -> float | None:
    """Val AUROC now; saves out/best.pt when it beats every earlier validation."""
    bank_images = config.train.val_bank_images or len(train_samples)
    auroc, interval = validation_auroc(encoder, train_samples[:: max(1, len(train_samples) // bank_images)][:bank_images],
                             val_samples, config, config.train.val_scorer, device)
    earlier = [row["val_auroc"] for row in history[:-1] if row.get("val_auroc") is not None]
    if auroc is not None and (not earlier or auroc > max(earlier)):
        save_checkpoint(out / BEST, encoder, None, history[-1]["epoch"], config, history)
    tqdm.write(f"epoch {history[-1]['epoch']}: val AUROC ({config.train.val_scorer}, {len(val_samples)} images) = "
               f"{'n/a' if auroc is None else f'{auroc:.4f}'}{format_interval(interval)}")
    return auroc


def _build_run_bank(checkpoint: Path, samples: list[Sample], device, out: Path) -> None:
    """The selected encoder's bank, calibrated on held-out images of `samples` (the whole dataset); one that
    already fits it (a finished run resumed) is kept."""
    encoder, config = load_encoder(checkpoint)
    digest, path = weights_digest(encoder), bank_file(out, config.geometry.mode)
    if _bank_fits(path, config, digest):
        tqdm.write(f"{path}: memory bank up to date")
        return
    bank, _ = build_calibrated_bank(encoder.to(device), samples, config, digest, device=device)
    bank.save(path)


def _selected(out: Path) -> Path:
    """The run's selected checkpoint: the best validated one, else the latest."""
    return out / BEST if (out / BEST).exists() else out / CHECKPOINT


def _complete(out: Path, epochs: int, say: bool = True) -> bool:
    """Whether a finished run's memory bank fits its selected checkpoint; then says there is nothing to do (a
    resumed `make demo` returns at once instead of loading the images and rebuilding the bank)."""
    encoder, config = load_encoder(_selected(out))
    bank = bank_file(out, config.geometry.mode)
    if not _bank_fits(bank, config, weights_digest(encoder)):
        return False
    if say:
        tqdm.write(f"nothing to do: {out} is complete ({epochs} epochs); its memory bank {bank.name} fits the selected "
                   f"{_selected(out).name} (--epochs N extends the training, --overwrite replaces it)")
    return True


def _bank_fits(path: Path, config: Config, digest: str) -> bool:
    """Whether the bank at `path` exists, is intact, fits this encoder and configuration and records its domain
    and calibration (a bank built before they existed has no domain), else it is rebuilt."""
    if not path.is_file():
        return False
    try:
        return MemoryBank.load(path, config=config, encoder_digest=digest).domain is not None
    except SwsslError:
        return False


def _plot_log(path: Path, history: list[dict]) -> None:
    """The training curves as a picture, so a run can be judged without a notebook: the loss and its terms
    (top) and the val AUROC (bottom, when validated) against the epoch."""
    from swssl.scoring.report import _pyplot, _save_figure

    plt = _pyplot()
    figure, (losses, auroc) = plt.subplots(2, 1, figsize=(6, 6), dpi=100, sharex=True)
    epochs = [row["epoch"] for row in history]
    for key in ("loss", "twin", "pair", "neighbour"):
        losses.plot(epochs, [row[key] for row in history], marker=".", label=key, lw=2 if key == "loss" else 1)
    losses.set(ylabel="loss (epoch mean)", title=f"Training ({len(history)} epochs)")
    losses.legend(loc="upper right")
    validated = [(row["epoch"], row["val_auroc"]) for row in history if row.get("val_auroc") is not None]
    if validated:
        auroc.plot(*zip(*validated), marker="o", color="tab:green")
    auroc.set(xlabel="epoch", ylabel="val image AUROC", ylim=(0, 1.02))
    figure.tight_layout()
    _save_figure(figure, path)


def train_step(forward: torch.nn.Module, optimizer: torch.optim.Optimizer, batch, tc, device: torch.device,
               autocast=nullcontext(), ranks: Ranks = Ranks()) -> LossTerms:
    """One SGD step on a batch (view1, view2, neighbour, target) through `forward` (Views, DDP-wrapped under
    torchrun); the loss is that of the global batch (the projections of every rank gathered)."""
    *views, target = batch
    with autocast:
        projections = forward(*(x.to(device, non_blocking=True) for x in views))
    z1, z2, zn = (gather(z, ranks) for z in projections)
    loss = swssl_loss(z1, z2, zn, gather(target.to(device), ranks), tc.offdiag_weight, tc.similarity)
    optimizer.zero_grad(set_to_none=True)
    loss.total.backward()
    torch.nn.utils.clip_grad_value_(forward.parameters(), tc.grad_clip)
    optimizer.step()
    return loss


def _append_log(path: Path, row: dict[str, float]) -> None:
    new = not path.exists() or row["epoch"] == 1
    with path.open("w" if new else "a", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=LOG_FIELDS, restval="")
        if new:
            writer.writeheader()
        writer.writerow(row)
