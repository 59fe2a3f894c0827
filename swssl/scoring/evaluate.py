"""Evaluation: embed each image of a split once, score it with every requested scorer, report.

Used by `swssl-eval` and by training's periodic validation (which selects the checkpoint on
the val split; the test split is never used for selection).
"""
from __future__ import annotations

import time
from pathlib import Path

import torch
from tqdm import tqdm

from swssl.scoring.bank import MemoryBank, build_bank
from swssl.model.checkpoint import weights_digest
from swssl.config import Config
from swssl.data.datasets import Sample, load_mask, load_resized
from swssl.windows.geometry import grid
from swssl.scoring.metrics import auroc_interval, image_auroc
from swssl.model.encoder import PatchEncoder
from swssl.scoring.report import by_contrast, ImageResult, format_table, summarise, write_report
from swssl.scoring.scorers import build_scorer
from swssl.windows.tiling import ImageWindows, score_source


def score_samples(encoder: PatchEncoder, bank: MemoryBank, samples: list[Sample], config: Config,
                  scorers: dict[str, dict], device: str | torch.device = "cpu", batch_size: int = 256,
                  progress: bool = True) -> dict[str, list[ImageResult]]:
    """Per scorer name, one ImageResult per sample (with its mask; images are not kept)."""
    built = {name: build_scorer(name, bank, device, **options) for name, options in scorers.items()}
    results: dict[str, list[ImageResult]] = {name: [] for name in scorers}
    for sample in tqdm(samples, desc="scoring", unit="img", disable=not progress):
        image = load_resized(sample, config.geometry, config.preprocess.intensity)
        scored = score_source(ImageWindows(image, config, batch_size, device), encoder, built)
        mask = load_mask(sample, config.geometry) if sample.mask is not None else None
        for name, result in scored.items():
            results[name].append(ImageResult(str(sample.path), sample.label, result.score, result.window_scores,
                                             None, mask))
    return results


def validation_auroc(encoder: PatchEncoder, train_samples: list[Sample], val_samples: list[Sample],
                     config: Config, scorer: str, device: str | torch.device, batch_size: int = 256
                     ) -> tuple[float | None, tuple[float, float] | None]:
    """Image AUROC on the val split with a bank of `train_samples` (model selection during training), and its
    95 % bootstrap interval."""
    encoder.eval()
    bank = build_bank(encoder, train_samples, config, weights_digest(encoder), batch_size, device, torch.float32)
    results = score_samples(encoder, bank, val_samples, config, {scorer: {}}, device, batch_size, progress=False)
    labels, scores = [r.label for r in results[scorer]], [r.score for r in results[scorer]]
    return image_auroc(labels, scores), auroc_interval(labels, scores)


def evaluate(encoder: PatchEncoder, bank: MemoryBank, samples: list[Sample], config: Config,
             scorers: dict[str, dict], out_dir: Path, split: str, device: str | torch.device = "cpu",
             batch_size: int = 256, overlays: int = 8, contrasts: dict[Path, float] | None = None
             ) -> dict[str, dict]:
    """Score `samples`, write one report folder per scorer (out_dir/<split>-<scorer>/), return the summaries.

    `contrasts` (datasets.lesion_contrasts): the summaries add the image AUROC per lesion-contrast band."""
    started = time.perf_counter()
    results = score_samples(encoder, bank, samples, config, scorers, device, batch_size)
    seconds = time.perf_counter() - started
    rows, cols = grid(config.geometry)
    summaries, digest = {}, weights_digest(encoder)
    for name, scored in results.items():
        summary = summarise(scored, rows, cols, config.geometry.patch, split, name)
        if contrasts:
            summary["by_contrast"] = by_contrast(scored, contrasts)
        _attach_images(scored, samples, config, overlays)
        extra = {"scorer_options": scorers[name], "seconds_all_scorers": seconds,
                 "encoder_digest": digest, "config": config.to_dict()}
        write_report(out_dir / f"{split}-{name}", scored, summary, rows, cols, config.geometry.patch, overlays, extra)
        summaries[name] = summary
    return summaries


def _attach_images(results: list[ImageResult], samples: list[Sample], config: Config, overlays: int) -> None:
    """Reload only the images the overlays show, so memory does not grow with the split."""
    ranked = sorted(zip(results, samples), key=lambda pair: pair[0].score, reverse=True)
    for result, sample in ranked[:overlays]:
        result.image = load_resized(sample, config.geometry, config.preprocess.intensity)


def format_summaries(summaries: dict[str, dict]) -> str:
    return "\n\n".join(format_table(summary) for summary in summaries.values())
