"""Side-by-side table of two swssl-eval report folders (e.g. exact vs dense mode on the same checkpoint).

    swssl-compare runs/demo/eval runs/demo/eval-dense [--split test]

prints a Markdown table: per scorer, image AUROC, pixel AUROC, lesion hit rate and scoring time
of each folder, read from their <split>-<scorer>/eval.json.
"""
from __future__ import annotations

import json
from pathlib import Path

from swssl.errors import SwsslError

METRICS = (("image AUROC", "image_auroc", "{:.4f}"), ("pixel AUROC", "pixel_auroc", "{:.4f}"),
           ("lesion hit rate", "lesion_hit_rate", "{:.3f}"))


def read_reports(folder: Path, split: str) -> dict[str, dict]:
    """eval.json of every scorer evaluated in `folder` on `split`, by scorer name."""
    reports = {}
    for path in sorted(folder.glob(f"{split}-*/eval.json")):
        report = json.loads(path.read_text())
        reports[report["scorer"]] = report
    return reports


def comparison_table(folders: list[Path], split: str = "test") -> str:
    """Markdown: one row per scorer, each metric for each folder side by side."""
    reports = [read_reports(folder, split) for folder in folders]
    scorers = [name for name in ("aligned", "global", "reference") if any(name in r for r in reports)]
    if not scorers:
        raise SwsslError(f"no {split}-<scorer>/eval.json under {', '.join(map(str, folders))} (run swssl-eval first)")
    labels = [folder.name for folder in folders]
    header = ["scorer"] + [f"{metric} ({label})" for metric, _, _ in METRICS for label in labels]
    header += [f"seconds ({label})" for label in labels]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name in scorers:
        cells = [name]
        for _, key, fmt in METRICS:
            for found in reports:
                value = found.get(name, {}).get(key)
                cells.append("n/a" if value is None else fmt.format(value))
        for found in reports:
            seconds = found.get(name, {}).get("seconds_all_scorers")
            cells.append("n/a" if seconds is None else f"{seconds:.1f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
