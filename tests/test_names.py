"""Names are data: lossless in the jsonl, round-tripping in the csv, inert in a terminal and a spreadsheet."""
from __future__ import annotations

import csv
import json
import os

import pytest

from swssl.names import for_terminal, readable, spreadsheet_cell
from swssl.inference.results import COLUMNS, ResultLog, read_results

HOSTILE = [b"bad-utf8-\xff\xfe-name.png", b"carriage\rreturn.png", b"line\nfeed.png", b"tab\there.png",
           b"\x1b[2Jclear.png", b"\x1b]0;title\x07.png", b"=cmd|' /C calc'!A0.png", b"+1.png", b"-2.png",
           b"@SUM(1).png", b'quote",comma.png', "\u03b1\u03b2-\u6f22\u5b57.png".encode()]


@pytest.mark.parametrize("name", HOSTILE)
def test_terminal_text_has_no_control_characters(name):
    shown = for_terminal(os.fsdecode(name))
    assert not any(ord(ch) < 32 or 0x7f <= ord(ch) < 0xa0 for ch in shown)
    shown.encode("utf-8")  # printable on any UTF-8 terminal, undecodable bytes included


def test_readable_escapes_undecodable_bytes_only():
    assert readable(os.fsdecode(b"a-\xff.png")) == "a-\\xff.png"
    assert readable("\u03b1.png") == "\u03b1.png"
    assert for_terminal("\x1b[2J") == "\\x1b[2J"


@pytest.mark.parametrize("text,expected", [("=1+1", "'=1+1"), ("+1", "'+1"), ("-1", "'-1"), ("@x", "'@x"),
                                           ("\tx", "'\tx"), ("\rx", "'\rx"), ("a=1", "a=1"), ("", "")])
def test_spreadsheet_cells_are_neutralised(text, expected):
    assert spreadsheet_cell(text) == expected


def test_result_log_round_trips_every_name(tmp_path):
    """Each hostile name: exact in the jsonl (os.fsencode gives the bytes back), one csv record each."""
    log = ResultLog(tmp_path, {"encoder_digest": "x"}, resume=False)
    paths = [os.fsdecode(b"/data/" + name) for name in HOSTILE]
    for i, path in enumerate(paths):
        log.write({"path": path, "frame": 0, "score": float(i), "status": "ok", "message": "=not a formula"})
    log.close()
    records = read_results(tmp_path)
    assert [os.fsencode(r["path"]) for r in records] == [b"/data/" + name for name in HOSTILE]
    (tmp_path / "scores.jsonl").read_bytes().decode("ascii")  # ASCII: \uXXXX escapes, any tool can parse it
    with open(tmp_path / "scores.csv", newline="", encoding="utf-8") as handle:
        rows = list(csv.reader(handle))
    assert rows[0] == list(COLUMNS) and len(rows) == len(HOSTILE) + 1
    for row, path in zip(rows[1:], paths):
        assert row[0] == spreadsheet_cell(path) and row[COLUMNS.index("message")] == "'=not a formula"
        assert not row[0].startswith(("=", "+", "-", "@", "\t", "\r"))


def test_resume_keeps_one_row_per_slide_and_frame(tmp_path):
    """A crash's cut line is dropped; a retried error and a redone slide leave one csv row each."""
    header = {"encoder_digest": "x", "mode": "exact"}
    log = ResultLog(tmp_path, header, resume=False)
    log.write({"path": "a", "frame": 0, "score": 1.0, "status": "ok"})
    log.write({"path": "b", "frame": 0, "score": None, "status": "error", "message": "cut"})
    log.write({"path": "a", "frame": 0, "score": 1.0, "status": "ok"})  # the same slide written twice (a crash)
    log.close()
    with open(tmp_path / "scores.jsonl", "ab") as handle:
        handle.write(b'{"type": "slide", "path": "c", "fra')  # killed mid-line
    log = ResultLog(tmp_path, header, resume=True)
    assert set(log.finished) == {("a", "0")}  # b failed: it is retried
    log.write({"path": "b", "frame": 0, "score": 2.0, "status": "ok"})
    log.close()
    log.rewrite_csv()
    with open(tmp_path / "scores.csv", newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    assert [(r["path"], r["status"]) for r in rows] == [("a", "ok"), ("b", "ok")]
    for line in (tmp_path / "scores.jsonl").read_text().splitlines():
        json.loads(line)
