"""Side-by-side table of two swssl-eval report folders (e.g. exact vs dense mode on the same checkpoint).

    swssl-compare runs/demo/eval runs/demo/eval-dense [--split test]

prints a Markdown table: per scorer, image AUROC, pixel AUROC, lesion hit rate and scoring time
of each folder, read from their <split>-<scorer>/eval.json. With two folders it adds the paired
bootstrap 95 % interval of the image AUROC difference (second minus first, the same images
resampled for both, within each class), so a difference can be told from the noise of a small
test split. Each image AUROC is shown with its own 95 % interval.
"""
from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np

from swssl.errors import SwsslError
from swssl.registry import SCORER_NAMES
from swssl.scoring.metrics import bootstrap_aurocs, format_interval, image_auroc

METRICS = (("image AUROC", "image_auroc", "{:.4f}"), ("pixel AUROC", "pixel_auroc", "{:.4f}"),
           ("lesion hit rate", "lesion_hit_rate", "{:.3f}"))


def read_reports(folder: Path, split: str) -> dict[str, dict]:
    """eval.json of every scorer evaluated in `folder` on `split`, by scorer name."""
    reports = {}
    for path in sorted(folder.glob(f"{split}-*/eval.json")):
        report = json.loads(path.read_text())
        reports[report["scorer"]] = report
    return reports


def _labels(folders: list[Path]) -> list[str]:
    """Each folder's name, or parent/name where names repeat (runs/a/eval vs runs/b/eval)."""
    names = [folder.name for folder in folders]
    if len(set(names)) == len(names):
        return names
    return [f"{folder.resolve().parent.name}/{folder.name}" for folder in folders]


def comparison_table(folders: list[Path], split: str = "test") -> str:
    """Markdown: one row per scorer, each metric for each folder side by side."""
    reports = [read_reports(folder, split) for folder in folders]
    scorers = [name for name in SCORER_NAMES if any(name in r for r in reports)]
    if not scorers:
        raise SwsslError(f"no {split}-<scorer>/eval.json under {', '.join(map(str, folders))} (run swssl-eval first)")
    labels = _labels(folders)
    header = ["scorer"] + [f"{metric} ({label})" for metric, _, _ in METRICS for label in labels]
    header += [f"seconds ({label})" for label in labels]
    if len(folders) == 2:
        header.append("image AUROC difference, 95 % bootstrap interval")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name in scorers:
        cells = [name]
        for _, key, fmt in METRICS:
            for found in reports:
                value = found.get(name, {}).get(key)
                interval = found.get(name, {}).get(f"{key}_95ci") or ()
                cells.append("n/a" if value is None else fmt.format(value) + format_interval(interval))
        for found in reports:
            seconds = found.get(name, {}).get("seconds_all_scorers")
            cells.append("n/a" if seconds is None else f"{seconds:.1f}")
        if len(folders) == 2:
            cells.append(_difference_cell(*(folder / f"{split}-{name}" / "images.csv" for folder in folders)))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def paired_bootstrap(labels: np.ndarray, first: np.ndarray, second: np.ndarray, resamples: int = 2000
                     ) -> tuple[float, float, float]:
    """AUROC(second) - AUROC(first) and its percentile 95 % interval over image resamples (both sides resampled alike)."""
    aurocs = bootstrap_aurocs(labels, first, second, resamples=resamples)
    low, high = np.percentile(aurocs[:, 1] - aurocs[:, 0], [2.5, 97.5])
    return image_auroc(labels, second) - image_auroc(labels, first), float(low), float(high)


def _difference_cell(first: Path, second: Path) -> str:
    if not (first.is_file() and second.is_file()):
        return "n/a"
    a, b = _scores(first), _scores(second)
    common = sorted(a.keys() & b.keys())
    labels = np.array([a[path][0] for path in common])
    if len(set(labels.tolist())) < 2:
        return "n/a"
    delta, low, high = paired_bootstrap(labels, np.array([a[p][1] for p in common]), np.array([b[p][1] for p in common]))
    return f"{delta:+.4f} [{low:+.3f}, {high:+.3f}]"


def _scores(images_csv: Path) -> dict[str, tuple[int, float]]:
    with open(images_csv, newline="") as handle:
        return {row["path"]: (int(row["label"]), float(row["score"])) for row in csv.DictReader(handle)}
