"""swssl-infer --ray: the rows and scores of one process, --resume, a worker killed mid-run, Ray missing."""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

from ray_hooks import KILL_FLAG
from test_infer import invoke, normal_image, rows_of, tiny  # noqa: F401  (the module fixture: a tiny run)

needs_ray = pytest.mark.skipif(importlib.util.find_spec("ray") is None,
                               reason="Ray is not installed (pip install 'swssl[ray]')")
# Scores are compared to a relative 1e-5: a Ray worker runs torch on one thread (OMP_NUM_THREADS=1, Ray's
# default for a 1-CPU actor), this process on all cores, and float32 sums in another order may differ in
# their last bits. Everything else (paths, frames, statuses, window counts) must be equal.
RELATIVE = 1e-5


@pytest.fixture(scope="module")
def local_ray(tmp_path_factory):
    """One local Ray instance of 2 CPUs for the module (run_ray uses a connected one and leaves it running),
    its workers importing tests/ray_hooks.py as they start; the kill flag's path in their environment."""
    import ray

    flag = tmp_path_factory.mktemp("flag") / "kill-once"
    tests = str(Path(__file__).parent)
    saved = {name: os.environ.get(name) for name in ("PYTHONPATH", KILL_FLAG)}
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (tests, saved["PYTHONPATH"]) if p)
    os.environ[KILL_FLAG] = str(flag)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"worker_process_setup_hook": "ray_hooks.kill_on_second_frame"})
    try:
        yield flag
    finally:
        ray.shutdown()
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def slides_with_a_volume_and_a_corrupt_file(root: Path, folder: Path) -> list[Path]:
    """The tiny run's 6 test slides, a 3-frame .npy volume and a corrupt PNG."""
    folder.mkdir(parents=True, exist_ok=True)
    slides = [Path(shutil.copy(root / f"test-{i}.png", folder / f"s{i}.png")) for i in range(6)]
    rng = np.random.default_rng(3)
    np.save(folder / "volume.npy", np.stack([normal_image(rng) for _ in range(3)]).astype(np.float32))
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + rng.bytes(300))
    return [*slides, folder / "volume.npy", folder / "broken.png"]


@pytest.fixture(scope="module")
def baseline(tiny, tmp_path_factory):  # noqa: F811
    """The slides of slides_with_a_volume_and_a_corrupt_file and their results from one process (with heatmaps)."""
    root, run = tiny
    folder = tmp_path_factory.mktemp("baseline")
    slides = slides_with_a_volume_and_a_corrupt_file(root, folder / "slides")
    result = invoke(*slides, "--model", run, "--out", folder / "single", "--heatmaps")
    assert result.exit_code == 1, result.output  # the corrupt file
    return slides, folder / "single"


def by_key(out: Path) -> dict[tuple[str, str], dict[str, str]]:
    rows = rows_of(out)
    keyed = {(r["path"], r["frame"]): r for r in rows}
    assert len(keyed) == len(rows), "a (path, frame) is written twice"
    return keyed


def assert_same_rows(ray_out: Path, single_out: Path) -> None:
    ours, theirs = by_key(ray_out), by_key(single_out)
    assert sorted(ours) == sorted(theirs)
    for key, expected in theirs.items():
        row = ours[key]
        for column in ("status", "windows_scored", "windows_skipped", "best_frame", "anomalous"):
            assert row[column] == expected[column], (key, column)
        if expected["score"]:
            assert float(row["score"]) == pytest.approx(float(expected["score"]), rel=RELATIVE), key
        else:
            assert row["score"] == ""


def slide_records(out: Path) -> list[dict]:
    lines = [json.loads(line) for line in (out / "scores.jsonl").read_text().splitlines()]
    return [r for r in lines if r["type"] == "slide"]


