"""Metrics against hand-computed values and an independent brute-force pixel map."""
from __future__ import annotations

import numpy as np
import pytest

from swssl.windows.geometry import window_starts
from swssl.scoring.metrics import image_auroc, lesion_hits, pixel_auroc, pixel_map, top_window


def test_image_auroc_hand_cases():
    assert image_auroc([0, 0, 1, 1], [0.1, 0.2, 0.8, 0.9]) == 1.0
    assert image_auroc([0, 0, 1, 1], [0.8, 0.9, 0.1, 0.2]) == 0.0
    assert image_auroc([0, 1], [0.5, 0.5]) == 0.5
    # One of the four (normal, abnormal) pairs is misordered: 3/4.
    assert image_auroc([0, 0, 1, 1], [0.1, 0.6, 0.5, 0.9]) == pytest.approx(0.75)
    assert image_auroc([1, 1, 1], [0.1, 0.2, 0.3]) is None
    assert image_auroc([], []) is None


def brute_pixel_map(window_scores, rows, cols, patch, shape):
    """Per pixel, loop over every window: mean of the scored covering windows, else the minimum."""
    scored = window_scores[~np.isnan(window_scores)]
    fill = scored.min() if scored.size else 0.0
    out = np.empty(shape)
    for y in range(shape[0]):
        for x in range(shape[1]):
            covering = [window_scores[i, j] for i, wy in enumerate(rows) for j, wx in enumerate(cols)
                        if wy <= y < wy + patch and wx <= x < wx + patch and not np.isnan(window_scores[i, j])]
            out[y, x] = np.mean(covering) if covering else fill
    return out


@pytest.mark.parametrize("policy", ["cover", "reference"])
@pytest.mark.parametrize("height,width,patch,step", [(13, 11, 4, 3), (17, 9, 5, 2), (9, 10, 8, 1), (21, 15, 6, 4)])
def test_pixel_map_matches_brute_force(policy, height, width, patch, step):
    rng = np.random.default_rng(height * 100 + width + patch)
    rows = window_starts(height, patch, step, policy)
    cols = window_starts(width, patch, step, policy)
    scores = rng.normal(size=(rows.size, cols.size)).astype(np.float32)
    scores[rng.random(scores.shape) < 0.3] = np.nan
    got = pixel_map(scores, rows, cols, patch, (height, width))
    assert got.dtype == np.float32 and got.shape == (height, width)
    np.testing.assert_allclose(got, brute_pixel_map(scores, rows, cols, patch, (height, width)), atol=1e-5)


def test_pixel_map_uncovered_pixels_take_the_minimum():
    # The reference grid never reaches the last strip; one NaN window leaves a hole too.
    rows = window_starts(13, 4, 3, "reference")  # 0, 3, 6: pixels 10..12 uncovered
    cols = window_starts(10, 4, 4, "reference")  # 0: columns 4..9 uncovered
    scores = np.array([[5.0], [2.0], [np.nan]], dtype=np.float32)
    got = pixel_map(scores, rows, cols, 4, (13, 10))
    assert got[0, 0] == 5.0 and got[3, 0] == pytest.approx(3.5) and got[6, 0] == 2.0
    assert (got[7:, :] == 2.0).all() and (got[:, 4:] == 2.0).all()


def test_pixel_map_nothing_scored_is_zero_and_bad_windows_are_refused():
    rows, cols = np.array([0, 2]), np.array([0])
    assert (pixel_map(np.full((2, 1), np.nan), rows, cols, 3, (5, 4)) == 0).all()
    clipped = pixel_map(np.array([[1.0], [3.0]]), rows, cols, 4, (5, 4))  # dense canvas: the last window is clipped
    assert clipped[4, 0] == 3.0 and clipped[2, 0] == 2.0 and clipped[0, 3] == 1.0
    with pytest.raises(ValueError):
        pixel_map(np.ones((2, 1)), np.array([0, 5]), cols, 3, (5, 4))  # a window starting below the image


def test_pixel_auroc_perfect_inverted_and_degenerate():
    mask = np.zeros((8, 8), dtype=bool)
    mask[2:6, 2:6] = True
    perfect = mask.astype(np.float32)
    assert pixel_auroc([perfect, np.zeros((8, 8))], [mask, np.zeros((8, 8), bool)], stride=1) == 1.0
    assert pixel_auroc([1 - perfect], [mask], stride=1) == 0.0
    assert pixel_auroc([perfect], [np.zeros((8, 8), bool)]) is None
    assert pixel_auroc([perfect], [np.ones((8, 8), bool)]) is None
    assert pixel_auroc([], []) is None
    with pytest.raises(ValueError):
        pixel_auroc([perfect], [mask[:4]])


