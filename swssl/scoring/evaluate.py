"""Evaluation: embed each image of a split once, score it with every requested scorer, report.

Used by `swssl-eval`, by training's periodic validation (which selects the checkpoint on the val
split; the test split is never used for selection) and by bank building, which scores held-out
images to calibrate the bank's scores (swssl.scoring.calibration).
"""
from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from swssl.scoring.bank import MemoryBank, build_bank
from swssl.model.checkpoint import weights_digest
from swssl.config import Config
from swssl.data.datasets import Sample, load_mask, load_resized
from swssl.registry import SCORER_NAMES, SCORER_OPTIONS
from swssl.names import safe_name
from swssl.scoring.calibration import (DEFAULT_THRESHOLD, Calibration, Decision, Threshold, calibrate, is_raw_score, options_key,
                                       resolve_threshold)
from swssl.windows.geometry import grid
from swssl.scoring.metrics import auroc_interval, image_auroc
from swssl.model.encoder import PatchEncoder
from swssl.scoring.report import by_contrast, ImageResult, format_table, summarise, write_report
from swssl.scoring.scorers import Scorer, build_scorer, scorer_options
from swssl.windows.embed import Encode
from swssl.windows.tiling import ImageWindows, score_source


def score_samples(encoder: Encode, bank: MemoryBank, samples: list[Sample], config: Config,
                  scorers: dict[str, dict], device: str | torch.device = "cpu", batch_size: int = 256,
                  progress: bool = True, desc: str = "scoring", built: dict[str, Scorer] | None = None
                  ) -> dict[str, list[ImageResult]]:
    """Per scorer name, one ImageResult per sample (with its mask; images are not kept). `built`: the scorers of
    `scorers` already built over `bank` (else they are built here)."""
    built = built or {name: build_scorer(name, bank, device, **options) for name, options in scorers.items()}
    results: dict[str, list[ImageResult]] = {name: [] for name in scorers}
    for sample in tqdm(samples, desc=desc, unit="img", disable=not progress):
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


HOLDOUT_EVERY = 10  # without val normals, every 10th training normal is held out of the bank to calibrate it


def calibration_split(samples: list[Sample]) -> tuple[list[Sample], list[Sample], list[Sample], str]:
    """(bank images, held-out normal images, val abnormal images, where the normals come from).

    The held-out normals are the val split's normal images; when there are none, every
    HOLDOUT_EVERY-th training normal image (at least one, when there are two or more) is kept out
    of the bank instead, since an image in the bank scores close to 0 against itself."""
    train = [s for s in samples if s.split == "train" and s.label == 0]
    normal = [s for s in samples if s.split == "val" and s.label == 0]
    abnormal = [s for s in samples if s.split == "val" and s.label == 1]
    if normal:
        return train, normal, abnormal, f"val split: {len(normal)} normal images"
    held = (train[HOLDOUT_EVERY - 1::HOLDOUT_EVERY] or train[-1:]) if len(train) > 1 else []
    kept = [s for s in train if s not in held]
    return kept, held, abnormal, (f"{len(held)} of {len(train)} training normal images (every {HOLDOUT_EVERY}th, "
                                  "held out of the bank; the data has no val normals)")


def default_scorer_options() -> dict[str, dict]:
    """Every scorer with its command-line defaults: what a bank is calibrated for unless told otherwise."""
    return scorer_options(list(SCORER_NAMES), **{key: option.default for key, option in SCORER_OPTIONS.items()})


def build_calibrated_bank(encoder: Encode, samples: list[Sample], config: Config, encoder_digest: str,
                          batch_size: int = 256, device: str | torch.device = "cpu",
                          dtype: torch.dtype = torch.float16, scorers: dict[str, dict] | None = None
                          ) -> tuple[MemoryBank, dict[str, Scorer]]:
    """The bank of a dataset's training normals, calibrated (per scorer and options, default: every scorer
    at its defaults) on held-out images (`calibration_split`); without a held-out image it has no calibration.
    Also the scorers it was calibrated with, by name (none without a held-out image): swssl-bank saves the
    global scorer's index from them instead of building it again."""
    bank_samples, normal, abnormal, source = calibration_split(samples)
    bank = build_bank(encoder, bank_samples, config, encoder_digest, batch_size, device, dtype)
    if not normal:
        tqdm.write("no held-out normal image to calibrate the bank with: scores will have no percentile")
        return bank, {}
    scorers = scorers if scorers is not None else default_scorer_options()
    built = {name: build_scorer(name, bank, device, **options) for name, options in scorers.items()}
    results = score_samples(encoder, bank, normal + abnormal, config, scorers, device, batch_size,
                            desc="calibrating", built=built)
    for name, scored in results.items():
        normals, abnormals = scored[:len(normal)], scored[len(normal):]
        maps = [r.window_scores for r in normals] if all(r.window_scores is not None for r in normals) else None
        bank.calibrations[options_key(name, scorers[name])] = calibrate(
            name, scorers[name], [r.score for r in normals], [r.score for r in abnormals], maps,
            f"{source}{f', {len(abnormal)} abnormal' if abnormal else ''}", [str(s.path) for s in normal])
    return bank, built


