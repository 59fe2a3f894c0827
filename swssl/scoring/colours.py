"""One documented colour scale for the heat maps of a run, with the decision threshold as its reference point.

The rule, with a calibration of the scorer (a bank built with held-out normal images):
- `low` = the median window score of the held-out normal images (`window_quantiles[50]`): a window
  at or below it is an ordinary window and is drawn fully transparent (the anatomy untouched);
- the threshold sits at THRESHOLD_POSITION (2/3) of the bar: `high = low + (threshold - low) / (2/3)`,
  so everything coloured past the mark is past the decision threshold and the top third of the bar
  shows by how much; without a threshold, the highest held-out normal image score takes its place;
- every overlay of the run, eval or infer, shares this scale, so equal colours mean equal scores.
A threshold at or below `low` (only a given raw number can be) cannot be a reference point: the
scale is then `low` .. the normals' highest window score.

Without a calibration (a bank from before calibrations, or a scorer without a window map) the scale
comes from the scores at hand, with the same shape (median .. max window score): swssl-eval takes
every window of every image scored, so a report still shares one scale; swssl-infer cannot know
the slides to come and uses each slide's own windows, which its captions and gallery say.

Colour map: `inferno`, perceptually uniform and monotone in lightness (a higher score is always a
brighter colour, also in grayscale print and for colour-blind readers), unlike `jet`. Opacity grows
linearly from 0 at `low` to OVERLAY_ALPHA at `high`: faint heat hides no anatomy, and the dark end of
the map, which would look like dense tissue, is never drawn opaque.
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from swssl.scoring.calibration import Calibration, Threshold

THRESHOLD_POSITION = 2 / 3  # where the threshold sits on the bar, from low (0) to high (1)
OVERLAY_CMAP = "inferno"
OVERLAY_ALPHA = 0.85  # opacity of the heat at `high`


@dataclass(frozen=True)
class ColourScale:
    """Score -> colour and opacity of a heat map, and what its colour bar shows."""

    low: float
    high: float
    threshold: float | None  # marked on the bar; None: no threshold
    rule: str  # how low and high were chosen, in words (captions, galleries)
    quantiles: np.ndarray | None = None  # the normals' window-score quantiles: the bar's percentile axis

    def fraction(self, scores: np.ndarray) -> np.ndarray:
        """Where each score lies on the bar, 0 (at or below low, or NaN: not scored) .. 1 (at or above high)."""
        fraction = (np.asarray(scores, dtype=np.float64) - self.low) / (self.high - self.low)
        return np.clip(np.nan_to_num(fraction, nan=0.0), 0.0, 1.0)

    def rgba(self, scores: np.ndarray) -> np.ndarray:
        """(..., 4) float colours of `scores`: the colour map, opacity growing from 0 at low to OVERLAY_ALPHA."""
        from matplotlib import colormaps

        fraction = self.fraction(scores)
        colours = colormaps[OVERLAY_CMAP](fraction)
        colours[..., 3] = OVERLAY_ALPHA * fraction
        return colours


def colour_scale(calibration: Calibration | None, threshold: Threshold | None,
                 window_maps: Iterable[np.ndarray] = (), own: bool = False) -> ColourScale:
    """The scale of the module docstring: from the calibration when it has window quantiles, else from
    `window_maps` (the run's, or with `own` one slide's; NaN = not scored)."""
    value = None if threshold is None else threshold.value
    if calibration is not None and calibration.window_quantiles is not None:
        quantiles = calibration.window_quantiles
        low = float(quantiles[len(quantiles) // 2])
        reference = value if value is not None else float(calibration.normal[-1])
        return ColourScale(low, _high(low, reference, float(quantiles[-1])), value,
                           scale_rule(True, own, value is not None), quantiles)
    scores = np.concatenate([np.ravel(m) for m in window_maps] or [np.zeros(0)])
    scores = scores[np.isfinite(scores)]
    low, top = (float(np.median(scores)), float(scores.max())) if scores.size else (0.0, 1.0)
    return ColourScale(low, _high(low, value, top), value, scale_rule(False, own, value is not None))


def scale_rule(calibrated: bool, own: bool, threshold: bool) -> str:
    """The rule of the module docstring in a line, for captions and galleries."""
    if calibrated:
        top = "the threshold" if threshold else "the highest held-out normal image"
        return f"one scale for the run: clear up to the normals' median window, {top} at 2/3 of the bar"
    top = "the threshold at 2/3 of the bar" if threshold else "the top at the highest window"
    if own:
        return (f"each slide's own scale (no calibration): clear up to its median window, {top}; colours do not "
                "compare across slides")
    return f"one scale for the report (no calibration): clear up to the median window of all images, {top}"


def _high(low: float, reference: float | None, fallback: float) -> float:
    """The top of the bar: the reference at THRESHOLD_POSITION when it lies above low, else `fallback`."""
    if reference is not None and reference > low:
        return low + (reference - low) / THRESHOLD_POSITION
    return fallback if fallback > low else low + 1.0
