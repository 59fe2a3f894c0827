"""swssl-infer over a hostile corpus (tests/hostile.py): every input gets its row, nothing breaks the outputs.

One real `swssl-infer` process scores the whole corpus at once (plus arguments that match nothing);
a second one scores the clean controls alone. The tests below each check one promise of the
contract on those two runs and list every case that breaks it, named by its `why`.
"""
from __future__ import annotations

import csv
import io
import json
import math
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch

from hostile import HEIGHT, WIDTH, Case, build_corpus, normal_image, png16

TIMEOUT_S = 120  # the whole corpus must be done well within this; past it the run counts as hung
SPARSE = b"sparse-16000x16000.npy"
SPARSE_MAX_SECONDS = 20.0  # an all-zero 16000 x 16000 array is found empty without minutes of work
EXTRA_RSS_BYTES = 1 << 30  # ... and without gigabytes: at most this much more memory than the clean run
COLUMNS = ["path", "frame", "score", "percentile", "anomalous", "windows_scored", "windows_skipped", "seconds",
           "status", "best_frame", "message", "warning"]
UNSAFE_START = ("=", "+", "-", "@", "\t", "\r")  # what a spreadsheet takes for a formula (OWASP CSV injection)


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    """A run directory without training (as tests/test_infer.py's `tiny`): random-weight encoder, checkpoint, bank."""
    from swssl.scoring.bank import BANK, build_bank
    from swssl.model.checkpoint import save_checkpoint, weights_digest
    from swssl.config import load_preset
    from swssl.data.datasets import discover, select
    from swssl.model.encoder import build_encoder

    root = tmp_path_factory.mktemp("hostile-model")
    rng = np.random.default_rng(100)
    rows = ["path,label,split"]
    for i in range(5):
        (root / f"train-{i}.png").write_bytes(png16(normal_image(rng)))
        rows.append(f"train-{i}.png,0,train")
    (root / "manifest.csv").write_text("\n".join(rows) + "\n")
    config = load_preset("small").override({"geometry": {"height": HEIGHT, "width": WIDTH, "patch": 32, "step": 16}})
    torch.manual_seed(0)
    encoder = build_encoder(config).eval()
    run = root / "run"
    save_checkpoint(run / "checkpoint.pt", encoder, None, 0, config, [])
    (run / "config.json").write_text(json.dumps(config.to_dict()))
    build_bank(encoder, select(discover(root), "train", 0), config, weights_digest(encoder), 64).save(run / BANK)
    return run


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[Path, list[Case]]:
    folder = tmp_path_factory.mktemp("hostile-corpus")
    return folder, build_corpus(folder)


# --- running the command -------------------------------------------------------------------------


@dataclass
class Invocation:
    """What one swssl-infer process did: exit status, output, and its two result files parsed."""

    returncode: int | None
    stdout: bytes
    stderr: bytes
    seconds: float
    max_rss: int  # bytes
    timed_out: bool
    csv_text: str = ""
    csv_problem: str = ""  # why scores.csv could not be read as the contract says
    csv_rows: list[dict[str, str]] = field(default_factory=list)
    jsonl_raw: bytes = b""
    records: list[dict] = field(default_factory=list)  # the "slide" records of scores.jsonl, in order

    @property
    def output(self) -> str:
        return (self.stdout + self.stderr).decode("utf-8", "backslashreplace")

    def tail(self) -> str:
        last = self.records[-1]["path"] if self.records else None
        return f"(last row written: {last!r})\n{self.output[-3000:]}"


