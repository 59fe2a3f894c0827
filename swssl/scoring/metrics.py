"""Evaluation metrics for window-score maps: image AUROC (with bootstrap intervals), pixel AUROC and lesion hits.

SWSSL scores windows, not pixels, so the pixel-level metrics first spread each window's score
over the pixels it covers (`pixel_map`). Everything here is plain numpy / scipy / scikit-learn
so that a report can be recomputed from saved score maps without torch or a GPU.
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
from scipy import ndimage
from scipy.stats import rankdata
from sklearn.metrics import roc_auc_score

# 8-connectivity: pixels touching by a corner belong to the same lesion.
EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)


def image_auroc(labels: Sequence[int], scores: Sequence[float]) -> float | None:
    """AUROC of image scores against labels (1 = abnormal); None when only one class is present."""
    labels = np.asarray(labels)
    if np.unique(labels).size < 2:
        return None
    return float(roc_auc_score(labels, np.asarray(scores, dtype=np.float64)))


def bootstrap_aurocs(labels: Sequence[int], *scores: Sequence[float], resamples: int = 2000,
                     seed: int = 0) -> np.ndarray:
    """Image AUROCs of resampled splits (resamples x len(scores)): normals and abnormals drawn with
    replacement within their class, the same draw for every score set (so their differences pair).

    Each AUROC is the Mann-Whitney statistic of average ranks, which is what roc_auc_score gives
    (ties count one half), computed for all resamples at once.
    """
    labels = np.asarray(labels)
    if np.unique(labels).size < 2:
        raise ValueError("bootstrap intervals of an AUROC need both classes")
    rng = np.random.default_rng(seed)
    normal, abnormal = np.flatnonzero(labels == 0), np.flatnonzero(labels == 1)
    pick = np.concatenate([rng.choice(normal, (resamples, len(normal))),
                           rng.choice(abnormal, (resamples, len(abnormal)))], axis=1)
    pairs = len(normal) * len(abnormal)
    out = []
    for values in scores:
        ranks = rankdata(np.asarray(values, dtype=np.float64)[pick], axis=1)[:, len(normal):]
        out.append((ranks.sum(axis=1) - len(abnormal) * (len(abnormal) + 1) / 2) / pairs)
    return np.stack(out, axis=1)


def auroc_interval(labels: Sequence[int], scores: Sequence[float]) -> tuple[float, float] | None:
    """The percentile 95 % bootstrap interval of the image AUROC (None when only one class is present)."""
    if np.unique(np.asarray(labels)).size < 2:
        return None
    low, high = np.percentile(bootstrap_aurocs(labels, scores)[:, 0], [2.5, 97.5])
    return float(low), float(high)


def format_interval(interval: Sequence[float] | None) -> str:
    """ " [low, high]" of a 95 % interval; empty when there is none."""
    return f" [{interval[0]:.3f}, {interval[1]:.3f}]" if interval else ""


def pixel_map(window_scores: np.ndarray, rows: np.ndarray, cols: np.ndarray, patch: int,
              shape: tuple[int, int]) -> np.ndarray:
    """Per-pixel score (H, W) float32: the mean score of the scored (non-NaN) windows covering it.

    Pixels no scored window covers (background, or the border strip of the "reference" grid)
    get the smallest scored window's score, or 0 when nothing was scored, so they never look
    anomalous. Built with 2-D difference arrays: each window adds its score at its top-left
    corner and cancels it past its other corners; two cumulative sums then give every pixel's
    sum (and count) in O(H*W + R*C).
    """
    window_scores = np.asarray(window_scores, dtype=np.float64)
    height, width = shape
    ys, xs = np.meshgrid(np.asarray(rows), np.asarray(cols), indexing="ij")
    scored = ~np.isnan(window_scores)
    ys, xs, values = ys[scored], xs[scored], window_scores[scored]
    if values.size == 0:
        return np.zeros(shape, dtype=np.float32)
    if ys.min() < 0 or xs.min() < 0 or ys.max() >= height or xs.max() >= width:
        raise ValueError(f"windows at the given offsets do not start in {height} x {width}")

    # One extra row and column hold the cancellations of windows that end on the border; windows
    # reaching past it (dense mode's zero-padded canvas) are clipped to the image.
    total = np.zeros((height + 1, width + 1))
    count = np.zeros((height + 1, width + 1))
    for dy, dx, sign in ((0, 0, 1), (0, patch, -1), (patch, 0, -1), (patch, patch, 1)):
        corner = (np.minimum(ys + dy, height), np.minimum(xs + dx, width))
        np.add.at(total, corner, sign * values)
        np.add.at(count, corner, sign)
    total = total.cumsum(0).cumsum(1)[:height, :width]
    count = np.rint(count.cumsum(0).cumsum(1)[:height, :width])

    out = np.full(shape, values.min())
    covered = count > 0
    out[covered] = total[covered] / count[covered]
    return out.astype(np.float32)


def pixel_auroc(maps: Iterable[np.ndarray], masks: Iterable[np.ndarray], stride: int = 4) -> float | None:
    """AUROC of pixel scores against lesion pixels, pooled over all given images.

    Memory: only every `stride`-th pixel on each axis is kept (a stride x stride lattice starting
    at (0, 0)), i.e. H*W/stride^2 scores per image; `maps` may be a generator so that the
    full-size maps never coexist. None when there is no lesion pixel or no normal pixel.
    """
    scores, truth = [], []
    for score_map, mask in zip(maps, masks, strict=True):
        if score_map.shape != mask.shape:
            raise ValueError(f"score map {score_map.shape} and mask {mask.shape} differ in shape")
        scores.append(np.asarray(score_map[::stride, ::stride], dtype=np.float32).ravel())
        truth.append(np.asarray(mask[::stride, ::stride], dtype=bool).ravel())
    if not scores:
        return None
    truth_all = np.concatenate(truth)
    if truth_all.all() or not truth_all.any():
        return None
    return float(roc_auc_score(truth_all, np.concatenate(scores)))


def top_window(window_scores: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> tuple[int, int] | None:
    """(y, x) start of the highest-scored window (first one on ties); None when no window was scored."""
    window_scores = np.asarray(window_scores)
    if np.isnan(window_scores).all():
        return None
    r, c = np.unravel_index(np.nanargmax(window_scores), window_scores.shape)
    return int(rows[r]), int(cols[c])


def lesion_hits(window_scores: np.ndarray, rows: np.ndarray, cols: np.ndarray, patch: int,
                mask: np.ndarray, group: int = 10) -> tuple[int, int]:
    """(lesions hit, lesions) for one image.

    Lesions are the 8-connected components of the mask after a dilation by `group` px, so the
    dots of one calcification cluster count as one lesion. The image's top window (highest
    non-NaN score) hits every lesion whose mask pixels its patch x patch rectangle shares; with
    no scored window, nothing is hit.
    """
    mask = np.asarray(mask, dtype=bool)
    grouped = ndimage.binary_dilation(mask, iterations=group) if group > 0 and mask.any() else mask
    labelled, lesions = ndimage.label(grouped, structure=EIGHT_CONNECTED)
    labelled = labelled * mask
    top = top_window(window_scores, rows, cols)
    if lesions == 0 or top is None:
        return 0, int(lesions)
    y, x = top
    inside = np.unique(labelled[y:y + patch, x:x + patch])
    return int(np.count_nonzero(inside)), int(lesions)
