"""Side-by-side table of two swssl-eval report folders (e.g. exact vs dense mode on the same checkpoint).

    swssl-compare runs/demo/eval runs/demo/eval-dense [--split test]
    swssl-compare runs/demo/eval/test-aligned runs/demo/eval/test-aligned-radius1

prints a Markdown table: per scorer, image AUROC, pixel AUROC, lesion hit rate and scoring time
of each folder. A folder is an eval folder (its <split>-<scorer>[-options][-n<N>]/eval.json, one row
per scorer and options; of several --images subsets of the same, the one with the most images) or one
report (its own eval.json, on the row of its scorer, so two reports of a scorer line up whatever their
split, options or mode). With two folders it adds the paired
bootstrap 95 % interval of the image AUROC difference (second minus first, the same images
resampled for both, within each class), so a difference can be told from the noise of a small
test split. Each image AUROC is shown with its own 95 % interval.
"""
from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import numpy as np

from swssl.errors import SwsslError
from swssl.registry import SCORER_NAMES
from swssl.scoring.metrics import bootstrap_aurocs, format_interval, image_auroc

METRICS = (("image AUROC", "image_auroc", "{:.4f}"), ("pixel AUROC", "pixel_auroc", "{:.4f}"),
           ("lesion hit rate", "lesion_hit_rate", "{:.3f}"))


SUBSET = re.compile(r"-n\d+$")  # the --images N part of a report's name (evaluate.report_name)


def read_reports(folder: Path, split: str) -> dict[str, tuple[Path, dict]]:
    """Row name -> (report folder, its eval.json): the report `folder` is, by its scorer; else every report of
    `split` in it, by its name less the split and any --images subset (the largest subset kept)."""
    if (folder / "eval.json").is_file():
        report = _read(folder / "eval.json")
        return {report["scorer"]: (folder, report)}
    reports: dict[str, tuple[Path, dict]] = {}
    for path in sorted(folder.glob(f"{split}-*/eval.json")):
        report = _read(path)
        name = SUBSET.sub("", path.parent.name[len(split) + 1:])
        if name not in reports or report.get("images", 0) > reports[name][1].get("images", 0):
            reports[name] = (path.parent, report)
    return reports


def _read(path: Path) -> dict:
    try:
        report = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise SwsslError(f"{path}: cannot read the report ({exc})") from None
    if not isinstance(report, dict) or "scorer" not in report:
        raise SwsslError(f"{path}: not a swssl-eval report (no scorer)")
    return report


def _row_order(name: str, reports: list[dict[str, tuple[Path, dict]]]) -> tuple[int, str]:
    """Rows by scorer (registry order), then name."""
    scorer = next(found[name][1]["scorer"] for found in reports if name in found)
    return (SCORER_NAMES.index(scorer) if scorer in SCORER_NAMES else len(SCORER_NAMES), name)


def _labels(folders: list[Path]) -> list[str]:
    """Each folder's name, or as many of its last path parts as tell the folders apart (runs/a/eval vs runs/b/eval,
    a/eval/test-aligned vs b/eval/test-aligned)."""
    resolved = [folder.resolve() for folder in folders]
    for depth in range(1, max(len(path.parts) for path in resolved) + 1):
        labels = ["/".join(path.parts[-depth:]) for path in resolved]
        if len(set(labels)) == len(labels):
            return labels
    return [str(folder) for folder in folders]


def comparison_table(folders: list[Path], split: str = "test") -> str:
    """Markdown: one row per scorer, each metric for each folder side by side."""
    reports = [read_reports(folder, split) for folder in folders]
    names = sorted({name for found in reports for name in found}, key=lambda name: _row_order(name, reports))
    if not names:
        raise SwsslError(f"no {split}-<scorer>/eval.json under {', '.join(map(str, folders))}, nor an eval.json "
                         "in it (run swssl-eval first)")
    labels = _labels(folders)
    header = ["scorer"] + [f"{metric} ({label})" for metric, _, _ in METRICS for label in labels]
    header += [f"seconds ({label})" for label in labels]
    if len(folders) == 2:
        header.append("image AUROC difference, 95 % bootstrap interval")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name in names:
        cells = [name]
        row = [found.get(name, (None, {})) for found in reports]
        for _, key, fmt in METRICS:
            for _, report in row:
                value = report.get(key)
                interval = report.get(f"{key}_95ci") or ()
                cells.append("n/a" if value is None else fmt.format(value) + format_interval(interval))
        for _, report in row:
            seconds = report.get("seconds_all_scorers")
            cells.append("n/a" if seconds is None else f"{seconds:.1f}")
        if len(folders) == 2:
            cells.append("n/a" if None in (row[0][0], row[1][0])
                         else _difference_cell(row[0][0] / "images.csv", row[1][0] / "images.csv"))
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
