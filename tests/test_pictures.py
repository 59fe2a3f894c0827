"""Pictures people read: the colour scale, overlays (bar, untouched anatomy, top-window box), the gallery,
`swssl-eval --overlays`, and the lesion count of a scorer without a map."""
from __future__ import annotations

import numpy as np
import pytest
from click.testing import CliRunner
from matplotlib import colormaps
from PIL import Image

from swssl import cli
from swssl.inference.gallery import render_gallery
from swssl.scoring.calibration import Calibration, Threshold
from swssl.scoring.colours import OVERLAY_ALPHA, colour_scale, scale_rule
from swssl.scoring.report import (BAR_WIDTH, BOX_COLOUR, MASK_COLOUR, ImageResult, heat_map, save_overlay, score_line,
                                  summarise)
from swssl.windows.geometry import window_starts
from test_infer import invoke, tiny  # noqa: F401  (the module fixture: a run with a random-weight encoder)

QUANTILES = np.linspace(0.0, 10.0, 101)  # the normals' window-score percentiles: p-th = p / 10


def calibration(quantiles=QUANTILES, normal=(6.0, 7.0, 7.5)) -> Calibration:
    return Calibration("aligned", {}, np.array(normal), np.zeros(0), quantiles, "test normals")


THRESHOLD = Threshold(8.0, "normal-percentile:99", "99th percentile of 3 normals = 8")


def test_colour_scale_puts_the_threshold_at_two_thirds_above_the_normal_median():
    scale = colour_scale(calibration(), THRESHOLD)
    assert (scale.low, scale.high, scale.threshold) == (5.0, pytest.approx(9.5), 8.0)  # 5 + 3 * 3/2
    assert scale.fraction(np.array([4.0, 5.0, 8.0, 12.0, np.nan, -np.inf])) == pytest.approx([0, 0, 2 / 3, 1, 0, 0])
    assert scale.quantiles[90] == 9.0  # the bar's p90 mark
    # no threshold: the highest held-out normal image takes its place; one at or below low cannot be a reference
    assert colour_scale(calibration(), None).high == pytest.approx(5 + 2.5 * 1.5)
    assert colour_scale(calibration(), Threshold(4.0, "4", "given")).high == 10.0
    # a scorer without a map has no window quantiles: the scale comes from the windows at hand
    observed = colour_scale(calibration(quantiles=None), Threshold(3.0, "3", "given"),
                            [np.array([[1.0, 2.0, np.nan]]), np.array([3.0, 4.0])], own=True)
    assert (observed.low, observed.high, observed.rule) == (2.5, pytest.approx(3.25), scale_rule(False, True, True))
    assert observed.quantiles is None  # no percentile axis
    assert colour_scale(None, None, [np.array([2.0, 2.0])]).high == 3.0  # a flat map still gets a bar


def test_score_line_names_percentile_decision_and_rule():
    assert score_line(10.37, 99.64, THRESHOLD) == ("score 10.37 · percentile 99.6 of normals · ANOMALOUS "
                                                   "(threshold 8, normal-percentile:99)")
    assert score_line(7.0, None, None) == "score 7 · no threshold"
    assert score_line(7.0, None, Threshold(6.5, "6.5", "given")) == "score 7 · ANOMALOUS (threshold 6.5, given)"


def overlay_png(tmp_path, score_map, **kwargs) -> tuple[np.ndarray, np.ndarray]:
    """An overlay of a random 200 x 300 gray image; (the gray image, the PNG read back as RGB)."""
    gray = np.random.default_rng(0).random((200, 300)).astype(np.float32)
    path = tmp_path / "overlay.png"
    save_overlay(path, gray, score_map, colour_scale(calibration(), THRESHOLD), ["score 1", "name.png"], **kwargs)
    with Image.open(path) as png:
        return gray, np.asarray(png.convert("RGB"))


def test_overlay_has_a_bar_and_leaves_the_anatomy_of_ordinary_windows_untouched(tmp_path):
    heat = np.full((200, 300), 4.0, np.float32)  # below low = 5: clear
    heat[:, 150:] = 20.0  # above high: the top of the map at full opacity
    gray, png = overlay_png(tmp_path, heat)
    assert png.shape[1] == 300 + BAR_WIDTH and png.shape[0] > 200  # the bar beside it, the title above it
    picture = png[-200:, :300]
    expected_gray = np.rint(gray.astype(np.float64) * 255).astype(np.uint8)
    assert (picture[:, :150] == expected_gray[:, :150, None]).all()
    top = np.array(colormaps["inferno"](1.0)[:3])
    hot = np.rint((gray[:, 150:, None] * (1 - OVERLAY_ALPHA) + top * OVERLAY_ALPHA) * 255)
    assert np.abs(picture[:, 150:].astype(int) - hot).max() <= 1


