"""The result log of an inference run: OUT/scores.jsonl (the record) and OUT/scores.csv (the table).

Each result is one line appended to each file with a single write + fsync, jsonl first: a crash
or a full disk leaves at worst a cut last line, which is removed. scores.jsonl is the source of
truth, lossless for any file name (undecodable bytes stay lone surrogates, written as ASCII
`\\udcXX` escapes, so `os.fsencode(record["path"])` gives the name's bytes back). scores.csv is
derived from it: RFC 4180 (CRLF, quoted fields, so a name with CR or LF round-trips through any
csv reader), names readable (`\\xff` escapes) and neutralised for spreadsheets. Later records of
a (path, frame) supersede earlier ones (a retried error); the csv is rewritten from the jsonl
with one row per (path, frame) when a run resumes and when it ends.

Statuses: `ok` (scored), `empty` (no foreground window: nothing to score, no score), `error`
(unreadable, corrupt, unsupported or refused; the message says why).
"""
from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch

from swssl.errors import ConfigError
from swssl.files import append, atomic_write, output_error
from swssl.names import spreadsheet_cell

SCORES_CSV = "scores.csv"
SCORES_JSONL = "scores.jsonl"
HEATMAPS = "heatmaps"
COLUMNS = ("path", "frame", "score", "percentile", "anomalous", "windows_scored", "windows_skipped", "seconds",
           "status", "best_frame", "message", "warning")
VOLUME = "volume"
DONE = ("ok", "empty")  # final results: --resume skips them (errors are retried)
# The settings a resumed run must share with the results already in OUT_DIR.
_RESUME_KEYS = ("encoder_digest", "scorer", "scorer_options", "geometry", "mode", "scale", "threshold")


def _jsonl_records(out_dir: str | Path, kind: str) -> list[dict[str, Any]]:
    """The records of OUT_DIR/scores.jsonl whose "type" is `kind`, oldest first (unparsable lines skipped)."""
    path = Path(out_dir) / SCORES_JSONL
    records = []
    if path.is_file():
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict) and record.get("type") == kind:
                records.append(record)
    return records


def read_results(out_dir: str | Path) -> list[dict[str, Any]]:
    """The latest jsonl record of each (path, frame) in OUT_DIR/scores.jsonl, in first-seen order."""
    latest: dict[tuple[str, str], dict[str, Any]] = {}
    for record in _jsonl_records(out_dir, "slide"):
        path_key, frame = str(record.get("path")), record.get("frame")
        if frame is not None:  # a frame's result supersedes an earlier "cannot open" of its file
            latest.pop((path_key, "None"), None)
        latest[(path_key, str(frame))] = record
    return list(latest.values())


def read_runs(out_dir: str | Path) -> list[dict[str, Any]]:
    """The "run" records of OUT_DIR/scores.jsonl, oldest first."""
    return _jsonl_records(out_dir, "run")


class ResultLog:
    """scores.csv and scores.jsonl in OUT_DIR, one appended, fsynced line per result (the caller holds the lock)."""

    def __init__(self, out_dir: Path, header: dict[str, Any], resume: bool):
        self.out_dir = out_dir
        self.csv_path, self.jsonl_path = out_dir / SCORES_CSV, out_dir / SCORES_JSONL
        self.finished: dict[tuple[str, str], dict[str, Any]] = {}
        try:
            if resume:
                _drop_partial_line(self.jsonl_path)
                runs = read_runs(out_dir)
                if runs:
                    _check_resumable(out_dir, runs[-1], header)
                self.finished = {(str(r.get("path")), str(r.get("frame"))): r for r in read_results(out_dir)
                                 if r.get("status") in DONE}
            else:  # start over: no earlier result may survive beside the new ones
                for path in (self.csv_path, self.jsonl_path, out_dir / "index.html"):
                    path.unlink(missing_ok=True)
                heatmaps = out_dir / HEATMAPS
                if heatmaps.is_dir():
                    for stale in [*heatmaps.glob("*.png"), *heatmaps.glob("*.npy")]:
                        stale.unlink()
            flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT
            self._jsonl = os.open(self.jsonl_path, flags, 0o666)
        except OSError as exc:
            raise output_error(getattr(exc, "filename", None) or self.jsonl_path, exc) from None
        self.rewrite_csv()
        self._csv = os.open(self.csv_path, flags, 0o666)
        append(self._jsonl, _json_line({"type": "run", **header}), self.jsonl_path)

    def write(self, record: dict[str, Any]) -> None:
        """One result: the jsonl line first (the record), then its csv row."""
        append(self._jsonl, _json_line({"type": "slide", **record}), self.jsonl_path)
        append(self._csv, _csv_line(_csv_values(record)), self.csv_path)

    def rewrite_csv(self) -> None:
        """scores.csv from scores.jsonl: one row per (path, frame), the latest, in first-seen order."""
        lines = [_csv_line(COLUMNS), *(_csv_line(_csv_values(r)) for r in read_results(self.out_dir))]
        atomic_write(self.csv_path, lambda tmp: tmp.write_bytes(b"".join(lines)))

    def close(self) -> None:
        for name in ("_csv", "_jsonl"):
            try:
                os.close(getattr(self, name))
            except (OSError, AttributeError):
                pass


def _check_resumable(out_dir: Path, earlier: dict[str, Any], header: dict[str, Any]) -> None:
    earlier = {"mode": "exact", **earlier}  # results written before dense mode existed were exact
    differences = [f"{key} {earlier.get(key)!r} then, {header.get(key)!r} now" for key in _RESUME_KEYS
                   if json.loads(json.dumps(earlier.get(key), default=_json_default))
                   != json.loads(json.dumps(header.get(key), default=_json_default))]
    if differences:
        raise ConfigError(f"{out_dir}: --resume would mix scores made differently ({'; '.join(differences)}); "
                          "use another --out, or drop --resume to start over")


def _drop_partial_line(path: Path) -> None:
    """Cut a line left without its newline by a crash, so the next append starts on a fresh line."""
    if not path.is_file() or path.stat().st_size == 0:
        return
    with open(path, "rb+") as handle:
        handle.seek(-1, os.SEEK_END)
        if handle.read(1) == b"\n":
            return
        handle.seek(0)
        data = handle.read()
        handle.truncate(data.rfind(b"\n") + 1)


def _json_line(record: dict[str, Any]) -> bytes:
    return (json.dumps(record, default=_json_default, allow_nan=False) + "\n").encode("ascii")


def _csv_line(values: Iterable[Any]) -> bytes:
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\r\n").writerow(values)
    return buffer.getvalue().encode("utf-8")


def _csv_values(record: dict[str, Any]) -> list[str]:
    score, seconds, frame, best = (record.get(k) for k in ("score", "seconds", "frame", "best_frame"))
    percentile, anomalous = record.get("percentile"), record.get("anomalous")
    return [spreadsheet_cell(str(record.get("path", ""))), "" if frame is None else str(frame),
            "" if score is None else repr(float(score)), "" if percentile is None else f"{percentile:.2f}",
            "" if anomalous is None else str(bool(anomalous)).lower(), str(record.get("windows_scored", "")),
            str(record.get("windows_skipped", "")), "" if seconds is None else f"{seconds:.3f}",
            str(record.get("status", "")), "" if best is None else str(best),
            spreadsheet_cell(str(record.get("message", ""))), spreadsheet_cell(str(record.get("warning", "")))]


def _json_default(value: Any) -> Any:
    if isinstance(value, (np.generic, np.ndarray)):
        return value.tolist()
    if isinstance(value, (Path, torch.device)):
        return str(value)
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")