def swssl_infer(model: Path, out: Path, arguments: list[bytes], cwd: Path) -> Invocation:
    """Run the real console command on `arguments` (bytes, so any name passes), killed after TIMEOUT_S.

    os.wait4 gives the peak memory of this one process (not of every child pytest ever had)."""
    command = [os.fsencode(Path(sys.executable).with_name("swssl-infer")), b"--model", os.fsencode(model),
               b"--out", os.fsencode(out), b"--device", b"cpu", b"--quiet", b"--", *arguments]
    out.mkdir(parents=True)
    with open(out.parent / f"{out.name}.stdout", "w+b") as stdout, open(out.parent / f"{out.name}.stderr", "w+b") as stderr:
        started = time.monotonic()
        process = subprocess.Popen(command, stdout=stdout, stderr=stderr, stdin=subprocess.DEVNULL, cwd=cwd)
        timed_out = False
        while True:
            pid, status, usage = os.wait4(process.pid, os.WNOHANG)
            if pid:
                break
            if time.monotonic() - started > TIMEOUT_S:
                timed_out = True
                process.kill()
                pid, status, usage = os.wait4(process.pid, 0)
                break
            time.sleep(0.05)
        process.returncode = os.waitstatus_to_exitcode(status)  # reaped here: tell Popen so
        seconds = time.monotonic() - started
        stdout.seek(0)
        stderr.seek(0)
        result = Invocation(None if timed_out else process.returncode, stdout.read(), stderr.read(), seconds,
                            usage.ru_maxrss * 1024, timed_out)
    _read_results(out, result)
    return result


def _read_results(out: Path, result: Invocation) -> None:
    if (out / "scores.jsonl").is_file():
        result.jsonl_raw = (out / "scores.jsonl").read_bytes()
        for line in result.jsonl_raw.splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                result.records.append({"type": "slide", "path": f"<unparsable jsonl line {line[:80]!r}>"})
                continue
            if record.get("type") == "slide":
                result.records.append(record)
    if not (out / "scores.csv").is_file():
        result.csv_problem = "no scores.csv"
        return
    try:
        with open(out / "scores.csv", newline="", encoding="utf-8") as handle:
            result.csv_text = handle.read()
    except UnicodeDecodeError as exc:
        result.csv_problem = f"scores.csv is not UTF-8 ({exc})"
        result.csv_text = (out / "scores.csv").read_bytes().decode("utf-8", "backslashreplace")
    result.csv_rows = list(csv.DictReader(io.StringIO(result.csv_text, newline="")))


def _file_path(folder: Path, case: Case) -> bytes:
    return os.path.join(os.fsencode(folder), case.name)


def _argument(folder: Path, case: Case) -> bytes:
    """Files by absolute path; arguments that match nothing as given, relative to the corpus folder."""
    return case.name if case.argument else _file_path(folder, case)


def _records_by_case(folder: Path, cases: list[Case], run: Invocation) -> tuple[dict[bytes, list[dict]], list[dict]]:
    """Each case's jsonl records (its "path" back to bytes with os.fsencode), and the records of no case."""
    wanted = {_file_path(folder, case): case.name for case in cases}
    found: dict[bytes, list[dict]] = {case.name: [] for case in cases}
    strays = []
    for record in run.records:
        path = os.fsencode(str(record.get("path")))
        if not os.path.isabs(path):  # an argument reported as given
            path = os.path.join(os.fsencode(folder), path)
        if path in wanted:
            found[wanted[path]].append(record)
        else:
            strays.append(record)
    return found, strays


def _show(name: bytes) -> str:
    return ascii(name)[2:-1]


def _check(problems: list[str]) -> None:
    if problems:
        pytest.fail(f"{len(problems)} problem(s):\n" + "\n".join(problems), pytrace=False)


@pytest.fixture(scope="module")
def hostile_run(model, corpus, tmp_path_factory) -> Invocation:
    """The whole corpus in one invocation, file by file, plus the arguments that match nothing."""
    folder, cases = corpus
    return swssl_infer(model, tmp_path_factory.mktemp("hostile-out") / "out",
                       [_argument(folder, case) for case in cases], cwd=folder)


@pytest.fixture(scope="module")
def clean_run(model, corpus, tmp_path_factory) -> Invocation:
    """The controls alone, plus the all-zero PNG (empty is not a failure: exit status 0)."""
    folder, cases = corpus
    chosen = [case for case in cases if case.control or case.name == b"all-zero.png"]
    return swssl_infer(model, tmp_path_factory.mktemp("clean-out") / "out",
                       [_file_path(folder, case) for case in chosen], cwd=folder)


