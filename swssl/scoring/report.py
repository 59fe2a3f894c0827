"""The outputs of an evaluation: a summary of the metrics, and the files a person reads.

`summarise` turns per-image results into the numbers (image AUROC, pixel AUROC, lesion hit
rate); `write_report` writes them with what is needed to trust them: every image's score
(images.csv), the ROC curve with the threshold's operating point, and heat-map overlays of the
highest-scored images (or all), so one can see *where* the model looks, not only how well it
ranks. Every overlay of a report shares one colour scale (swssl.scoring.colours) with a colour
bar, the top window boxed and the lesion mask outlined. Every file is written atomically.

Mask convention: `mask=None` means "no mask file". A normal image needs none: all its pixels
count as normal in the pixel AUROC. An abnormal image without a mask takes no part in the pixel
metrics (where its lesion lies is unknown), so do not give it an all-False mask.
"""
from __future__ import annotations

import csv
import io
import itertools
import json
import textwrap
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from scipy import ndimage

from swssl.scoring import metrics
from swssl.files import atomic_write
from swssl.names import safe_name
from swssl.scoring.calibration import Calibration, Threshold, is_raw_score
from swssl.scoring.colours import ColourScale, colour_scale

MAX_OVERLAY_SIDE = 1024  # px, long side of the image part of a heat-map overlay
BAR_WIDTH = 170  # px added right of the image: the colour bar with its percentile and score axes
LINE_HEIGHT = 16  # px per title line above the image
OUTLINE = 2  # px, width of the top-window box and of the mask outline
BOX_COLOUR = (0, 229, 255)  # cyan: the top window (a colour the inferno map never takes)
MASK_COLOUR = (50, 255, 50)  # green: the outline of the lesion mask
BAR_PERCENTILES = (50, 90, 99, 100)  # percentiles of normal windows marked on the bar when calibrated


@dataclass
class ImageResult:
    path: str
    label: int  # 0 normal, 1 abnormal
    score: float
    window_scores: np.ndarray | None  # (R, C), NaN = background; None for scorers without a map
    image: np.ndarray | None = None  # (H, W) float32 in [0, 1], for overlays (may be dropped to save memory)
    mask: np.ndarray | None = None  # (H, W) bool; None = no mask file (see the module docstring)
    percentile: float | None = None  # among the bank's held-out normals (None: not calibrated)
    anomalous: bool | None = None  # at the run's threshold (None: no threshold)


def summarise(results: list[ImageResult], rows: np.ndarray, cols: np.ndarray, patch: int,
              split: str, scorer: str) -> dict[str, Any]:
    """The metrics of one split and scorer as a JSON-ready dict.

    pixel_auroc pools the images with a map that are normal or have a mask (None when no
    image has both a mask and a map, or no lesion pixel is among them); lesion_hit_rate is hits /
    lesions over the abnormal images with a mask and a map (None when they hold no lesion);
    lesions counts the lesions of every abnormal image with a mask, with a map or not.
    """
    annotated = [r for r in results if r.mask is not None and r.window_scores is not None]
    shape = annotated[0].mask.shape if annotated else None  # every image is at the run's geometry
    pooled = [r for r in results if r.window_scores is not None and (r.mask is not None or r.label == 0)]
    maps = (metrics.pixel_map(r.window_scores, rows, cols, patch, shape) for r in pooled)
    masks = (np.zeros(shape, dtype=bool) if r.mask is None else r.mask for r in pooled)
    counted = [(r, _lesion_hits(r, rows, cols, patch)) for r in results if r.label == 1 and r.mask is not None]
    hit, lesions = sum(h for _, (h, _) in counted), sum(n for _, (_, n) in counted)
    mapped = sum(n for r, (_, n) in counted if r.window_scores is not None)
    return {
        "split": split,
        "scorer": scorer,
        "images": len(results),
        "abnormal": sum(1 for r in results if r.label == 1),
        "image_auroc": metrics.image_auroc([r.label for r in results], [r.score for r in results]),
        "image_auroc_95ci": metrics.auroc_interval([r.label for r in results], [r.score for r in results]),
        "pixel_auroc": metrics.pixel_auroc(maps, masks) if annotated else None,
        "lesion_hit_rate": hit / mapped if mapped else None,
        "lesions": lesions,
    }


