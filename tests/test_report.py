"""summarise / write_report / format_table on small synthetic results."""
from __future__ import annotations

import csv
import json
import re

import numpy as np
import pytest
from PIL import Image
from sklearn.metrics import roc_auc_score

from swssl.windows.geometry import window_starts
from swssl.scoring.metrics import lesion_hits, pixel_auroc, pixel_map
from swssl.scoring.report import BAR_WIDTH, ImageResult, format_table, summarise, write_report

PATCH, STEP = 32, 16


def make_results(height: int, width: int, labels: list[int], seed: int = 0):
    """Images with a bright square lesion on the abnormal ones; windows score their mean brightness."""
    rng = np.random.default_rng(seed)
    rows = window_starts(height, PATCH, STEP)
    cols = window_starts(width, PATCH, STEP)
    results = []
    for i, label in enumerate(labels):
        image = (0.3 * rng.random((height, width))).astype(np.float32)
        mask = np.zeros((height, width), dtype=bool)
        if label:
            y, x = rng.integers(0, height - 40), rng.integers(0, width - 40)
            mask[y:y + 40, x:x + 40] = True
            image[mask] += 0.6
        windows = np.array([[image[r:r + PATCH, c:c + PATCH].mean() for c in cols] for r in rows], np.float32)
        windows[0, 0] = np.nan  # one background window
        score = float(np.nanmax(windows)) + rng.normal(scale=0.05)
        results.append(ImageResult(f"data/img {i}.png", label, score, windows, image, mask))
    return results, rows, cols


def test_summarise_matches_the_metrics():
    results, rows, cols = make_results(96, 80, [0, 1, 0, 1, 1, 0, 1])
    results[0].mask = None  # a normal image needs no mask: all its pixels are normal
    results[0].window_scores[:] = 1.0  # ... and score above every lesion, so leaving it out would show
    results[6].mask = None  # an abnormal image without a mask takes no part in the pixel metrics
    results.append(ImageResult("no-map.png", 0, 0.0, None))
    summary = summarise(results, rows, cols, PATCH, "test", "aligned")
    assert summary["split"] == "test" and summary["scorer"] == "aligned"
    assert summary["images"] == 8 and summary["abnormal"] == 4
    assert summary["image_auroc"] == pytest.approx(roc_auc_score([r.label for r in results],
                                                                 [r.score for r in results]))
    kept = results[:6]
    masks = [np.zeros((96, 80), bool)] + [r.mask for r in kept[1:]]
    expected = pixel_auroc([pixel_map(r.window_scores, rows, cols, PATCH, (96, 80)) for r in kept], masks)
    without_normal = pixel_auroc([pixel_map(r.window_scores, rows, cols, PATCH, (96, 80)) for r in kept[1:]],
                                 masks[1:])
    assert summary["pixel_auroc"] == pytest.approx(expected) and expected < without_normal - 0.1
    hits = [lesion_hits(r.window_scores, rows, cols, PATCH, r.mask) for r in kept if r.label]
    assert summary["lesions"] == 3 == sum(n for _, n in hits)
    assert summary["lesion_hit_rate"] == pytest.approx(sum(h for h, _ in hits) / 3)


def test_summarise_without_masks_or_maps():
    results, rows, cols = make_results(64, 64, [0, 1])
    for r in results:
        r.mask = None
    summary = summarise(results, rows, cols, PATCH, "val", "reference")
    assert summary["pixel_auroc"] is None and summary["lesion_hit_rate"] is None and summary["lesions"] == 0
    assert summary["image_auroc"] is not None
    table = format_table(summary)
    assert "n/a" in table and "image_auroc" in table and f"{summary['image_auroc']:.4f}" in table
    lines = table.splitlines()
    assert len({re.search(r"\S  +(\S)", line).start(1) for line in lines[2:]}) == 1  # values in one column