def evaluate(encoder: Encode, bank: MemoryBank, samples: list[Sample], config: Config,
             scorers: dict[str, dict], out_dir: Path, split: str, device: str | torch.device = "cpu",
             batch_size: int = 256, overlays: int | None = 8, contrasts: dict[Path, float] | None = None,
             threshold: str | None = None, images: int | None = None) -> dict[str, dict]:
    """Score `samples`, write one report folder per scorer (out_dir/`report_name`), return the summaries.

    `contrasts` (datasets.lesion_contrasts): the summaries add the image AUROC per lesion-contrast band.
    `overlays`: heat-map overlays of the N highest-scored images (None: every image, missed lesions included).
    `threshold` (a --threshold rule; None: the default): each image gets its percentile among the bank's
    held-out normals and a flag, and the summaries the sensitivity and specificity at that threshold, for
    every scorer the bank is calibrated for (a raw-score rule applies to every scorer).
    `images`: the --images N subset the samples are (named in the folders). `encoder`: a PatchEncoder or any
    backend (swssl.inference.backends) of the weights the bank was built with (its digest goes in the report)."""
    started = time.perf_counter()
    results = score_samples(encoder, bank, samples, config, scorers, device, batch_size)
    seconds = time.perf_counter() - started
    rows, cols = grid(config.geometry)
    summaries = {}
    for name, scored in results.items():
        summary = summarise(scored, rows, cols, config.geometry.patch, split, name)
        calibration = bank.calibration(name, scorers[name])
        decided, figures = _decide(scored, calibration, threshold)
        summary.update(figures)
        if contrasts:
            summary["by_contrast"] = by_contrast(scored, contrasts)
        extra = {"scorer_options": scorers[name], "seconds_all_scorers": seconds, "batch_size": batch_size,
                 "backend": getattr(encoder, "name", type(encoder).__name__),
                 "encoder_digest": bank.encoder_digest, "config": config.to_dict()}
        write_report(out_dir / report_name(split, name, scorers[name], images, threshold), scored, summary, rows, cols,
                     config.geometry.patch, overlays, extra,
                     mode=config.geometry.mode, calibration=calibration, threshold=decided,
                     load_image=_image_loader(samples, config))
        summaries[name] = summary
    return summaries


def report_name(split: str, scorer: str, options: dict[str, Any], images: int | None = None,
                threshold: str | None = None) -> str:
    """A report folder's name: <split>-<scorer>, then each scorer option that differs from its default
    (registry.SCORER_OPTIONS) as <flag><value>, a --threshold rule other than the default, then -n<N> for an
    --images N subset, so that no evaluation replaces another's report (e.g. test-aligned,
    test-aligned-radius1, test-aligned-threshold-f1, test-global-k3-coreset0.1-n25).
    swssl-compare lines reports up by this name less the -n<N> part."""
    parts = [split, scorer]
    for key, value in options.items():
        if value is not None and value != SCORER_OPTIONS[key].default:
            text = value if isinstance(value, str) else f"{value:g}"  # e.g. --index ivf: indexivf
            parts.append(f"{SCORER_OPTIONS[key].flag.lstrip('-')}{text}")
    if threshold not in (None, DEFAULT_THRESHOLD):
        parts.append(f"threshold-{safe_name(threshold)}")
    return "-".join(parts) + (f"-n{images}" if images else "")


def _decide(results: list[ImageResult], calibration: Calibration | None, rule: str | None
            ) -> tuple[Threshold | None, dict[str, Any]]:
    """The threshold, the percentile and flag of each result (set in place), and the decision's figures for the
    summary."""
    if calibration is None and not (rule is not None and is_raw_score(rule)):
        return None, {"threshold": None, "threshold_rule": None,
                      "calibration": "none for this scorer and options (swssl-bank with the same options adds one)"}
    decided = resolve_threshold(rule, calibration)
    decision = Decision(calibration, decided)
    for result in results:
        judged = decision.judge(result.score)
        result.percentile, result.anomalous = judged["percentile"], judged["anomalous"]
    flagged = [r.label for r in results if r.anomalous]
    normal, abnormal = sum(r.label == 0 for r in results), sum(r.label == 1 for r in results)
    return decided, {"threshold": decided.value, "threshold_rule": f"{decided.rule}: {decided.description}",
                     "calibration": None if calibration is None else calibration.source, "flagged": len(flagged),
                     "sensitivity_at_threshold": sum(flagged) / abnormal if abnormal else None,
                     "specificity_at_threshold": 1 - flagged.count(0) / normal if normal else None}


def _image_loader(samples: list[Sample], config: Config) -> Callable[[int], np.ndarray]:
    """The image of the i-th sample, reloaded when its overlay is drawn, so memory does not grow with the split."""
    return lambda i: load_resized(samples[i], config.geometry, config.preprocess.intensity)


def format_summaries(summaries: dict[str, dict]) -> str:
    return "\n\n".join(format_table(summary) for summary in summaries.values())