def _lesion_hits(result: ImageResult, rows: np.ndarray, cols: np.ndarray, patch: int) -> tuple[int, int]:
    """(hits, lesions) of an abnormal image with a mask; without a map no window is scored, so
    lesion_hits counts its lesions and hits none."""
    scores = result.window_scores if result.window_scores is not None else np.full((len(rows), len(cols)), np.nan)
    return metrics.lesion_hits(scores, rows, cols, patch, result.mask)


CONTRAST_BANDS = ((0.0, 0.15, "subtle"), (0.15, 0.4, "moderate"), (0.4, float("inf"), "obvious"))


def by_contrast(results: list[ImageResult], contrasts: dict[Path, float]) -> dict[str, dict[str, Any]]:
    """Image AUROC (and its 95 % interval) of the abnormal images in each contrast band (of their most
    conspicuous lesion, as lesions.csv records it) against every normal image: what the detector sees."""
    normal = [r for r in results if r.label == 0]
    bands = {}
    for low, high, name in CONTRAST_BANDS:
        chosen = [r for r in results if r.label == 1 and low <= contrasts.get(Path(r.path).resolve(), -1) < high]
        labels, scores = [r.label for r in normal + chosen], [r.score for r in normal + chosen]
        bands[f"{name} ({low:g} <= contrast < {high:g})"] = {
            "abnormal": len(chosen), "image_auroc": metrics.image_auroc(labels, scores),
            "image_auroc_95ci": metrics.auroc_interval(labels, scores)}
    return bands


def write_report(out_dir: Path, results: list[ImageResult], summary: dict[str, Any], rows: np.ndarray,
                 cols: np.ndarray, patch: int, overlays: int | None = 8, extra: dict[str, Any] | None = None,
                 mode: str | None = None, calibration: Calibration | None = None, threshold: Threshold | None = None,
                 load_image: Callable[[int], np.ndarray] | None = None) -> None:
    """Write eval.json, images.csv, roc.png (both classes only) and heatmaps/ into `out_dir`.

    Overlays: the `overlays` highest-scored images with a map (None: all of them, which shows the
    missed lesions too), on the run's colour scale (colours.colour_scale of `calibration` and
    `threshold`; None: not available). An image is `results[i].image`, else `load_image(i)` (loaded
    one at a time, so memory does not grow with the split), else it gets no overlay. `mode`
    (exact/dense) is named in the titles."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    scale = colour_scale(calibration, threshold, (r.window_scores for r in results if r.window_scores is not None))
    ranked = sorted(range(len(results)), key=lambda i: results[i].score, reverse=True)
    text = json.dumps({**summary, **(extra or {}), "colour_scale": _scale_dict(scale)}, indent=2,
                      default=_json_default) + "\n"
    _write_text(out_dir / "eval.json", text)
    _write_text(out_dir / "images.csv", _images_csv([results[i] for i in ranked], rows, cols))
    # A report written again into the same folder must not keep the last run's figures.
    for stale in [out_dir / "roc.png", *out_dir.glob("heatmaps/[0-9][0-9]*-*.png")]:
        stale.unlink(missing_ok=True)
    if len({r.label for r in results}) == 2:
        _plot_roc(out_dir / "roc.png", results, summary, mode, threshold)
    context = " · ".join([f"{summary['scorer']} scorer", f"{mode or 'n/a'} mode", f"{summary['split']} split"])
    digits = max(2, len(str(len(results))))
    shown = itertools.islice(_overlay_images(results, ranked, load_image), overlays)
    for rank, (result, image) in enumerate(shown, start=1):
        window = metrics.top_window(result.window_scores, rows, cols)
        title = [score_line(result.score, result.percentile, threshold),
                 f"#{rank} of {len(results)} · label {result.label} ({'abnormal' if result.label else 'normal'})"
                 f" · {context}", Path(result.path).name]
        save_overlay(out_dir / "heatmaps" / f"{rank:0{digits}d}-{safe_name(Path(result.path).stem)}.png", image,
                     heat_map(result.window_scores, rows, cols, patch, image.shape), scale, title,
                     result.mask, None if window is None else (*window, patch, patch),
                     None if threshold is None else threshold.flags(result.score))


def _overlay_images(results: list[ImageResult], ranked: list[int], load_image: Callable[[int], np.ndarray] | None
                    ) -> Iterator[tuple[ImageResult, np.ndarray]]:
    """The results with a map and an image in `ranked` order, each image loaded only when it is reached."""
    for i in ranked:
        result = results[i]
        if result.window_scores is None:
            continue
        image = result.image if result.image is not None or load_image is None else load_image(i)
        if image is not None:
            yield result, image


def score_line(score: float, percentile: float | None, threshold: Threshold | None) -> str:
    """What a score means, for a title: e.g. "score 10.37 · percentile 99.6 of normals · ANOMALOUS
    (threshold 8.2, normal-percentile:99)"; the percentile and the flag are left out when not available."""
    parts = [f"score {score:.4g}"]
    if percentile is not None:
        parts.append(f"percentile {percentile:.1f} of normals")
    if threshold is None:
        parts.append("no threshold")
    else:
        flag = "ANOMALOUS" if threshold.flags(score) else "normal"
        rule = "given" if is_raw_score(threshold.rule) else threshold.rule
        parts.append(f"{flag} (threshold {threshold.value:.4g}, {rule})")
    return " · ".join(parts)


