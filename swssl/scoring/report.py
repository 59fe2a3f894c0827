"""The outputs of an evaluation: a summary of the metrics, and the files a person reads.

`summarise` turns per-image results into the numbers (image AUROC, pixel AUROC, lesion hit
rate); `write_report` writes them with what is needed to trust them: every image's score
(images.csv), the ROC curve, and heat-map overlays of the highest-scored images, so one can
see *where* the model looks, not only how well it ranks. Every file is written atomically.

Mask convention: `mask=None` means "no mask file". A normal image needs none: all its pixels
count as normal in the pixel AUROC. An abnormal image without a mask takes no part in the pixel
metrics (where its lesion lies is unknown), so do not give it an all-False mask.
"""
from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from swssl.scoring import metrics
from swssl.files import atomic_write
from swssl.names import safe_name

MAX_OVERLAY_SIDE = 1024  # px, long side of a heat-map overlay
OVERLAY_ALPHA = 0.4
OVERLAY_CMAP = "jet"


@dataclass
class ImageResult:
    path: str
    label: int  # 0 normal, 1 abnormal
    score: float
    window_scores: np.ndarray | None  # (R, C), NaN = background; None for scorers without a map
    image: np.ndarray | None = None  # (H, W) float32 in [0, 1], for overlays (may be dropped to save memory)
    mask: np.ndarray | None = None  # (H, W) bool; None = no mask file (see the module docstring)