def test_overlay_boxes_the_top_window_and_outlines_the_mask(tmp_path):
    mask = np.zeros((200, 300), bool)
    mask[120:160, 200:260] = True
    gray, png = overlay_png(tmp_path, np.zeros((200, 300), np.float32), box=(50, 60, 40, 40), mask=mask)
    picture = png[-200:, :300]
    for y, x in ((50, 80), (89, 80), (70, 60), (70, 99)):  # the box's four edges
        assert tuple(picture[y, x]) == BOX_COLOUR
    assert tuple(picture[70, 80]) == (round(gray[70, 80] * 255),) * 3  # inside the box: the image itself
    assert tuple(picture[120, 230]) == MASK_COLOUR and tuple(picture[140, 230]) != MASK_COLOUR


def test_gallery_says_mode_threshold_and_each_slides_decision():
    records = [
        {"path": "/s/hot.png", "frame": 0, "score": 9.5, "status": "ok", "percentile": 99.64, "anomalous": True,
         "warning": "<b>8-bit</b> image: the bank's were 16-bit"},
        {"path": "/s/calm.png", "frame": 0, "score": 3.0, "status": "ok", "percentile": 41.0, "anomalous": False,
         "warning": ""},
        {"path": "/s/vol.dcm", "frame": "volume", "score": 9.5, "best_frame": 0, "status": "ok", "frames": 2,
         "percentile": 99.64, "anomalous": True},
    ]
    run = {"mode": "dense", "scorer": "aligned", "geometry": "resize",
           "threshold": {"value": 8.25, "rule": "normal-percentile:99", "description": "99th percentile of 20"}}
    page = render_gallery(records, run)
    assert "<b>dense</b> mode" in page and "<b>aligned</b> scorer" in page and "normal-percentile:99" in page
    assert "8.25" in page and "clear up to the normals&#x27; median window" in page
    assert page.count('class="badge anomalous"') == 2 and page.count('class="badge normal"') == 1
    assert "percentile 99.6 of normals" in page and "<td>99.6</td>" in page  # a card, the volume row
    assert "&lt;b&gt;8-bit&lt;/b&gt;" in page and "<b>8-bit</b>" not in page
    old = render_gallery([{**r, "percentile": None, "anomalous": None} for r in records[:2]], {"mode": "exact"})
    assert "no threshold" in old and "each slide&#x27;s own scale" in old and "ANOMALOUS" not in old


def test_a_scorer_without_a_map_still_counts_the_lesions():
    rows = cols = window_starts(64, 32, 16)
    two = np.zeros((64, 64), bool)
    two[2:6, 2:6] = two[40:50, 40:50] = True  # far apart: two lesions
    one = np.zeros((64, 64), bool)
    one[10:20, 30:34] = True
    results = [ImageResult("a.png", 1, 2.0, None, mask=two), ImageResult("b.png", 1, 1.0, None, mask=one),
               ImageResult("n.png", 0, 0.5, None)]
    summary = summarise(results, rows, cols, 32, "test", "reference")
    assert summary["lesions"] == 3 and summary["lesion_hit_rate"] is None and summary["pixel_auroc"] is None


@pytest.mark.parametrize("overlays, expected", [("all", 6), ("2", 2)])
def test_eval_overlays_option(tiny, tmp_path, overlays, expected):  # noqa: F811
    root, run = tiny
    result = CliRunner().invoke(cli.evaluate, [str(run), "--data", str(root), "--split", "test", "--device", "cpu",
                                               "--scorer", "aligned", "--overlays", overlays, "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    pictures = sorted((tmp_path / "test-aligned" / "heatmaps").iterdir())
    assert len(pictures) == expected and pictures[0].name.startswith("01-")


def test_infer_heatmap_has_the_bar(tiny, tmp_path):  # noqa: F811
    root, run = tiny
    result = invoke(root / "test-1.png", "--model", run, "--out", tmp_path, "--heatmaps")
    assert result.exit_code == 0, result.output
    (picture,) = (tmp_path / "heatmaps").glob("*.png")
    with Image.open(picture) as png:
        assert png.size[0] == 96 + BAR_WIDTH and png.size[1] > 128  # the run's 96 x 128 frame, bar, title


def test_heat_map_shows_each_pixel_its_highest_covering_window():
    rows, cols = np.array([0, 2]), np.array([0, 2])
    scores = np.array([[1.0, 5.0], [np.nan, 3.0]])
    heat = heat_map(scores, rows, cols, 3, (6, 6))
    assert heat[0, 0] == 1.0 and heat[2, 2] == 5.0 and heat[4, 4] == 3.0 and heat[2, 3] == 5.0
    assert heat[4, 0] == -np.inf  # only the unscored window covers it