def _scale_dict(scale: ColourScale) -> dict[str, Any]:
    return {"low": scale.low, "high": scale.high, "threshold": scale.threshold, "rule": scale.rule}


def format_table(summary: dict[str, Any]) -> str:
    """The summary as two aligned columns (metric, value), None shown as n/a."""
    cells = []
    for key, value in summary.items():
        if isinstance(value, dict):  # by_contrast: one line per band
            cells += [(f"{key}: {band}", _format_band(row)) for band, row in value.items()]
        else:
            cells.append((str(key), _format_value(value)))
    width = max([len("metric")] + [len(key) for key, _ in cells])
    lines = [f"{'metric':<{width}}  value", f"{'-' * width}  -----"]
    lines += [f"{key:<{width}}  {value}" for key, value in cells]
    return "\n".join(lines)


def _format_band(row: dict[str, Any]) -> str:
    return f"{_format_value(row['image_auroc'])} {_format_value(row['image_auroc_95ci'])} ({row['abnormal']} abnormal)"


def _format_value(value: Any) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, (float, np.floating)):
        return f"{value:.4f}"
    if isinstance(value, (tuple, list)) and all(isinstance(v, float) for v in value):
        return "[" + ", ".join(f"{v:.4f}" for v in value) + "]"
    return str(value)


def _json_default(value: Any) -> Any:
    if isinstance(value, (np.generic, np.ndarray)):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def _write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def _images_csv(ranked: list[ImageResult], rows: np.ndarray, cols: np.ndarray) -> str:
    """One row per image, highest score first; the top window's start is empty without a map."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["path", "label", "score", "percentile", "anomalous", "top_window_y", "top_window_x"])
    for r in ranked:
        where = metrics.top_window(r.window_scores, rows, cols) if r.window_scores is not None else None
        writer.writerow([r.path, r.label, repr(float(r.score)), "" if r.percentile is None else f"{r.percentile:.2f}",
                         "" if r.anomalous is None else str(r.anomalous).lower(), *(where or ("", ""))])
    return buffer.getvalue()


def _pyplot():
    """pyplot on the file-only Agg backend (imported lazily: plotting is optional and slow to import)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save_figure(figure, path: Path, **kwargs: Any) -> None:
    try:
        atomic_write(path, lambda tmp: figure.savefig(tmp, format="png", **kwargs))
    finally:
        _pyplot().close(figure)