def summarise(results: list[ImageResult], rows: np.ndarray, cols: np.ndarray, patch: int,
              split: str, scorer: str) -> dict[str, Any]:
    """The metrics of one split and scorer as a JSON-ready dict.

    pixel_auroc pools the images with a map that are normal or have a mask (None when no
    image has both a mask and a map, or no lesion pixel is among them); lesion_hit_rate is hits /
    lesions over the abnormal images with a mask and a map (None when they hold no lesion).
    """
    annotated = [r for r in results if r.mask is not None and r.window_scores is not None]
    shape = annotated[0].mask.shape if annotated else None  # every image is at the run's geometry
    pooled = [r for r in results if r.window_scores is not None and (r.mask is not None or r.label == 0)]
    maps = (metrics.pixel_map(r.window_scores, rows, cols, patch, shape) for r in pooled)
    masks = (np.zeros(shape, dtype=bool) if r.mask is None else r.mask for r in pooled)
    hits = [metrics.lesion_hits(r.window_scores, rows, cols, patch, r.mask) for r in annotated if r.label == 1]
    hit, lesions = sum(h for h, _ in hits), sum(n for _, n in hits)
    return {
        "split": split,
        "scorer": scorer,
        "images": len(results),
        "abnormal": sum(1 for r in results if r.label == 1),
        "image_auroc": metrics.image_auroc([r.label for r in results], [r.score for r in results]),
        "image_auroc_95ci": metrics.auroc_interval([r.label for r in results], [r.score for r in results]),
        "pixel_auroc": metrics.pixel_auroc(maps, masks) if annotated else None,
        "lesion_hit_rate": hit / lesions if lesions else None,
        "lesions": lesions,
    }


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
                 cols: np.ndarray, patch: int, overlays: int = 8, extra: dict[str, Any] | None = None) -> None:
    """Write eval.json, images.csv, roc.png (both classes only) and heatmaps/ into `out_dir`."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    ranked = sorted(results, key=lambda r: r.score, reverse=True)
    text = json.dumps({**summary, **(extra or {})}, indent=2, default=_json_default) + "\n"
    _write_text(out_dir / "eval.json", text)
    _write_text(out_dir / "images.csv", _images_csv(ranked, rows, cols))
    # A report written again into the same folder must not keep the last run's figures.
    for stale in [out_dir / "roc.png", *out_dir.glob("heatmaps/[0-9][0-9]-*.png")]:
        stale.unlink(missing_ok=True)
    if len({r.label for r in results}) == 2:
        _plot_roc(out_dir / "roc.png", results, summary.get("image_auroc"))
    shown = [r for r in ranked if r.window_scores is not None and r.image is not None][:overlays]
    if shown:
        _plot_overlays(out_dir / "heatmaps", shown, rows, cols, patch)


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
    writer.writerow(["path", "label", "score", "top_window_y", "top_window_x"])
    for r in ranked:
        where = metrics.top_window(r.window_scores, rows, cols) if r.window_scores is not None else None
        writer.writerow([r.path, r.label, repr(float(r.score)), *(where or ("", ""))])
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


def _plot_roc(path: Path, results: list[ImageResult], auroc: float | None) -> None:
    from sklearn.metrics import roc_curve

    fpr, tpr, _ = roc_curve([r.label for r in results], [r.score for r in results])
    plt = _pyplot()
    figure, ax = plt.subplots(figsize=(5, 5), dpi=100)
    label = "AUROC = n/a" if auroc is None else f"AUROC = {auroc:.4f}"
    ax.plot(fpr, tpr, lw=2, label=label)
    ax.plot([0, 1], [0, 1], ls="--", color="grey", lw=1, label="chance")
    ax.set(xlim=(0, 1), ylim=(0, 1.01), xlabel="false positive rate", ylabel="true positive rate",
           title=f"Image-level ROC ({len(results)} images)")
    ax.legend(loc="lower right")
    figure.tight_layout()
    _save_figure(figure, path)


def _plot_overlays(folder: Path, shown: list[ImageResult], rows: np.ndarray, cols: np.ndarray, patch: int) -> None:
    """Heat maps over the images, on one colour scale across them so their heat is comparable."""
    maps = [metrics.pixel_map(r.window_scores, rows, cols, patch, r.image.shape) for r in shown]
    low = min(float(m.min()) for m in maps)
    high = max(float(m.max()) for m in maps)
    high = high if high > low else low + 1.0
    for rank, (result, score_map) in enumerate(zip(shown, maps), start=1):
        caption = (f"#{rank}  score {result.score:.4g}  label {result.label}\n"
                   f"{Path(result.path).name}\nheat scale {low:.4g} .. {high:.4g}")
        save_overlay(folder / f"{rank:02d}-{safe_name(Path(result.path).stem)}.png", result.image, score_map,
                     low, high, caption, result.mask)


def save_overlay(path: Path, image: np.ndarray, score_map: np.ndarray, low: float, high: float, caption: str,
                 mask: np.ndarray | None = None) -> None:
    """One heat-map overlay PNG (written atomically): `score_map` (image-sized) on the colour scale
    low..high over the gray `image`, shrunk to MAX_OVERLAY_SIDE px on its long side, with `caption`
    top left and the outline of `mask` (if any) in green."""
    plt = _pyplot()
    scale = min(1.0, MAX_OVERLAY_SIDE / max(image.shape))
    size = (max(1, round(image.shape[1] * scale)), max(1, round(image.shape[0] * scale)))
    dpi = 100
    figure = plt.figure(figsize=(size[0] / dpi, size[1] / dpi), dpi=dpi)
    ax = figure.add_axes((0, 0, 1, 1))
    ax.set_axis_off()
    ax.imshow(_resize(image, size, Image.Resampling.BOX), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    ax.imshow(_resize(score_map, size, Image.Resampling.BOX), cmap=OVERLAY_CMAP, vmin=low, vmax=high,
              alpha=OVERLAY_ALPHA, interpolation="nearest")
    if mask is not None and mask.any():
        ax.contour(_resize(mask.astype(np.float32), size, Image.Resampling.NEAREST), levels=[0.5], colors="lime",
                   linewidths=1.5)
    ax.text(0.01, 0.99, caption, transform=ax.transAxes, va="top", ha="left", fontsize=9, color="white",
            bbox={"facecolor": "black", "alpha": 0.6, "edgecolor": "none"})
    _save_figure(figure, path, dpi=dpi)


def _resize(array: np.ndarray, size: tuple[int, int], resample: Image.Resampling) -> np.ndarray:
    """A float 2-D array resized to size = (width, height) with PIL (mode F); unchanged at its own size."""
    if array.shape[::-1] == size:
        return array
    return np.asarray(Image.fromarray(np.asarray(array, dtype=np.float32)).resize(size, resample))


