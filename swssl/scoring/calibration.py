"""What a raw score means: its place among held-out normal images, and the threshold that flags it.

Raw scores are distances in feature space (a mammogram 5.8-10.4, a CT slice 26.6): meaningless on
their own and different for every encoder and scorer. When a bank is built, images that are not
in it are scored with every scorer: the val split's normal images (or, when the data has none,
a documented hold-out of the training normals), plus the val split's abnormal images when it has
them. Their image scores, and the quantiles of their window scores, are kept in the bank's
metadata (`Calibration`, one per scorer and options), so that every later score gets a
percentile among normals and a decision at a threshold (`Threshold`), and every heatmap the same
colour scale with the threshold as its reference point.

Threshold rules (`--threshold`):
- `normal-percentile:P` (default P = 99): the P-th percentile of the held-out normal image scores
  (numpy's linear interpolation): about 1 - P/100 of normal images are flagged.
- `f1`: the val score that maximises F1 (flagged = score >= threshold), ties to the higher threshold.
- `sensitivity:S`: the highest threshold that flags at least S (0..1) of the val abnormal images.
- a number: that raw score.
A score is flagged anomalous when it is >= the threshold.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from swssl.errors import ConfigError
from swssl.scoring.domain import Domain, FrameStats

DEFAULT_THRESHOLD = "normal-percentile:99"
QUANTILES = 101  # window-score quantiles kept: the 0th..100th percentiles


SEARCH_OPTIONS = ("index",)  # how the nearest bank windows are found, not what the score is: no key of their own


def options_key(scorer: str, options: dict[str, Any]) -> str:
    """The key of a (scorer, options) pair in a bank's calibrations: the options without those left at None and
    without SEARCH_OPTIONS (a FAISS index finds the same neighbours exactly, flat, or nearly, ivf, so the
    brute-force calibration holds for it)."""
    kept = {key: value for key, value in sorted(options.items()) if value is not None and key not in SEARCH_OPTIONS}
    return f"{scorer} {json.dumps(kept, sort_keys=True)}"


@dataclass(frozen=True)
class Calibration:
    """The scores of held-out images under one scorer with one set of options."""

    scorer: str
    options: dict[str, Any]
    normal: np.ndarray  # image scores of the held-out normal images, sorted ascending
    abnormal: np.ndarray  # image scores of the val split's abnormal images (may be empty), sorted
    window_quantiles: np.ndarray | None  # QUANTILES values of the normals' window scores; None: no map
    source: str  # where the normals came from, e.g. "val split: 20 normal images"
    paths: tuple[str, ...] = field(default=())  # the held-out normal images

    def __post_init__(self) -> None:
        if len(self.normal) == 0:
            raise ConfigError("a calibration needs at least one held-out normal image")

    def percentile(self, score: float) -> float:
        """Percent of held-out normal images whose score is <= `score` (0..100)."""
        return float(100.0 * np.searchsorted(self.normal, score, side="right") / len(self.normal))

    def to_dict(self) -> dict[str, Any]:
        return {"scorer": self.scorer, "options": self.options, "normal": self.normal.tolist(),
                "abnormal": self.abnormal.tolist(), "source": self.source, "paths": list(self.paths),
                "window_quantiles": None if self.window_quantiles is None else self.window_quantiles.tolist()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Calibration":
        quantiles = data.get("window_quantiles")
        return cls(data["scorer"], dict(data["options"]), np.sort(np.asarray(data["normal"], dtype=np.float64)),
                   np.sort(np.asarray(data["abnormal"], dtype=np.float64)),
                   None if quantiles is None else np.asarray(quantiles, dtype=np.float64), data["source"],
                   tuple(data.get("paths", ())))


def calibrate(scorer: str, options: dict[str, Any], normal: list[float], abnormal: list[float],
              normal_window_scores: list[np.ndarray] | None, source: str, paths: list[str]) -> Calibration:
    """A Calibration from held-out image scores and (for scorers with a map) their window-score maps."""
    windows = None
    if normal_window_scores is not None:
        values = np.concatenate([m[np.isfinite(m)].ravel() for m in normal_window_scores] or [np.zeros(0)])
        if values.size:
            windows = np.percentile(values.astype(np.float64), np.linspace(0, 100, QUANTILES))
    return Calibration(scorer, dict(options), np.sort(np.asarray(normal, dtype=np.float64)),
                       np.sort(np.asarray(abnormal, dtype=np.float64)), windows, source, tuple(paths))


@dataclass(frozen=True)
class Threshold:
    """A decision threshold on raw scores, and how it was chosen (written in every result header)."""

    value: float
    rule: str  # the --threshold text it came from
    description: str  # one line for people: what it is and from what

    def flags(self, score: float) -> bool:
        return bool(score >= self.value)

    def to_dict(self) -> dict[str, Any]:
        return {"value": self.value, "rule": self.rule, "description": self.description}


def is_raw_score(rule: str) -> bool:
    """Whether a --threshold rule is a raw score (which needs no calibration)."""
    try:
        float(rule)
    except ValueError:
        return False
    return True


def choose_threshold(rule: str, calibration: Calibration | None) -> Threshold:
    """The threshold a --threshold rule gives (see the module docstring); a number needs no calibration."""
    rule = rule.strip()
    if is_raw_score(rule):
        value = float(rule)
        if not math.isfinite(value):
            raise ConfigError(f"--threshold {rule}: not a finite number")
        return Threshold(value, rule, f"raw score {value:.6g} (given)")
    name, _, argument = rule.partition(":")
    if name not in ("normal-percentile", "f1", "sensitivity"):
        raise ConfigError(f"--threshold {rule!r}: expected normal-percentile:P, f1, sensitivity:S or a number")
    if calibration is None:
        raise ConfigError(f"--threshold {rule}: the memory bank holds no calibration for this scorer and options "
                          "(rebuild it with swssl-bank, or give a raw score)")
    if name == "normal-percentile":
        percent = _number(rule, argument or "99", 0, 100)
        value = float(np.percentile(calibration.normal, percent))
        return Threshold(value, rule, f"{percent:g}th percentile of {len(calibration.normal)} held-out normal "
                                      f"images ({calibration.source}) = {value:.6g}")
    if len(calibration.abnormal) == 0:
        raise ConfigError(f"--threshold {rule}: needs abnormal images in the val split, and the calibration "
                          f"has none ({calibration.source}); use normal-percentile:P or a number")
    if name == "f1":
        value, f1 = best_f1(calibration.normal, calibration.abnormal)
        return Threshold(value, rule, f"best F1 ({f1:.3f}) on the val split ({len(calibration.normal)} normal, "
                                      f"{len(calibration.abnormal)} abnormal images) = {value:.6g}")
    target = _number(rule, argument, 0, 1)
    value = sensitivity_threshold(calibration.abnormal, target)
    reached = float(np.mean(calibration.abnormal >= value))
    return Threshold(value, rule, f"sensitivity {reached:.3f} (>= {target:g}) on {len(calibration.abnormal)} val "
                                  f"abnormal images = {value:.6g}")


def _number(rule: str, text: str, low: float, high: float) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not low <= value <= high:
        raise ConfigError(f"--threshold {rule}: {text!r} is not a number from {low:g} to {high:g}")
    return value


def best_f1(normal: np.ndarray, abnormal: np.ndarray) -> tuple[float, float]:
    """(threshold, F1) maximising F1 over thresholds at the observed scores; ties go to the higher threshold."""
    scores = np.concatenate([normal, abnormal])
    labels = np.concatenate([np.zeros(len(normal)), np.ones(len(abnormal))])
    order = np.argsort(-scores, kind="stable")
    scores, labels = scores[order], labels[order]
    true_pos, flagged = np.cumsum(labels), np.arange(1, len(scores) + 1)
    last = np.r_[scores[1:] != scores[:-1], True]  # thresholds at distinct scores: all ties flagged together
    f1 = 2 * true_pos[last] / (flagged[last] + len(abnormal))
    best = int(np.argmax(f1))  # first maximum = highest threshold among equals
    return float(scores[last][best]), float(f1[best])


def sensitivity_threshold(abnormal: np.ndarray, target: float) -> float:
    """The highest threshold that flags at least `target` of the abnormal scores."""
    ranked = np.sort(abnormal)[::-1]
    needed = max(1, math.ceil(target * len(ranked) - 1e-9))
    return float(ranked[needed - 1])


def resolve_threshold(rule: str | None, calibration: Calibration | None) -> Threshold | None:
    """The threshold of `rule`; without a rule, DEFAULT_THRESHOLD when there is a calibration, else none."""
    if rule is None:
        return choose_threshold(DEFAULT_THRESHOLD, calibration) if calibration is not None else None
    return choose_threshold(rule, calibration)


@dataclass(frozen=True)
class Decision:
    """What a run adds to each raw score: its percentile among held-out normals, its flag at the threshold,
    and (given the frame's statistics and the bank's domain) an out-of-domain warning."""

    calibration: Calibration | None
    threshold: Threshold | None
    domain: Domain | None = None

    def judge(self, score: float, stats: FrameStats | None = None) -> dict[str, Any]:
        """The record fields `percentile` (None: no calibration), `anomalous` (None: no threshold), `warning`."""
        return {"percentile": None if self.calibration is None else self.calibration.percentile(score),
                "anomalous": None if self.threshold is None else self.threshold.flags(score),
                "warning": "" if stats is None or self.domain is None else self.domain.warning(stats)}

    def describe(self) -> str:
        """One line for the run header and the terminal: the threshold and where it came from."""
        if self.threshold is not None:
            return f"{self.threshold.rule}: {self.threshold.description}"
        return ("none: the memory bank holds no calibration for this scorer and options, so scores get no "
                "percentile and no flag (swssl-bank RUN_DIR --data DIR with the same scorer options adds one; "
                "--threshold VALUE sets a raw one)")