def _plot_roc(path: Path, results: list[ImageResult], summary: dict[str, Any], mode: str | None,
              threshold: Threshold | None) -> None:
    """The image ROC, titled with split, scorer and mode, and the threshold's operating point on it."""
    from sklearn.metrics import roc_curve

    labels, scores = np.array([r.label for r in results]), np.array([r.score for r in results])
    fpr, tpr, _ = roc_curve(labels, scores)
    plt = _pyplot()
    figure, ax = plt.subplots(figsize=(5, 5), dpi=100)
    auroc = summary.get("image_auroc")
    ax.plot(fpr, tpr, lw=2, label="AUROC = n/a" if auroc is None else f"AUROC = {auroc:.4f}")
    ax.plot([0, 1], [0, 1], ls="--", color="grey", lw=1, label="chance")
    if threshold is not None:
        flagged = scores >= threshold.value  # Threshold.flags, for every image at once
        at_fpr, at_tpr = flagged[labels == 0].mean(), flagged[labels == 1].mean()
        ax.plot([at_fpr], [at_tpr], "o", color="crimson", ms=8,
                label=f"threshold {threshold.value:.4g} ({threshold.rule})\nFPR {at_fpr:.3f}, TPR {at_tpr:.3f}")
    ax.set(xlim=(0, 1), ylim=(0, 1.01), xlabel="false positive rate", ylabel="true positive rate")
    ax.set_title(f"Image-level ROC: {summary['split']} split, {len(results)} images\n"
                 f"{summary['scorer']} scorer, {mode or 'n/a'} mode", fontsize=11)
    ax.legend(loc="lower right", fontsize=9)
    figure.tight_layout()
    _save_figure(figure, path)


