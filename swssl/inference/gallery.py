"""index.html: the slides of an inference run, highest score first, with their heat-map overlays.

The header says how the run scored (mode, scorer, geometry), its threshold and how it was chosen,
and the overlays' colour-scale rule (swssl.scoring.colours), so two galleries (exact and dense,
calibrated or not) cannot be mistaken for each other; each card shows the slide's score, its
percentile among the bank's held-out normals, an ANOMALOUS / normal badge and any out-of-domain
warning.

One self-contained page (plain HTML, inline CSS, no script, no network) that a person opens in a
browser from the output folder. Links are relative, so the folder can be moved or copied as a
whole; every path and message is HTML-escaped (undecodable bytes of a name as `\\xff`) and every
link URL-quoted.
"""
from __future__ import annotations

import html
import math
from pathlib import Path
from typing import Any
from urllib.parse import quote

from swssl.files import atomic_write
from swssl.names import readable
from swssl.scoring.calibration import is_raw_score
from swssl.scoring.colours import scale_rule

GALLERY = "index.html"

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 1.5em; background: #fafafa; color: #222; }
h1 { font-size: 1.4em; margin-bottom: 0.2em; }
h2 { font-size: 1.1em; margin-top: 1.6em; }
.meta { color: #555; font-size: 0.9em; }
.grid { display: flex; flex-wrap: wrap; gap: 12px; }
.card { background: #fff; border: 1px solid #ddd; border-radius: 6px; padding: 6px; width: 300px; }
.card img { width: 100%; height: 300px; object-fit: contain; background: #000; display: block; }
.card .noimg { height: 60px; display: flex; align-items: center; justify-content: center; color: #888;
               background: #f0f0f0; font-size: 0.85em; }
.card .score { font-weight: 600; font-size: 1.05em; }
.card .path { font-size: 0.8em; color: #444; word-break: break-all; }
.card .small { font-size: 0.8em; color: #666; }
table { border-collapse: collapse; font-size: 0.9em; }
td, th { border: 1px solid #ddd; padding: 3px 8px; text-align: left; vertical-align: top; }
th { background: #eee; }
.error { color: #a00; }
.run { background: #fff; border: 1px solid #ddd; border-radius: 6px; padding: 6px 12px; font-size: 0.9em; }
.run p { margin: 0.3em 0; }
.badge { display: inline-block; border-radius: 4px; padding: 1px 7px; font-size: 0.8em; font-weight: 700;
         letter-spacing: 0.03em; vertical-align: middle; }
.badge.anomalous { background: #c62828; color: #fff; }
.badge.normal { background: #2e7d32; color: #fff; }
.badge.unknown { background: #bbb; color: #222; }
.card.anomalous { border: 2px solid #c62828; }
.warning { background: #fff3cd; border: 1px solid #e0a800; color: #6b4e00; border-radius: 4px; padding: 3px 6px;
           margin-top: 4px; font-size: 0.85em; font-weight: 600; }
"""


def _esc(value: Any) -> str:
    return html.escape(readable(str(value)), quote=True)


def _href(relative: str) -> str:
    return _esc(quote(relative.replace("\\", "/"), safe="/"))


def _score_text(score: Any) -> str:
    return f"{score:.4g}" if isinstance(score, (int, float)) and math.isfinite(score) else "n/a"


def _sort_key(record: dict[str, Any]) -> float:
    score = record.get("score")
    return -score if isinstance(score, (int, float)) and math.isfinite(score) else math.inf


def _frame_label(record: dict[str, Any]) -> str:
    frame = record.get("frame")
    return "" if frame in (None, "") or record.get("frames") == 1 else f"frame {frame}"


def _frame_text(record: dict[str, Any]) -> str:
    frame = record.get("frame")
    return "" if frame is None else str(frame)


def _percentile_text(record: dict[str, Any]) -> str:
    percentile = record.get("percentile")
    return f"{percentile:.1f}" if isinstance(percentile, (int, float)) and math.isfinite(percentile) else "n/a"


def _percentile_line(record: dict[str, Any]) -> str:
    text = _percentile_text(record)
    return "no percentile (the bank has no calibration)" if text == "n/a" else f"percentile {text} of normals"


def _badge(record: dict[str, Any]) -> str:
    """The decision at the run's threshold, to be seen at a glance."""
    anomalous = record.get("anomalous")
    if anomalous is None:
        return '<span class="badge unknown">no threshold</span>'
    return '<span class="badge anomalous">ANOMALOUS</span>' if anomalous else '<span class="badge normal">normal</span>'


def _warning(record: dict[str, Any]) -> str:
    return f'<div class="warning">&#9888; {_esc(record["warning"])}</div>' if record.get("warning") else ""


def _run_header(run: dict[str, Any], slides: list[dict[str, Any]], empty: int, errors: int) -> list[str]:
    """What the run was: counts, model, how it scored (mode, scorer, geometry), its threshold and colour scale."""
    meta = [f"{len(slides)} slide(s) scored", f"{empty} empty", f"{errors} error(s)"]
    meta += [f"{label} {_esc(run[key])}" for key, label in (("model", "model"), ("backend", "backend"),
                                                            ("device", "device")) if run.get(key) not in (None, "")]
    scoring = [f"<b>{_esc(run[key])}</b> {label}" for key, label in (("mode", "mode"), ("scorer", "scorer"),
                                                                     ("geometry", "geometry"))
               if run.get(key) not in (None, "")]
    if run.get("geometry") == "native" and run.get("scale") not in (None, ""):
        scoring.append(f"scale {_esc(run['scale'])}")
    threshold = run.get("threshold")
    if isinstance(threshold, dict):
        rule = str(threshold.get("rule", ""))
        decided = (f"<b>{_score_text(threshold.get('value'))}</b>" + ("" if is_raw_score(rule) else f" ({_esc(rule)})")
                   + f": {_esc(threshold.get('description', ''))}; a slide scoring at least this is ANOMALOUS")
    else:
        decided = "<b>no threshold</b>: scores get no flag" + (f" ({_esc(run['calibration'])})"
                                                                if run.get("calibration") else "")
    calibrated = any(r.get("percentile") is not None for r in slides)
    return ['<div class="run">', f'<p class="meta">{" &middot; ".join(meta)}</p>',
            f"<p>Scoring: {' &middot; '.join(scoring) or 'n/a'}</p>", f"<p>Threshold: {decided}</p>",
            f"<p>Overlay colours: {_esc(scale_rule(calibrated, True, isinstance(threshold, dict)))}; the cyan box is the slide's "
            "top window (its score is the slide's). Percentile: the share of the bank's held-out normal images "
            "scoring at most as much.</p>", "</div>"]


def _volume_table(volumes: list[dict[str, Any]], anchors: dict[tuple[Any, str], str]) -> list[str]:
    parts = ["<h2>Volumes (score = max over frames)</h2><table><tr><th>#</th><th>score</th><th>percentile</th>"
             "<th>decision</th><th>best frame</th><th>frames</th><th>path</th><th>warning</th></tr>"]
    for rank, record in enumerate(volumes, start=1):
        best = record.get("best_frame")
        anchor = anchors.get((record.get("path"), str(best)))
        best_text = _esc(best) if anchor is None else f'<a href="#{anchor}">{_esc(best)}</a>'
        parts.append(f"<tr><td>{rank}</td><td>{_score_text(record.get('score'))}</td>"
                     f"<td>{_percentile_text(record)}</td><td>{_badge(record)}</td><td>{best_text}</td>"
                     f"<td>{_esc(record.get('frames', ''))}</td><td>{_esc(record.get('path'))}</td>"
                     f"<td>{_warning(record)}</td></tr>")
    parts.append("</table>")
    return parts


def _card(rank: int, record: dict[str, Any], anchor: str) -> str:
    heatmap = record.get("heatmap")
    if heatmap:
        picture = f'<a href="{_href(heatmap)}"><img src="{_href(heatmap)}" loading="lazy" alt="overlay"></a>'
    else:
        picture = '<div class="noimg">no overlay (run with --heatmaps)</div>'
    links = []
    if record.get("score_map"):
        links.append(f'<a href="{_href(record["score_map"])}">score map (.npy)</a>')
    name = Path(str(record.get("path", ""))).name
    css = "card anomalous" if record.get("anomalous") else "card"
    return (f'<div class="{css}" id="{anchor}">{picture}'
            f'<div class="score">#{rank} &nbsp; {_score_text(record.get("score"))} &nbsp; {_badge(record)}</div>'
            f'<div class="small">{_percentile_line(record)}</div>'
            f'{_warning(record)}'
            f'<div class="path" title="{_esc(record.get("path"))}">{_esc(name)} {_esc(_frame_label(record))}</div>'
            f'<div class="small">{_esc(record.get("windows_scored", ""))} windows scored, '
            f'{_esc(record.get("windows_skipped", ""))} background skipped, '
            f'{_esc(record.get("seconds", ""))} s</div>'
            + (f'<div class="small">{" &middot; ".join(links)}</div>' if links else "")
            + "</div>")


def render_gallery(records: list[dict[str, Any]], run: dict[str, Any] | None = None) -> str:
    """The page for the latest result of each (path, frame): the run's header (mode, scorer, threshold, colour
    scale), then slides by score with their decision, then volumes, empty frames, errors."""
    run = run or {}
    slides = sorted((r for r in records if r.get("status") == "ok" and r.get("frame") != "volume"), key=_sort_key)
    volumes = sorted((r for r in records if r.get("status") == "ok" and r.get("frame") == "volume"), key=_sort_key)
    errors = [r for r in records if r.get("status") not in ("ok", "empty")]
    empty = [r for r in records if r.get("status") == "empty"]
    anchors = {(r.get("path"), str(r.get("frame"))): f"s{i}" for i, r in enumerate(slides, start=1)}
    parts = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
             "<title>swssl-infer: slides by anomaly score</title>", f"<style>{_STYLE}</style></head><body>",
             "<h1>Slides by anomaly score</h1>", *_run_header(run, slides, len(empty), len(errors))]
    if volumes:
        parts += _volume_table(volumes, anchors)
    parts.append("<h2>Slides (highest score first)</h2>" if slides else "<p>No slide was scored.</p>")
    if slides:
        parts += ['<div class="grid">', *(_card(rank, record, anchors[(record.get("path"), str(record.get("frame")))])
                                          for rank, record in enumerate(slides, start=1)), "</div>"]
    for title, rows, css in (("Empty (no foreground: not scored)", empty, ""), ("Errors", errors, "error")):
        if rows:
            parts.append(f'<h2 class="{css}">{title}</h2><table><tr><th>path</th><th>frame</th><th>message</th></tr>')
            for record in rows:
                parts.append(f"<tr><td>{_esc(record.get('path'))}</td><td>{_esc(_frame_text(record))}</td>"
                             f'<td class="{css}">{_esc(record.get("message", ""))}</td></tr>')
            parts.append("</table>")
    parts.append("</body></html>\n")
    return "\n".join(parts)


def write_gallery(out_dir: str | Path, records: list[dict[str, Any]], run: dict[str, Any] | None = None) -> Path:
    """Write OUT_DIR/index.html atomically; returns its path."""
    path = Path(out_dir) / GALLERY
    text = render_gallery(records, run)
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))
    return path
