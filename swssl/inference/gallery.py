"""index.html: the slides of an inference run, highest score first, with their heat-map overlays.

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

GALLERY = "index.html"

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 1.5em; background: #fafafa; color: #222; }
h1 { font-size: 1.4em; margin-bottom: 0.2em; }
h2 { font-size: 1.1em; margin-top: 1.6em; }
.meta { color: #555; font-size: 0.9em; }
.grid { display: flex; flex-wrap: wrap; gap: 12px; }
.card { background: #fff; border: 1px solid #ddd; border-radius: 6px; padding: 6px; width: 260px; }
.card img { width: 100%; height: 260px; object-fit: contain; background: #000; display: block; }
.card .noimg { height: 60px; display: flex; align-items: center; justify-content: center; color: #888;
               background: #f0f0f0; font-size: 0.85em; }
.card .score { font-weight: 600; font-size: 1.05em; }
.card .path { font-size: 0.8em; color: #444; word-break: break-all; }
.card .small { font-size: 0.8em; color: #666; }
table { border-collapse: collapse; font-size: 0.9em; }
td, th { border: 1px solid #ddd; padding: 3px 8px; text-align: left; vertical-align: top; }
th { background: #eee; }
.error { color: #a00; }
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
    return "" if frame in (None, "") else f"frame {frame}"


def _frame_text(record: dict[str, Any]) -> str:
    frame = record.get("frame")
    return "" if frame is None else str(frame)


def render_gallery(records: list[dict[str, Any]], run: dict[str, Any] | None = None) -> str:
    """The page for the latest result of each (path, frame): slides by score, then volumes, empty frames, errors."""
    run = run or {}
    slides = sorted((r for r in records if r.get("status") == "ok" and r.get("frame") != "volume"), key=_sort_key)
    volumes = sorted((r for r in records if r.get("status") == "ok" and r.get("frame") == "volume"), key=_sort_key)
    errors = [r for r in records if r.get("status") not in ("ok", "empty")]
    empty = [r for r in records if r.get("status") == "empty"]
    anchors = {(r.get("path"), str(r.get("frame"))): f"s{i}" for i, r in enumerate(slides, start=1)}
    parts = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
             "<title>swssl-infer: slides by anomaly score</title>", f"<style>{_STYLE}</style></head><body>",
             "<h1>Slides by anomaly score</h1>"]
    meta = [f"{len(slides)} slide(s) scored", f"{len(empty)} empty", f"{len(errors)} error(s)"]
    for key, label in (("model", "model"), ("backend", "backend"), ("device", "device"), ("scorer", "scorer"),
                       ("geometry", "geometry"), ("scale", "scale")):
        if run.get(key) not in (None, ""):
            meta.append(f"{label} {_esc(run[key])}")
    parts.append(f'<p class="meta">{" &middot; ".join(meta)}. Highest score first; the heat of each overlay '
                 "is on that slide's own scale (see its caption).</p>")
    if volumes:
        parts.append("<h2>Volumes (score = max over frames)</h2><table><tr><th>#</th><th>score</th>"
                     "<th>best frame</th><th>frames</th><th>path</th></tr>")
        for rank, record in enumerate(volumes, start=1):
            best = record.get("best_frame")
            anchor = anchors.get((record.get("path"), str(best)))
            best_text = _esc(best) if anchor is None else f'<a href="#{anchor}">{_esc(best)}</a>'
            parts.append(f"<tr><td>{rank}</td><td>{_score_text(record.get('score'))}</td><td>{best_text}</td>"
                         f"<td>{_esc(record.get('frames', ''))}</td><td>{_esc(record.get('path'))}</td></tr>")
        parts.append("</table>")
    parts.append("<h2>Slides</h2>" if slides else "<p>No slide was scored.</p>")
    if slides:
        parts.append('<div class="grid">')
        for rank, record in enumerate(slides, start=1):
            anchor = anchors[(record.get("path"), str(record.get("frame")))]
            heatmap = record.get("heatmap")
            if heatmap:
                picture = f'<a href="{_href(heatmap)}"><img src="{_href(heatmap)}" loading="lazy" alt="overlay"></a>'
            else:
                picture = '<div class="noimg">no overlay (run with --heatmaps)</div>'
            links = []
            if record.get("score_map"):
                links.append(f'<a href="{_href(record["score_map"])}">score map (.npy)</a>')
            name = Path(str(record.get("path", ""))).name
            parts.append(
                f'<div class="card" id="{anchor}">{picture}'
                f'<div class="score">#{rank} &nbsp; {_score_text(record.get("score"))}</div>'
                f'<div class="path" title="{_esc(record.get("path"))}">{_esc(name)} {_esc(_frame_label(record))}</div>'
                f'<div class="small">{_esc(record.get("windows_scored", ""))} windows scored, '
                f'{_esc(record.get("windows_skipped", ""))} background skipped, '
                f'{_esc(record.get("seconds", ""))} s</div>'
                + (f'<div class="small">{" &middot; ".join(links)}</div>' if links else "")
                + "</div>")
        parts.append("</div>")
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