def save_overlay(path: Path, image: np.ndarray, score_map: np.ndarray, scale: ColourScale, title: list[str],
                 mask: np.ndarray | None = None, box: tuple[int, int, int, int] | None = None,
                 flagged: bool | None = None) -> None:
    """One heat-map overlay PNG (written atomically), for a person to read.

    The gray `image` (shrunk to MAX_OVERLAY_SIDE px on its long side) with the image-sized
    `score_map` blended over it on `scale` (at or below scale.low the image's own pixels, so the
    anatomy stays visible), the outline of `mask` (if any), the top window `box` = (y, x, height,
    width) in image pixels boxed; `title` lines above it (the first in red when `flagged`, green
    when not flagged, white when unknown) and a line saying what the colours mean; the colour bar
    (score axis, percentiles of normal windows when calibrated, the threshold) right of it."""
    factor = min(1.0, MAX_OVERLAY_SIDE / max(image.shape))
    size = (max(1, round(image.shape[1] * factor)), max(1, round(image.shape[0] * factor)))
    picture = _blend(_resize(image, size, Image.Resampling.BOX), _resize(score_map, size, Image.Resampling.BOX), scale)
    legend = [f"colours: {scale.rule}", "cyan box: top window" + ("" if box else " (none)")
              + (" · green: lesion mask" if mask is not None and mask.any() else "")]
    if mask is not None and mask.any():
        resized = _resize(mask.astype(np.float32), size, Image.Resampling.NEAREST) > 0.5
        picture[resized & ~ndimage.binary_erosion(resized, iterations=OUTLINE)] = MASK_COLOUR
    if box is not None:
        picture[_box(picture.shape[:2], [round(v * factor) for v in box])] = BOX_COLOUR
    width = size[0] + BAR_WIDTH
    lines = [part for line in title + legend for part in textwrap.wrap(line, max(20, width // 8))]  # ~8 px a letter
    header = LINE_HEIGHT * len(lines) + 8
    height = size[1] + header
    plt, dpi = _pyplot(), 100
    figure = plt.figure(figsize=(width / dpi, height / dpi), dpi=dpi, facecolor="black")
    figure.figimage(picture, xo=0, yo=0, origin="upper")
    first = {True: "#ff6b6b", False: "#7dff7d", None: "white"}[flagged]
    for i, line in enumerate(lines):
        figure.text(4 / width, 1 - (6 + i * LINE_HEIGHT) / height, line, va="top", ha="left", fontsize=9,
                    color=first if i == 0 else "white", fontweight="bold" if i == 0 else "normal")
    _colour_bar(figure.add_axes(((size[0] + 78) / width, 10 / height, 16 / width, (size[1] - 20) / height)), scale)
    _save_figure(figure, path, dpi=dpi)


def heat_map(window_scores: np.ndarray, rows: np.ndarray, cols: np.ndarray, patch: int,
             shape: tuple[int, int]) -> np.ndarray:
    """What an overlay shows (H, W): each pixel the highest score of the scored windows covering it, -inf
    where none does. Unlike the mean (metrics.pixel_map, for the pixel AUROC) it shows the top window
    at its own score, so the brightest colour is the image score and colour past the bar's threshold mark
    means a window past the threshold."""
    out = np.full(shape, -np.inf, dtype=np.float32)
    scores = np.asarray(window_scores, dtype=np.float64)
    order = np.argsort(scores, axis=None)  # ascending, NaN last: later (higher) windows paint over lower ones
    for r, c in zip(*np.unravel_index(order[:np.count_nonzero(np.isfinite(scores))], scores.shape)):
        out[rows[r]:rows[r] + patch, cols[c]:cols[c] + patch] = scores[r, c]
    return out


def _blend(gray: np.ndarray, heat: np.ndarray, scale: ColourScale) -> np.ndarray:
    """(H, W, 3) uint8: the heat's colours over the gray image, each with its own opacity (scale.rgba)."""
    colours = scale.rgba(heat)
    alpha = colours[..., 3:]
    mixed = np.clip(gray, 0, 1)[..., None] * (1 - alpha) + colours[..., :3] * alpha
    return np.rint(mixed * 255).astype(np.uint8)


def _box(shape: tuple[int, int], box: list[int]) -> np.ndarray:
    """The OUTLINE px wide frame of box = (y, x, height, width), clipped to an image of `shape`."""
    y, x, h, w = box
    frame = np.zeros(shape, dtype=bool)
    frame[max(y, 0):y + h, max(x, 0):x + w] = True
    frame[max(y + OUTLINE, 0):max(y + h - OUTLINE, 0), max(x + OUTLINE, 0):max(x + w - OUTLINE, 0)] = False
    return frame


def _colour_bar(ax: Any, scale: ColourScale) -> None:
    """The bar of `scale` as it is drawn over mid-gray: window scores on the right, the threshold and
    (when calibrated) percentiles of the held-out normal windows on the left."""
    values = np.linspace(scale.low, scale.high, 256)
    ax.imshow(_blend(np.full((256, 1), 0.5), values[:, None], scale), origin="lower", aspect="auto",
              extent=(0, 1, scale.low, scale.high))
    ax.set_xticks([])
    scores = ax.twinx()
    scores.set_ylim(scale.low, scale.high)
    scores.set_ylabel("window score", color="white", fontsize=8)
    marks = [(scale.threshold, "threshold")] if scale.threshold is not None else []
    if scale.quantiles is not None:
        near = 0.06 * (scale.high - scale.low)  # keeps a percentile label off the threshold's
        marks += [(float(scale.quantiles[p]), "max" if p == 100 else f"p{p}") for p in BAR_PERCENTILES
                  if scale.low <= scale.quantiles[p] <= scale.high
                  and (scale.threshold is None or abs(scale.quantiles[p] - scale.threshold) > near)]
        ax.set_ylabel("normal windows (percentile)", color="white", fontsize=8)
    ax.set_yticks([value for value, _ in marks], [label for _, label in marks])
    ax.set_ylim(scale.low, scale.high)
    if scale.threshold is not None and scale.low <= scale.threshold <= scale.high:
        ax.axhline(scale.threshold, color="white", lw=2)
    for axis in (ax, scores):
        axis.tick_params(colors="white", labelsize=8)
        for spine in axis.spines.values():
            spine.set_color("white")


def _resize(array: np.ndarray, size: tuple[int, int], resample: Image.Resampling) -> np.ndarray:
    """A float 2-D array resized to size = (width, height) with PIL (mode F); unchanged at its own size."""
    if array.shape[::-1] == size:
        return array
    return np.asarray(Image.fromarray(np.asarray(array, dtype=np.float32)).resize(size, resample))