@needs_ray
def test_ray_gives_the_rows_and_scores_of_one_process(tiny, baseline, local_ray, tmp_path):  # noqa: F811
    root, run = tiny
    slides, single = baseline
    spread = tmp_path / "ray"
    result = invoke(*slides, "--model", run, "--out", spread, "--heatmaps", "--ray", "--workers", 2)
    assert result.exit_code == 1, result.output
    assert_same_rows(spread, single)
    rows = by_key(spread)
    assert len(rows) == 6 + 4 + 1  # six slides, three frames and the volume, the corrupt file
    broken = rows[(str(slides[-1]), "")]
    assert broken["status"] == "error" and "1 slide(s) failed" in result.output and "broken.png" in result.output
    assert rows[(str(slides[6]), "volume")]["status"] == "ok"
    names = [sorted(p.name for p in (out / "heatmaps").iterdir()) for out in (spread, single)]
    assert names[0] == names[1] and names[0]
    header = json.loads((spread / "scores.jsonl").read_text().splitlines()[0])
    expected = json.loads((single / "scores.jsonl").read_text().splitlines()[0])
    assert header["type"] == "run" and header["ray"] == {"address": "local", "workers": 2, "gpus_per_worker": 0.0}
    for field in ("backend", "device", "threshold", "calibration", "encoder_digest", "scorer", "mode"):
        assert header[field] == expected[field], field
    cards = [(out / "index.html").read_text().count('class="card"') for out in (spread, single)]
    assert cards[0] == cards[1] >= 6


@needs_ray
def test_ray_resume_skips_finished_files(tiny, local_ray, tmp_path):  # noqa: F811
    root, run = tiny
    a, b, c = (Path(shutil.copy(root / f"test-{i}.png", tmp_path / f"{n}.png")) for i, n in enumerate("abc"))
    broken = tmp_path / "d.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage")
    out = tmp_path / "out"
    assert invoke(a, b, broken, "--model", run, "--out", out).exit_code == 1  # one process; Ray takes it over
    before = by_key(out)
    shutil.copy(root / "test-3.png", broken)  # the broken file is fixed
    second = invoke(a, b, c, broken, "--model", run, "--out", out, "--ray", "--workers", 2, "--resume")
    assert second.exit_code == 0, second.output
    assert "2 file(s) already done" in second.output
    after = by_key(out)
    for key in ((str(a), "0"), (str(b), "0")):
        assert after[key] == before[key]  # not redone: even its time is the first run's
    assert {k: r["status"] for k, r in after.items()} == {(str(p), "0"): "ok" for p in (a, b, c, broken)}
    # In the record too: a and b scored once (the first run), c and the fixed file once (the second).
    assert sorted(r["path"] for r in slide_records(out) if r["status"] == "ok") == sorted(map(str, (a, b, c, broken)))


@needs_ray
def test_a_worker_killed_mid_run_loses_and_duplicates_nothing(tiny, baseline, local_ray, tmp_path):  # noqa: F811
    root, run = tiny
    slides, single = baseline
    spread = tmp_path / "ray"
    local_ray.write_text("the first worker to score its second frame dies")
    result = invoke(*slides, "--model", run, "--out", spread, "--ray", "--workers", 2)
    assert not local_ray.exists(), "no worker was killed"
    assert result.exit_code == 1, result.output  # the corrupt file only
    assert_same_rows(spread, single)
    keys = [(r["path"], str(r["frame"])) for r in slide_records(spread)]
    assert len(keys) == len(set(keys)) == 6 + 4 + 1  # each once, in the record as in the table


def test_ray_missing_is_one_line_saying_what_to_install(tiny, tmp_path, monkeypatch):  # noqa: F811
    root, run = tiny
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray raises ImportError
    result = invoke(root / "test-0.png", "--model", run, "--out", tmp_path / "out", "--ray")
    assert result.exit_code == 2
    assert result.output.strip().count("\n") == 0 and "pip install 'swssl[ray]'" in result.output
    assert not (tmp_path / "out").exists()  # refused before anything is written


def test_the_pool_follows_the_clusters_gpus_else_its_cpus():
    from swssl.inference.ray_run import RayError, pool_size

    assert pool_size({"CPU": 64.0, "GPU": 8.0}, None, 1.0) == 8
    assert pool_size({"CPU": 64.0, "GPU": 8.0}, None, 0.5) == 16
    assert pool_size({"CPU": 6.0}, None, 0.0) == 6
    assert pool_size({"CPU": 6.0, "GPU": 8.0}, 3, 1.0) == 3
    with pytest.raises(RayError, match="no Ray worker fits"):
        pool_size({"CPU": 4.0}, None, 1.0)