def _finished(run: Invocation) -> None:
    """The run ended by itself and got as far as writing results; else nothing further is worth checking."""
    if run.timed_out:
        pytest.fail(f"swssl-infer still running after {TIMEOUT_S} s: a hang {run.tail()}", pytrace=False)
    if not run.jsonl_raw:
        pytest.fail(f"swssl-infer wrote no results (exit status {run.returncode}):\n{run.output[-3000:]}", pytrace=False)


# --- the tests -----------------------------------------------------------------------------------


def test_corpus_has_every_kind(tmp_path):
    """The generator itself: enough cases, unique names, known statuses, controls of every format."""
    cases = build_corpus(tmp_path)
    assert len(cases) >= 45
    assert len({case.name for case in cases}) == len(cases)
    assert {case.status for case in cases} <= {"ok", "error", "empty"}
    assert {Path(os.fsdecode(c.name)).suffix for c in cases if c.control} >= {".png", ".jpg", ".tif", ".dcm"}


def test_clean_run_scores_the_controls(clean_run, corpus):
    """The reference for the corpus run: controls ok with a finite score, the all-zero image empty, exit 0."""
    _finished(clean_run)
    folder, cases = corpus
    problems = []
    if clean_run.returncode != 0:
        problems.append(f"exit status {clean_run.returncode}, not 0 (only ok and empty inputs)")
    if "Traceback" in clean_run.output:
        problems.append("a traceback in the output")
    found, strays = _records_by_case(folder, cases, clean_run)
    for case in cases:
        if case.control or case.name == b"all-zero.png":
            statuses = [r.get("status") for r in found[case.name]]
            if statuses != [case.status]:
                problems.append(f"{case.why}: rows with status {statuses}, expected [{case.status!r}]")
    problems += [f"a row of no input: {r.get('path')!r}" for r in strays]
    _check(problems + ([f"output:\n{clean_run.output[-3000:]}"] if problems else []))


def test_every_input_gets_its_rows_with_the_right_status(hostile_run, corpus):
    """One row per input (per frame plus a "volume" row for a multi-frame file), with its status;
    ok has a finite score, error and empty no score and a message (matching the case's regex)."""
    _finished(hostile_run)
    folder, cases = corpus
    found, strays = _records_by_case(folder, cases, hostile_run)
    problems = [f"a row of no input: path {r.get('path')!r} status {r.get('status')!r}" for r in strays]
    for case in cases:
        records = found[case.name]
        if case.frames is None:  # one row, whether it names frame 0 or no frame (the file did not open)
            expected = [(None, case.status)]
            got = [(None if r.get("frame") in (None, 0) else r.get("frame"), r.get("status")) for r in records]
        else:
            expected = [*enumerate(case.frames), ("volume", case.status)]
            got = [(r.get("frame"), r.get("status")) for r in records]
        if got != expected:
            seen = "; ".join(f"frame {r.get('frame')!r} {r.get('status')!r}: {r.get('message')!r}" for r in records[:4])
            seen += f"; ... ({len(records)} rows)" if len(records) > 4 else ""
            problems.append(f"{case.why} [{_show(case.name)}]: rows {got}, expected {expected} -- {seen or 'no row'}")
            continue
        for record in records:
            problems += _record_problems(case, record)
    _check(problems)


def _record_problems(case: Case, record: dict) -> list[str]:
    where = f"{case.why} [{_show(case.name)}] frame {record.get('frame')!r}"
    score, status, message = record.get("score"), record.get("status"), record.get("message")
    if status == "ok":
        if not isinstance(score, float) or not math.isfinite(score):
            return [f"{where}: status ok with score {score!r}"]
        return []
    problems = []
    if score is not None:
        problems.append(f"{where}: status {status} with score {score!r}")
    if not isinstance(message, str) or not message.strip():
        problems.append(f"{where}: status {status} without a message")
    elif case.message and not re.search(case.message, message, re.IGNORECASE):
        problems.append(f"{where}: message {message!r} does not match /{case.message}/")
    return problems