def test_pixel_auroc_stride_keeps_only_the_lattice():
    # Lesion pixels off the stride-2 lattice score badly; on the lattice the map is perfect.
    mask = np.zeros((8, 8), dtype=bool)
    mask[2:6, 2:6] = True
    score = mask.astype(np.float32)
    score[1::2, :] = np.where(mask[1::2, :], -1.0, 2.0)
    assert pixel_auroc([score], [mask], stride=2) == 1.0
    assert pixel_auroc([score], [mask], stride=1) < 0.5
    # The lattice is every stride-th pixel from (0, 0) on both axes.
    lattice_only = np.zeros((8, 8), dtype=bool)
    lattice_only[1, 1] = True
    assert pixel_auroc([score], [lattice_only], stride=2) is None


def test_top_window_and_lesion_hits():
    rows, cols, patch = np.array([0, 4, 8]), np.array([0, 4, 8]), 4
    mask = np.zeros((12, 12), dtype=bool)
    mask[1:3, 1:3] = True  # lesion in window (0, 0)
    mask[9, 9] = mask[10, 10] = True  # diagonal neighbours: one lesion (8-connected), in window (8, 8)
    scores = np.full((3, 3), np.nan)
    scores[0, 0], scores[1, 1], scores[2, 2] = 3.0, 1.0, 2.0
    assert top_window(scores, rows, cols) == (0, 0)
    assert lesion_hits(scores, rows, cols, patch, mask, group=0) == (1, 2)
    scores[1, 1] = 9.0  # the centre window touches neither lesion
    assert lesion_hits(scores, rows, cols, patch, mask, group=0) == (0, 2)
    scores[2, 2] = 10.0
    assert lesion_hits(scores, rows, cols, patch, mask, group=0) == (1, 2)
    # A window overlapping both lesions hits both.
    assert lesion_hits(np.array([[1.0]]), np.array([0]), np.array([0]), 12, mask, group=0) == (2, 2)
    assert lesion_hits(np.full((3, 3), np.nan), rows, cols, patch, mask, group=0) == (0, 2)
    assert lesion_hits(scores, rows, cols, patch, np.zeros((12, 12), bool)) == (0, 0)
    # With the grouping dilation, lesions closer than `group` px merge into one (calcification clusters).
    assert lesion_hits(scores, rows, cols, patch, mask, group=8)[1] == 1
    assert top_window(np.full((3, 3), np.nan), rows, cols) is None


def test_bootstrap_aurocs_are_roc_auc_scores_of_class_stratified_resamples():
    """Each resample's AUROC (rank statistic, ties included) is sklearn's on the same draw, which keeps both
    classes at their sizes; the 95 % interval holds the AUROC and narrows as the split grows."""
    from sklearn.metrics import roc_auc_score

    from swssl.scoring.metrics import auroc_interval, bootstrap_aurocs

    rng = np.random.default_rng(0)
    labels = np.r_[np.zeros(30, int), np.ones(20, int)]
    scores = np.round(rng.normal(size=50) + 0.8 * labels, 1)  # rounded: ties
    aurocs = bootstrap_aurocs(labels, scores, -scores, resamples=40, seed=5)
    draw = np.random.default_rng(5)
    pick = np.concatenate([draw.choice(np.arange(30), (40, 30)), draw.choice(np.arange(30, 50), (40, 20))], axis=1)
    expected = [roc_auc_score(labels[p], scores[p]) for p in pick]
    np.testing.assert_allclose(aurocs[:, 0], expected, atol=1e-12)
    np.testing.assert_allclose(aurocs[:, 1], 1 - aurocs[:, 0], atol=1e-12)
    low, high = auroc_interval(labels, scores)
    assert low < roc_auc_score(labels, scores) < high
    big = np.tile(labels, 8), np.round(rng.normal(size=400) + 0.8 * np.tile(labels, 8), 1)
    big_low, big_high = auroc_interval(*big)
    assert big_high - big_low < 0.6 * (high - low)
    assert auroc_interval([0, 0, 0], [1.0, 2.0, 3.0]) is None