def test_write_report_files(tmp_path):
    # 1100 x 700: overlays must shrink to 1024 px on the long side.
    results, rows, cols = make_results(1100, 700, [0, 1, 1, 0, 0, 1, 0, 1, 0, 1], seed=1)
    results[2].image = None  # no overlay for it
    summary = summarise(results, rows, cols, PATCH, "test", "aligned")
    out = tmp_path / "report"
    write_report(out, results, summary, rows, cols, PATCH, overlays=4, extra={"epoch": np.int64(7)})

    data = json.loads((out / "eval.json").read_text())
    assert data["image_auroc"] == pytest.approx(roc_auc_score([r.label for r in results],
                                                              [r.score for r in results]))
    assert data["epoch"] == 7 and data["pixel_auroc"] == pytest.approx(summary["pixel_auroc"])

    with open(out / "images.csv", newline="") as handle:
        table = list(csv.DictReader(handle))
    assert [float(row["score"]) for row in table] == sorted((r.score for r in results), reverse=True)
    best = max(results, key=lambda r: r.score)
    assert table[0]["path"] == best.path and int(table[0]["label"]) == best.label
    r, c = np.unravel_index(np.nanargmax(best.window_scores), best.window_scores.shape)
    assert (int(table[0]["top_window_y"]), int(table[0]["top_window_x"])) == (rows[r], cols[c])

    with Image.open(out / "roc.png") as roc:
        roc.load()
        assert min(roc.size) > 100
    overlays = sorted((out / "heatmaps").iterdir())
    shown = [r for r in sorted(results, key=lambda r: r.score, reverse=True) if r.image is not None][:4]
    assert [p.name for p in overlays] == [f"{i:02d}-{r.path[5:-4].replace(' ', '_')}.png"
                                          for i, r in enumerate(shown, 1)]
    for path in overlays:
        with Image.open(path) as overlay:
            overlay.load()
            assert overlay.size[0] == round(700 * 1024 / 1100) + BAR_WIDTH and overlay.size[1] > 1024  # + title
    assert not [p for p in out.rglob(".*")]  # no temporary files left behind


def test_write_report_single_class_and_no_maps(tmp_path):
    results, rows, cols = make_results(64, 48, [0, 0, 0])
    results[1].window_scores = None
    summary = summarise(results, rows, cols, PATCH, "train", "global")
    assert summary["image_auroc"] is None
    (tmp_path / "heatmaps").mkdir()
    for stale in ("roc.png", "heatmaps/01-old.png"):  # left by an earlier two-class report
        (tmp_path / stale).write_bytes(b"old")
    write_report(tmp_path, results, summary, rows, cols, PATCH, overlays=8)
    assert not (tmp_path / "roc.png").exists() and not (tmp_path / "heatmaps/01-old.png").exists()
    assert json.loads((tmp_path / "eval.json").read_text())["image_auroc"] is None
    with open(tmp_path / "images.csv", newline="") as handle:
        rows_read = list(csv.DictReader(handle))
    assert [row["top_window_y"] for row in rows_read if row["path"] == results[1].path] == [""]
    overlays = sorted((tmp_path / "heatmaps").iterdir())
    assert len(overlays) == 2  # the image without a map gets none
    with Image.open(overlays[0]) as overlay:
        assert overlay.size[0] == 48 + BAR_WIDTH and overlay.size[1] > 64  # small images keep their size


def test_auroc_per_contrast_band_pits_each_band_against_every_normal(tmp_path):
    """by_contrast: abnormal images grouped by their most conspicuous lesion (lesions.csv, read by
    lesion_contrasts), each band's AUROC against all normals as sklearn computes it, with its interval."""
    from swssl.data.datasets import lesion_contrasts
    from swssl.scoring.report import by_contrast

    (tmp_path / "lesions.csv").write_text("path,lesion,kind,y,x,diameter_px,area_px,contrast\n"
                                          "a.png,1,mass,1,1,9,60,0.05\na.png,2,mass,9,9,9,60,0.5\n"
                                          "b.png,1,mass,1,1,9,60,0.1\nc.png,1,mass,1,1,9,60,0.2\n")
    contrasts = lesion_contrasts(tmp_path)
    assert contrasts == {(tmp_path / "a.png").resolve(): 0.5, (tmp_path / "b.png").resolve(): 0.1,
                         (tmp_path / "c.png").resolve(): 0.2}
    normals = [ImageResult(str(tmp_path / f"n{i}.png"), 0, score, None) for i, score in enumerate([0.1, 0.4, 0.6])]
    abnormal = [ImageResult(str(tmp_path / name), 1, score, None) for name, score in
                (("a.png", 0.9), ("b.png", 0.2), ("c.png", 0.5))]
    bands = by_contrast(normals + abnormal, contrasts)
    subtle, moderate, obvious = bands.values()
    assert [band["abnormal"] for band in bands.values()] == [1, 1, 1]
    assert subtle["image_auroc"] == roc_auc_score([0, 0, 0, 1], [0.1, 0.4, 0.6, 0.2])
    assert moderate["image_auroc"] == roc_auc_score([0, 0, 0, 1], [0.1, 0.4, 0.6, 0.5])
    assert obvious["image_auroc"] == 1.0 and obvious["image_auroc_95ci"] == (1.0, 1.0)
    assert "subtle (0 <= contrast < 0.15)" in format_table({"by_contrast": bands})
    assert lesion_contrasts(tmp_path / "elsewhere") == {}