def test_scores_equal_the_plain_copy_and_the_clean_run(hostile_run, clean_run, corpus):
    """A hostile name changes nothing: the score equals that of the same pixels under a plain name, and
    each control scores exactly (the same float) as in the clean run of the controls alone."""
    _finished(hostile_run)
    _finished(clean_run)
    folder, cases = corpus
    found, _ = _records_by_case(folder, cases, hostile_run)
    reference, _ = _records_by_case(folder, cases, clean_run)

    def score(records: dict[bytes, list[dict]], name: bytes) -> float | None:
        scores = [r.get("score") for r in records.get(name, []) if r.get("status") == "ok"]
        return scores[0] if len(scores) == 1 else None

    problems = []
    for case in cases:
        if case.control:
            here, there = score(found, case.name), score(reference, case.name)
            if here is None or here != there:
                problems.append(f"{case.why}: score {here!r} among the hostile inputs, {there!r} in the clean run")
        if case.same_as is not None:
            here, plain = score(found, case.name), score(found, case.same_as)
            if here is None or here != plain:
                problems.append(f"{case.why} [{_show(case.name)}]: score {here!r}, "
                                f"the same pixels as {case.same_as.decode()} scored {plain!r}")
    _check(problems)


def _csv_format_problems(text: str) -> list[str]:
    """The file is exactly what csv.writer (minimal quoting, CRLF) writes for the records csv.reader reads
    back from it: so no field breaks a record, whatever newline, quote or comma it holds."""
    records = list(csv.reader(io.StringIO(text, newline="")))
    again = io.StringIO()
    csv.writer(again, lineterminator="\r\n").writerows(records)
    problems = [] if records[:1] == [COLUMNS] else [f"header {records[:1]}, expected {COLUMNS}"]
    if again.getvalue() != text:
        at = next((i for i, (a, b) in enumerate(zip(again.getvalue(), text)) if a != b), len(text))
        problems.append(f"scores.csv is not csv.writer's CRLF records (at char {at}: {text[max(0, at - 40):at + 40]!r})")
    return problems


def _same_score(cell: str, score: float | None) -> bool:
    try:
        return cell == "" if score is None else float(cell) == score
    except ValueError:
        return False


def test_csv_is_safe_and_mirrors_the_jsonl(hostile_run, corpus):
    """scores.csv: UTF-8, the csv module's CRLF records, one row per jsonl record (same frame, status,
    score), no cell a spreadsheet takes for a formula (a leading "'" neutralises it), non-UTF-8 bytes as
    \\xNN escapes. scores.jsonl: ASCII; its "path" gives back each file's bytes (the row matching checks it)."""
    _finished(hostile_run)
    folder, cases = corpus
    problems = [hostile_run.csv_problem] if hostile_run.csv_problem else []
    if any(byte > 0x7F for byte in hostile_run.jsonl_raw):
        problems.append("scores.jsonl is not ASCII (names must be \\uXXXX escapes)")
    problems += _csv_format_problems(hostile_run.csv_text)
    rows, records = hostile_run.csv_rows, hostile_run.records
    if len(rows) != len(records):
        problems.append(f"{len(rows)} csv rows but {len(records)} jsonl slide records")
    for row, record in zip(rows, records):
        shown = f"csv row {row.get('path')!r} (jsonl {record.get('path')!r})"
        frame = "" if record.get("frame") is None else str(record["frame"])
        if (row.get("frame"), row.get("status")) != (frame, record.get("status")):
            problems.append(f"{shown}: frame/status {row.get('frame')!r}/{row.get('status')!r} in the csv, "
                            f"{frame!r}/{record.get('status')!r} in the jsonl")
        elif not _same_score(row.get("score") or "", record.get("score")):
            problems.append(f"{shown}: score {row.get('score')!r} in the csv, {record.get('score')!r} in the jsonl")
        for column in ("path", "message"):
            if (row.get(column) or "").startswith(UNSAFE_START):
                problems.append(f"{shown}: {column} cell {row[column][:40]!r} starts like a formula")
        path = str(record.get("path"))
        if path.startswith(UNSAFE_START) and row.get("path") != "'" + path:
            problems.append(f"{shown}: expected the csv path {chr(39) + path!r} (neutralised by a leading ')")
        if "\udcff" in path and not re.search(r"\\x[fF][fF]", row.get("path") or ""):
            problems.append(f"{shown}: the byte 0xff is not shown as \\xff in the csv path")
    _check(problems)


def test_output_is_safe_and_the_exit_status_tells_of_failures(hostile_run, corpus):
    """No traceback, no raw ESC/BEL/CR on the terminal (names shown escaped), valid UTF-8; exit status 1
    because some inputs failed, and the failures are listed (the summary counts them)."""
    _finished(hostile_run)
    folder, cases = corpus
    problems = []
    if hostile_run.returncode != 1:
        problems.append(f"exit status {hostile_run.returncode}, expected 1 (some inputs are errors)")
    output = hostile_run.output
    if "Traceback" in output:
        at = output.index("Traceback")
        problems.append(f"a traceback in the output: {output[at:at + 1500]}")
    for stream, raw in (("stdout", hostile_run.stdout), ("stderr", hostile_run.stderr)):
        for char, what in ((b"\x1b", "ESC"), (b"\x07", "BEL"), (b"\r", "CR")):
            if char in raw:
                at = raw.index(char)
                problems.append(f"raw {what} on {stream}: {raw[max(0, at - 60):at + 40]!r}")
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            problems.append(f"{stream} is not UTF-8 (a raw non-UTF-8 name?): {exc}")
    if "\\x1b" not in output:
        problems.append("no escaped ESC (\\x1b) in the output, though failing names hold one")
    errors = sum(r.get("status") == "error" for r in hostile_run.records)
    stdout = hostile_run.stdout.decode("utf-8", "backslashreplace")
    if not re.search(rf"\b{errors}\b[^\n]*fail", stdout, re.IGNORECASE):
        problems.append(f"the summary on stdout does not count the {errors} failure(s): {stdout[-1500:]!r}")
    for case in cases:
        if case.status == "error" and case.frames is None:
            words = max(re.findall(rb"[A-Za-z0-9 =+@.,()\[\]*?-]+", case.name), key=len).decode()
            if words not in output:
                problems.append(f"{case.why}: {words!r} nowhere in the output (failures must be listed)")
    _check(problems)


def test_a_huge_sparse_array_is_cheap(hostile_run, clean_run, corpus):
    """The 16000 x 16000 all-zero array is resized like any image, yet found empty in seconds and
    without gigabytes of memory (peak memory compared with the clean run's, which is mostly torch's);
    the whole corpus is done well within the time limit."""
    _finished(hostile_run)
    folder, cases = corpus
    problems = []
    found, _ = _records_by_case(folder, cases, hostile_run)
    for record in found[SPARSE] or [{}]:
        seconds = record.get("seconds")
        if not isinstance(seconds, (int, float)):
            problems.append(f"the sparse array's row records no wall time in seconds: {record or 'no row'}")
        elif seconds > SPARSE_MAX_SECONDS:
            problems.append(f"the sparse array took {seconds} s (limit {SPARSE_MAX_SECONDS} s)")
    if hostile_run.max_rss > clean_run.max_rss + EXTRA_RSS_BYTES:
        problems.append(f"peak memory {hostile_run.max_rss / 2**30:.2f} GiB, {clean_run.max_rss / 2**30:.2f} GiB "
                        f"in the clean run (at most {EXTRA_RSS_BYTES / 2**30:.0f} GiB more)")
    if hostile_run.seconds > TIMEOUT_S / 2:
        problems.append(f"the corpus took {hostile_run.seconds:.0f} s, not well within {TIMEOUT_S} s")
    _check(problems)
