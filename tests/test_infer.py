"""swssl-infer end to end: the same scores as swssl-eval, volumes, errors, resume, background, Ctrl-C, gallery."""
from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from hostile import dicom_bytes
from swssl import cli
from swssl.inference import runner as infer
from swssl.scoring.bank import BANK, build_bank
from swssl.model.checkpoint import save_checkpoint, weights_digest
from swssl.config import load_preset
from swssl.data.datasets import discover, resize_antialiased, select
from swssl.errors import ConfigError
from swssl.windows.geometry import grid, window_max
from swssl.model.encoder import build_encoder
from swssl.inference.slides import find_slides

GEOMETRY = {"height": 128, "width": 96, "patch": 32, "step": 16}


def normal_image(rng, shape=(128, 96)):
    y, x = np.mgrid[:shape[0], :shape[1]]
    smooth = 0.35 + 0.1 * np.sin(y / 9.0 + rng.random() * 6) * np.cos(x / 11.0)
    return np.clip(smooth + 0.02 * rng.normal(size=smooth.shape), 0, 1)


def save_png(path: Path, image: np.ndarray) -> Path:
    Image.fromarray((np.clip(image, 0, 1) * 65535).astype(np.uint16)).save(path)
    return path


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny dataset (manifest) and a run directory: random-weight encoder, checkpoint, fp16 bank.

    No training: what is tested is that inference reproduces evaluation, whatever the weights.
    """
    root = tmp_path_factory.mktemp("tiny")
    rng = np.random.default_rng(0)
    rows = ["path,label,split"]
    for split, count in (("train", 5), ("test", 6)):
        for i in range(count):
            image = normal_image(rng)
            label = int(split == "test" and i % 2 == 1)
            if label:
                y, x = rng.integers(8, 128 - 24), rng.integers(8, 96 - 24)
                image[y:y + 14, x:x + 14] = 1.0
            if split == "test" and i == 4:
                image[:, :40] = 0.0  # empty air: background windows
            save_png(root / f"{split}-{i}.png", image)
            rows.append(f"{split}-{i}.png,{label},{split}")
    (root / "manifest.csv").write_text("\n".join(rows) + "\n")
    config = load_preset("small").override({"geometry": GEOMETRY})
    torch.manual_seed(0)
    encoder = build_encoder(config).eval()
    run = root / "run"
    save_checkpoint(run / "checkpoint.pt", encoder, None, 0, config, [])
    (run / "config.json").write_text(json.dumps(config.to_dict()))
    bank = build_bank(encoder, select(discover(root), "train", 0), config, weights_digest(encoder), 64)
    bank.save(run / BANK)
    return root, run


def invoke(*args, catch=True):
    result = CliRunner().invoke(cli.infer, [str(a) for a in args] + ["--quiet", "--device", "cpu"],
                                catch_exceptions=catch)
    return result


def rows_of(out: Path) -> list[dict[str, str]]:
    with open(out / "scores.csv", newline="") as handle:
        return list(csv.DictReader(handle))


# --- the same scores as swssl-eval, for every backend that runs here --------------------------------


def _export(run: Path, kind: str) -> str | None:
    """Export an artifact with the colleague's swssl-export, if it exists; None on success, else why not."""
    try:
        from swssl.export.cli import export
    except Exception as exc:  # not there yet
        return f"swssl-export is not available ({type(exc).__name__}: {exc})"
    flags = {"onnxruntime": ["--onnx"], "aoti": ["--aoti", "--device", "cpu"]}[kind]
    result = CliRunner().invoke(export, [str(run), *flags])
    return None if result.exit_code == 0 else (result.output.strip().splitlines() or ["failed"])[-1]


EVAL_BATCH = "64"  # the same batches in swssl-eval and swssl-infer: torch's results are then the same floats


@pytest.fixture(scope="module")
def evaluated(tiny, tmp_path_factory):
    """A copy of the run (exports must not change the other tests' run) evaluated by swssl-eval."""
    root, run = tiny
    copy = tmp_path_factory.mktemp("evalrun") / "run"
    shutil.copytree(run, copy)
    result = CliRunner().invoke(cli.evaluate, [str(copy), "--data", str(root), "--split", "test", "--device", "cpu",
                                               "--batch", EVAL_BATCH])
    assert result.exit_code == 0, result.output
    scores = {}
    for scorer in ("aligned", "global", "reference"):
        with open(copy / "eval" / f"test-{scorer}" / "images.csv", newline="") as handle:
            scores[scorer] = {Path(r["path"]).name: float(r["score"]) for r in csv.DictReader(handle)}
    return root, copy, scores


@pytest.mark.parametrize("kind", ["torch", "onnxruntime", "aoti"])
def test_scores_equal_swssl_eval(evaluated, tmp_path, kind):
    from swssl.inference.backends import load_backend

    root, run, expected = evaluated
    try:
        backend, _ = load_backend(run, kind, "cpu")
    except Exception as first:
        why = _export(run, kind)
        try:
            backend, _ = load_backend(run, kind, "cpu")
        except Exception as exc:
            pytest.skip(f"load_backend offers no {kind} backend here: {type(exc).__name__}: {exc} "
                        f"(first try: {first}; export: {why or 'done'})")
    if not str(getattr(backend, "name", "")).startswith(kind):
        pytest.skip(f"load_backend does not offer {kind!r} yet (asked for it, got {getattr(backend, 'name', None)!r})")
    tests = sorted(root.glob("test-*.png"))
    for scorer in ("aligned", "global", "reference"):
        out = tmp_path / scorer
        result = invoke(*tests, "--model", run, "--out", out, "--backend", kind, "--scorer", scorer,
                        "--batch", EVAL_BATCH)
        assert result.exit_code == 0, result.output
        got = {Path(r["path"]).name: float(r["score"]) for r in rows_of(out)}
        assert got.keys() == expected[scorer].keys()
        header = json.loads((out / "scores.jsonl").read_text().splitlines()[0])
        assert header["backend"].startswith(kind) and header["geometry"] == "resize" and header["scorer"] == scorer
        for name, score in got.items():
            if kind == "torch":  # the very same computation as swssl-eval
                assert score == expected[scorer][name], (scorer, name)
            else:
                assert score == pytest.approx(expected[scorer][name], rel=1e-4, abs=1e-5), (scorer, name)


def test_bank_and_eval_embed_with_an_exported_backend(evaluated, tmp_path):
    """swssl-bank and swssl-eval --backend onnxruntime: the bank and the scores of the torch ones, within the
    export's tolerance; the reports say which backend and batch embedded."""
    from swssl.scoring.bank import MemoryBank

    root, evaluated_run, expected = evaluated
    run = tmp_path / "run"
    shutil.copytree(evaluated_run, run, ignore=shutil.ignore_patterns("eval", "export"))
    why = _export(run, "onnxruntime")
    if why:
        pytest.skip(f"no ONNX export here: {why}")
    result = CliRunner().invoke(cli.evaluate, [str(run), "--data", str(root), "--split", "test", "--backend",
                                               "onnxruntime", "--device", "cpu", "--batch", "16"])
    assert result.exit_code == 0, result.output
    for scorer in ("aligned", "global", "reference"):
        report = json.loads((run / "eval" / f"test-{scorer}" / "eval.json").read_text())
        assert report["backend"] == "onnxruntime (CPU)" and report["batch_size"] == 16
        with open(run / "eval" / f"test-{scorer}" / "images.csv", newline="") as handle:
            got = {Path(r["path"]).name: float(r["score"]) for r in csv.DictReader(handle)}
        assert got == pytest.approx(expected[scorer], rel=5e-3, abs=1e-3), scorer
    banks = {}
    for kind in ("torch", "onnxruntime"):
        result = CliRunner().invoke(cli.bank, [str(run), "--data", str(root), "--backend", kind, "--device", "cpu"])
        assert result.exit_code == 0, result.output
        said = result.output.splitlines()
        assert said[0].startswith("backend: ") and kind in said[0] and said[1].startswith("batch: ") and "probed" in said[1]
        banks[kind] = MemoryBank.load(run)
    assert banks["onnxruntime"].encoder_digest == banks["torch"].encoder_digest
    torch.testing.assert_close(banks["onnxruntime"].embeddings.float(), banks["torch"].embeddings.float(),
                               rtol=2e-3, atol=2e-3)


# --- DICOM volumes ---------------------------------------------------------------------------------


def write_volume(path: Path, frames: np.ndarray) -> Path:
    """A multi-frame 16-bit MONOCHROME2 DICOM (a DBT-like volume) written with pydicom."""
    path.write_bytes(dicom_bytes(frames, seed=path.name))
    return path


def test_report_names_follow_the_options_that_differ_from_their_defaults():
    from swssl.scoring.evaluate import report_name
    assert report_name("test", "aligned", {"radius": 0, "top": 1}) == "test-aligned"
    assert report_name("test", "aligned", {"radius": 1, "top": 1}, images=25) == "test-aligned-radius1-n25"
    assert report_name("val", "global", {"k": 3, "top": 1, "coreset_ratio": 0.1}) == "val-global-k3-coreset0.1"
    assert report_name("test", "reference", {}) == "test-reference"
    assert report_name("test", "aligned", {"radius": 0, "top": 1}, threshold="normal-percentile:99") == "test-aligned"
    assert report_name("test", "aligned", {"radius": 0}, 8, "normal-percentile:95") == \
        "test-aligned-threshold-normal-percentile_95-n8"


def test_evaluations_with_other_options_or_a_subset_replace_no_report(evaluated):
    """swssl-eval --radius 1, --images 1: reports of their own beside the default ones, which stay as they were."""
    root, run, _ = evaluated
    before = {p: p.read_bytes() for p in (run / "eval").glob("test-*/eval.json")}
    assert {p.parent.name for p in before} == {"test-aligned", "test-global", "test-reference"}
    for extra in (["--scorer", "aligned", "--radius", "1"], ["--scorer", "global", "--images", "1"]):
        result = CliRunner().invoke(cli.evaluate, [str(run), "--data", str(root), "--device", "cpu", *extra])
        assert result.exit_code == 0, result.output
    assert all(p.read_bytes() == data for p, data in before.items())
    radius = json.loads((run / "eval" / "test-aligned-radius1" / "eval.json").read_text())
    assert radius["scorer_options"]["radius"] == 1 and radius["images"] == 6
    assert json.loads((run / "eval" / "test-global-n1" / "eval.json").read_text())["images"] == 2
    assert f"report: {run / 'eval' / 'test-global-n1'}/" in result.output


def test_dicom_volume_gives_a_row_per_frame_and_the_max(tiny, tmp_path):
    root, run = tiny
    rng = np.random.default_rng(5)
    frames = np.stack([normal_image(rng) for _ in range(3)])
    frames[1, 40:70, 30:60] = 1.0  # a bright lesion in the middle frame
    volume = write_volume(tmp_path / "volume.dcm", (frames * 65535).astype(np.uint16))
    out = tmp_path / "out"
    result = invoke(volume, root / "test-0.png", "--model", run, "--out", out, "--scorer", "global", "--heatmaps")
    assert result.exit_code == 0, result.output
    rows = rows_of(out)
    assert [(Path(r["path"]).name, r["frame"]) for r in rows] == [
        ("volume.dcm", "0"), ("volume.dcm", "1"), ("volume.dcm", "2"), ("volume.dcm", "volume"), ("test-0.png", "0")]
    per_frame = [float(r["score"]) for r in rows[:3]]
    assert float(rows[3]["score"]) == max(per_frame)
    assert rows[3]["best_frame"] == str(int(np.argmax(per_frame))) == "1"
    assert int(rows[3]["windows_scored"]) == sum(int(r["windows_scored"]) for r in rows[:3])
    assert all(r["status"] == "ok" for r in rows)
    # each frame scored like that frame on its own (resized as swssl-eval would)
    from swssl.scoring.bank import MemoryBank
    from swssl.windows.embed import embed_image
    from swssl.scoring.scorers import build_scorer
    from swssl.model.checkpoint import load_encoder

    encoder, config = load_encoder(run)
    scorer = build_scorer("global", MemoryBank.load(run))
    from swssl.data.readers import open_image

    with open_image(volume) as reader:
        for f in range(3):
            image = resize_antialiased(reader.read(frame=f), 128, 96)
            expected = scorer.score(*embed_image(encoder, image, config, 256)).score
            assert per_frame[f] == expected
    heatmaps = sorted(p.name for p in (out / "heatmaps").glob("volume-*.png"))
    assert len(heatmaps) == 3 and all(name.endswith(f"-f{f}.png") for f, name in enumerate(heatmaps))


# --- errors, resume, Ctrl-C ------------------------------------------------------------------------


def test_corrupt_files_are_error_rows_and_the_run_goes_on(tiny, tmp_path):
    root, run = tiny
    slides = tmp_path / "slides"
    (slides / "sub").mkdir(parents=True)
    shutil.copy(root / "test-0.png", slides / "a.png")
    shutil.copy(root / "test-1.png", slides / "sub" / "b.png")
    (slides / "broken.png").write_bytes(np.random.default_rng(0).bytes(500))
    tif = slides / "c.tif"
    import tifffile

    tifffile.imwrite(tif, (normal_image(np.random.default_rng(1)) * 65535).astype(np.uint16), tile=(32, 32))
    (slides / "truncated.tif").write_bytes(tif.read_bytes()[: tif.stat().st_size * 2 // 3])
    (slides / "notes.txt").write_text("not an image")  # in a folder: not a slide, ignored
    odd = tmp_path / "named.xyz"
    odd.write_text("an unsupported file named on the command line")
    out = tmp_path / "out"
    result = invoke(slides, odd, tmp_path / "missing.png", "--model", run, "--out", out)
    assert result.exit_code == 1, result.output
    rows = {Path(r["path"]).name: r for r in rows_of(out)}
    assert set(rows) == {"a.png", "b.png", "c.tif", "broken.png", "truncated.tif", "named.xyz", "missing.png"}
    for good in ("a.png", "b.png", "c.tif"):
        assert rows[good]["status"] == "ok" and float(rows[good]["score"]) > 0
    for bad, words in (("broken.png", "cannot open"), ("truncated.tif", "truncated"),
                       ("named.xyz", "unsupported"), ("missing.png", "not found")):
        assert rows[bad]["status"] == "error" and words in rows[bad]["message"], rows[bad]
        assert rows[bad]["score"] == ""
    assert "4 slide(s) failed" in result.output and "truncated.tif" in result.output
    page = (out / "index.html").read_text()
    assert "Errors" in page and "truncated.tif" in page


def test_resume_skips_finished_slides_and_retries_errors(tiny, tmp_path):
    root, run = tiny
    a, b, c = (shutil.copy(root / f"test-{i}.png", tmp_path / f"{n}.png") for i, n in enumerate("abc"))
    broken = tmp_path / "d.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage")
    out = tmp_path / "out"
    first = invoke(a, b, broken, "--model", run, "--out", out, "--heatmaps")
    assert first.exit_code == 1
    before = rows_of(out)
    assert [r["status"] for r in before] == ["ok", "ok", "error"]
    stamp = {p.name: p.stat().st_mtime_ns for p in (out / "heatmaps").iterdir()}
    shutil.copy(root / "test-3.png", broken)  # the broken file is fixed
    with open(out / "scores.csv", "a") as handle:  # a crash in the middle of writing a line
        handle.write(f"{Path(c).resolve()},0,1.5,3")
    second = invoke(a, b, c, broken, "--model", run, "--out", out, "--heatmaps", "--resume")
    assert second.exit_code == 0, second.output
    after = rows_of(out)
    assert after[:2] == before[:2]  # nothing redone; the partial line is gone
    # One row per slide: the retried error's row is replaced by its new result.
    assert [(Path(r["path"]).name, r["status"]) for r in after[2:]] == [("c.png", "ok"), ("d.png", "ok")]
    assert "1.5" not in {r["score"] for r in after}
    assert all(stamp[name] == (out / "heatmaps" / name).stat().st_mtime_ns for name in stamp)
    third = invoke(a, b, c, broken, "--model", run, "--out", out, "--resume")
    assert third.exit_code == 0 and len(rows_of(out)) == 4 and "4 file(s) already done" in third.output
    page = (out / "index.html").read_text()
    assert page.count('class="card"') == 4 and "Errors" not in page  # the retried error is superseded
    # Resuming with another scorer would mix scores made differently.
    refused = invoke(a, "--model", run, "--out", out, "--resume", "--scorer", "global")
    assert refused.exit_code == 2 and "would mix scores" in refused.output
    # Without --resume the results start over.
    fresh = invoke(a, "--model", run, "--out", out)
    assert fresh.exit_code == 0 and len(rows_of(out)) == 1 and not list((out / "heatmaps").iterdir())


def test_ctrl_c_keeps_finished_results(tiny, tmp_path, monkeypatch):
    root, run = tiny
    calls = []
    real = infer.score_frame

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(infer, "score_frame", interrupted)
    out = tmp_path / "out"
    result = invoke(*sorted(root.glob("test-*.png")), "--model", run, "--out", out)
    assert result.exit_code == 130, result.output
    rows = rows_of(out)
    assert len(rows) == 2 and all(r["status"] == "ok" for r in rows)
    assert (out / "index.html").read_text().count('class="card"') == 2
    lines = (out / "scores.jsonl").read_text().splitlines()
    assert len(lines) == 3 and all(json.loads(line) for line in lines)


# --- background, geometry, discovery, gallery -------------------------------------------------------


@pytest.mark.parametrize("scale", [None, "1"])
def test_background_windows_are_skipped_and_counted(tiny, tmp_path, scale):
    root, run = tiny
    image = np.zeros((256, 192))
    image[:, 120:] = normal_image(np.random.default_rng(3), (256, 72))
    slide = save_png(tmp_path / "half.png", image)
    out = tmp_path / "out"
    extra = [] if scale is None else ["--scale", scale]
    result = invoke(slide, "--model", run, "--out", out, "--heatmaps", *extra)
    assert result.exit_code == 0, result.output
    (row,) = rows_of(out)
    pixels = np.asarray(Image.open(slide), dtype=np.float32) / 65535
    config = load_preset("small").override({"geometry": GEOMETRY})
    if scale is None:  # the run's geometry: resized to 128 x 96
        pixels = resize_antialiased(pixels, 128, 96)
    rows, cols = grid(config.geometry, *pixels.shape)
    foreground = (window_max(torch.from_numpy(pixels), rows, cols, 32) > 0).numpy()
    assert 0 < foreground.sum() < foreground.size
    assert int(row["windows_scored"]) == foreground.sum()
    assert int(row["windows_skipped"]) == foreground.size - foreground.sum()
    record = json.loads((out / "scores.jsonl").read_text().splitlines()[-1])
    maps = np.load(out / record["score_map"])
    np.testing.assert_array_equal(np.isnan(maps), ~foreground)
    assert record["geometry"] == ("resize" if scale is None else "native")
    assert record["scorer"] == ("aligned" if scale is None else "global")
    top = record["top_window"]  # in source pixels: it overlaps the tissue (x >= 120)
    assert top["x"] + top["width"] > 120 and top["width"] == (64 if scale is None else 32)


def test_native_is_the_configured_default_and_config_is_checked(tiny, tmp_path):
    root, run = tiny
    native = tmp_path / "native"
    shutil.copytree(run, native)
    from swssl.scoring.bank import MemoryBank
    from swssl.model.checkpoint import load_encoder

    encoder, config = load_encoder(native)
    config = config.override({"geometry": {"inference": "native"}}).validate()
    save_checkpoint(native / "checkpoint.pt", encoder, None, 0, config, [])
    bank = MemoryBank.load(native)
    bank.config = config
    bank.save(native / BANK)
    out = tmp_path / "out"
    result = invoke(root / "test-0.png", "--model", native, "--out", out)
    assert result.exit_code == 0, result.output
    record = json.loads((out / "scores.jsonl").read_text().splitlines()[-1])
    assert (record["geometry"], record["scorer"], record["scale"]) == ("native", "global", 1.0)
    with pytest.raises(ConfigError, match="geometry.inference"):
        config.override({"geometry": {"inference": "tiles"}}).validate()
    bad = invoke(root / "test-0.png", "--model", run, "--out", out, "--scale", "0.3")
    assert bad.exit_code == 2 and "1/k" in bad.output  # a usage error


def test_find_slides(tmp_path):
    (tmp_path / "a" / "deep").mkdir(parents=True)
    (tmp_path / "a" / "x.png").write_bytes(b"")
    (tmp_path / "a" / "deep" / "y.TIF").write_bytes(b"")
    (tmp_path / "a" / ".hidden.png").write_bytes(b"")
    (tmp_path / "a" / "readme.txt").write_text("no")
    (tmp_path / "a" / "1.2.840.5").write_bytes(b"\0" * 128 + b"DICM" + b"\0" * 16)  # DICOM without a suffix
    (tmp_path / "z.npy").write_bytes(b"")
    (tmp_path / "a" / "out" / "heatmaps").mkdir(parents=True)  # the output folder inside the slides' folder
    (tmp_path / "a" / "out" / "heatmaps" / "x-1234.png").write_bytes(b"")
    files, problems = find_slides([tmp_path / "a", str(tmp_path / "*.npy"), tmp_path / "a" / "x.png",
                                         tmp_path / "nope.png", str(tmp_path / "*.jpg"),
                                         str(tmp_path / "a" / "**" / "*.png")], out_dir=tmp_path / "a" / "out")
    names = [p.name for p in files]
    assert names == ["1.2.840.5", "x.png", "y.TIF", "z.npy"]  # folder order sorted, duplicates dropped
    assert all(p.is_absolute() for p in files)
    assert [(Path(arg).name, why) for arg, why in problems] == [
        ("nope.png", "file not found"), ("*.jpg", "no supported image matches this pattern")]


def test_folder_scans_skip_the_masks_a_manifest_names_and_excluded_files(tmp_path):
    """A dataset folder: its manifest's masks are no slides (in the folder scanned or below the manifest's
    folder), --exclude globs match the name or the path relative to the scanned folder; named files stay."""
    data = tmp_path / "data"
    for name in ("test/a.png", "test/a_mask.png", "test/b.png", "test/old_mask.png", "test/skip/c.png",
                 "masks/test/b_mask.png", "other/d.png"):
        (data / name).parent.mkdir(parents=True, exist_ok=True)
        (data / name).write_bytes(b"")
    (data / "manifest.csv").write_text("path,label,split,mask\ntest/a.png,1,test,test/a_mask.png\n"
                                       "test/b.png,1,test,masks/test/b_mask.png\nother/d.png,0,test,\n")

    def names(*arguments, exclude=()):
        files, problems = find_slides(arguments, exclude=exclude)
        assert not problems, problems
        return [p.relative_to(data).as_posix() for p in files]

    assert names(data / "test") == ["test/a.png", "test/b.png", "test/old_mask.png", "test/skip/c.png"]
    assert names(data) == ["other/d.png", "test/a.png", "test/b.png", "test/old_mask.png", "test/skip/c.png"]
    assert names(str(data / "test" / "*.png")) == ["test/a.png", "test/b.png", "test/old_mask.png"]
    assert names(data / "test", exclude=["*_mask.png", "skip"]) == ["test/a.png", "test/b.png"]
    assert names(data, exclude=["test/skip/*", "other"]) == ["test/a.png", "test/b.png", "test/old_mask.png"]
    assert names(data / "test" / "a_mask.png") == ["test/a_mask.png"]  # named on the command line: tried
    (data / "manifest.csv").write_text("path,label,split\ntest/a.png,0,test\n")  # no mask column: no masks
    assert "test/a_mask.png" in names(data / "test")


def test_infer_takes_exclude_patterns(tiny, tmp_path):
    root, run = tiny
    slides = tmp_path / "slides"
    slides.mkdir()
    for name in ("test-0.png", "test-1.png"):
        shutil.copy(root / name, slides / name)
    shutil.copy(root / "test-1.png", slides / "test-1_mask.png")
    result = invoke(slides, "--model", run, "--out", tmp_path / "out", "--exclude", "*_mask.png")
    assert result.exit_code == 0, result.output
    assert sorted(Path(r["path"]).name for r in rows_of(tmp_path / "out")) == ["test-0.png", "test-1.png"]


def test_the_run_of_an_artifact(tmp_path):
    from swssl.inference.backends import source_run

    run = tmp_path / "run"
    (run / "export" / "onnx").mkdir(parents=True)
    (run / "checkpoint.pt").write_bytes(b"")
    elsewhere = tmp_path / "elsewhere" / "onnx" / "model.onnx"
    assert source_run(run / "export" / "onnx" / "model.onnx", {}) == run
    assert source_run(run / "export" / "model.pt2", {}) == run
    assert source_run(elsewhere, {"source": {"run_dir": str(run)}}) == run  # exported with --out
    assert source_run(elsewhere, {"source": {"run_dir": str(tmp_path / "gone")}}) is None


def test_an_artifact_exported_elsewhere_scores_with_its_runs_bank(evaluated, tmp_path):
    """swssl-export --out DIR writes the artifact outside the run; --model DIR/onnx/model.onnx finds the
    run (and its bank) through the manifest and scores as the run directory itself does."""
    from swssl.export.cli import export

    root, run, _ = evaluated
    for where in ([], ["--out", str(tmp_path / "elsewhere")]):  # in the run (for comparison) and elsewhere
        made = CliRunner().invoke(export, [str(run), "--onnx", *where])
        assert made.exit_code == 0, made.output
    artifact = tmp_path / "elsewhere" / "onnx" / "model.onnx"
    slide = root / "test-1.png"
    for model, out in ((artifact, tmp_path / "a"), (run, tmp_path / "b")):
        result = invoke(slide, "--model", model, "--out", out, "--backend", "onnxruntime")
        assert result.exit_code == 0, result.output
    assert rows_of(tmp_path / "a")[0]["score"] == rows_of(tmp_path / "b")[0]["score"]


def test_gallery_is_sorted_escaped_and_relative(tmp_path):
    from swssl.inference.gallery import render_gallery

    records = [
        {"path": "/s/low.png", "frame": 0, "score": 1.0, "status": "ok", "heatmap": "heatmaps/low.png"},
        {"path": "/s/<b>&\"high\".png", "frame": 0, "score": 9.0, "status": "ok", "heatmap": "heatmaps/h i#gh.png"},
        {"path": "/s/mid.png", "frame": 0, "score": 5.0, "status": "ok"},
        {"path": "/s/vol.dcm", "frame": "volume", "score": 4.0, "best_frame": 2, "status": "ok", "frames": 3},
        {"path": "/s/bad.png", "frame": None, "score": None, "status": "error", "message": "<script>x</script>"},
    ]
    page = render_gallery(records, {"backend": "torch"})
    assert page.index("high") < page.index("mid.png") < page.index("low.png")
    assert "<b>&" not in page and "&lt;b&gt;&amp;&quot;high&quot;.png" in page
    assert "<script>" not in page and "&lt;script&gt;" in page
    assert 'src="heatmaps/h%20i%23gh.png"' in page and 'src="heatmaps/low.png"' in page
    assert "http" not in page.replace('charset="utf-8"', "")  # nothing fetched from the network
    assert "no overlay" in page and "Volumes" in page and "/s/vol.dcm" in page


# --- one writer, full disks, kill -9, damaged banks ------------------------------------------------


SWSSL_INFER = str(Path(sys.executable).with_name("swssl-infer"))


def run_infer(*args, timeout=120, **kwargs) -> subprocess.CompletedProcess:
    """The real command in its own process (what an operator runs), never a hang."""
    return subprocess.run([SWSSL_INFER, *map(str, args), "--quiet", "--device", "cpu"], capture_output=True,
                          text=True, timeout=timeout, **kwargs)


def many_slides(root: Path, folder: Path, count: int) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    return [shutil.copy(root / f"test-{i % 6}.png", folder / f"s{i:03d}.png") for i in range(count)]


def test_a_second_writer_is_refused_at_once(tiny, tmp_path):
    root, run = tiny
    out = tmp_path / "out"
    assert invoke(root / "test-0.png", "--model", run, "--out", out).exit_code == 0
    before = (out / "scores.jsonl").read_bytes()
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from pathlib import Path; "
                               "from swssl.files import FolderLock; lock = FolderLock(Path(sys.argv[1]), 'swssl-infer'); "
                               "print('held', flush=True); time.sleep(60)", str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        second = run_infer(root / "test-1.png", "--model", run, "--out", out, timeout=60)
    finally:
        holder.kill()
        holder.wait()
    assert second.returncode == 2 and f"PID {holder.pid}" in second.stderr and str(out) in second.stderr
    assert "Traceback" not in second.stderr and len(second.stderr.strip().splitlines()) == 1
    assert (out / "scores.jsonl").read_bytes() == before  # the first run's results untouched


def test_kill_9_then_resume_loses_and_duplicates_nothing(tiny, tmp_path):
    root, run = tiny
    slides = many_slides(root, tmp_path / "slides", 60)
    out, clean = tmp_path / "out", tmp_path / "clean"
    assert run_infer(*slides, "--model", run, "--out", clean).returncode == 0
    expected = {(r["path"], r["frame"]): r["score"] for r in infer.read_results(clean)}
    victim = subprocess.Popen([SWSSL_INFER, *map(str, slides), "--model", str(run), "--out", str(out), "--quiet",
                               "--device", "cpu"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and victim.poll() is None:
        if len(infer.read_results(out)) >= 3:
            break
        time.sleep(0.005)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    killed_with = len(infer.read_results(out))
    assert 3 <= killed_with < len(slides), "the run was not killed mid-way"
    resumed = run_infer(*slides, "--model", run, "--out", out, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert f"{killed_with} file(s) already done" in resumed.stdout
    rows = rows_of(out)
    assert sorted(r["path"] for r in rows) == sorted(str(p.resolve()) for p in slides)  # each once
    assert {(r["path"], r["frame"]): r["score"] for r in infer.read_results(out)} == expected


def test_full_disk_is_one_line_and_keeps_finished_rows(tiny, tmp_path):
    """A tmpfs a few pages large fills up mid-run: exit status 2, one line naming the file, whole rows only."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root; the full-disk path is then untested here")
    root, run = tiny
    slides = many_slides(root, tmp_path / "slides", 200)
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(disk)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({mounted.stderr.decode().strip()})")
    try:
        full = run_infer(*slides, "--model", run, "--out", disk / "out")
        assert full.returncode == 2, full.stderr
        assert "Traceback" not in full.stderr and "No space left on device" in full.stderr
        errors = [line for line in full.stderr.splitlines() if not line.startswith(("backend: ", "batch: ", "threshold: ", "warning: "))]
        assert len(errors) == 1 and errors[0].startswith("error: ") and "scores." in errors[0], full.stderr
        lines = (disk / "out" / "scores.jsonl").read_bytes().split(b"\n")
        assert lines[-1] == b"" and all(json.loads(line) for line in lines[:-1])  # no cut line
        rows = rows_of(disk / "out")
        assert 0 < len(rows) < len(slides) and all(r["status"] == "ok" and r["score"] for r in rows)
        (disk / "filler").write_bytes(b"")  # and a disk full before the first row: one line too
        with open(disk / "filler", "wb") as handle:
            try:
                handle.write(b"\0" * (1 << 20))
            except OSError:
                pass
        start = run_infer(slides[0], "--model", run, "--out", disk / "out2")
        assert start.returncode == 2 and "Traceback" not in start.stderr and "No space left" in start.stderr
    finally:
        subprocess.run(["umount", str(disk)], check=False)


def test_unwritable_heatmaps_make_the_exit_status_2_and_are_listed(tiny, tmp_path):
    root, run = tiny
    out = tmp_path / "out"
    out.mkdir()
    (out / "heatmaps").write_text("a file where the heatmap folder should be")
    result = invoke(root / "test-0.png", root / "test-1.png", "--model", run, "--out", out, "--heatmaps")
    assert result.exit_code == 2, result.output
    assert "2 output(s) could not be written" in result.output and "heatmap of" in result.output
    rows = rows_of(out)
    assert [r["status"] for r in rows] == ["ok", "ok"] and all("no heatmap" in r["message"] for r in rows)


def test_damaged_bank_is_refused(tiny, tmp_path):
    from swssl.scoring.bank import BankDamagedError, MemoryBank

    root, run = tiny
    damaged = tmp_path / "run"
    shutil.copytree(run, damaged)
    data = bytearray((damaged / BANK).read_bytes())
    data[-100] ^= 0x10  # one bit of one embedding
    (damaged / BANK).write_bytes(bytes(data))
    with pytest.raises(BankDamagedError, match="checksum.*swssl-bank RUN_DIR"):
        MemoryBank.load(damaged / BANK)
    result = run_infer(root / "test-0.png", "--model", damaged, "--out", tmp_path / "out")
    assert result.returncode == 1 and "damaged" in result.stderr and "Traceback" not in result.stderr
    bank = MemoryBank.load(run / BANK)
    bank.embeddings[0, 0, 0, :3] = float("nan")
    bank.save(damaged / BANK)  # a consistent checksum, but NaN inside
    with pytest.raises(BankDamagedError, match="3 NaN/inf"):
        MemoryBank.load(damaged / BANK)


def test_progress_within_a_frame_counts_grid_windows_and_a_bar_shows_them(monkeypatch):
    """Windows done = grid positions up to the last one embedded (background included), so the count ends at the
    grid's total; the frame's bar gets that total, waits SLIDE_BAR_DELAY before showing, and --quiet hides it."""
    from types import SimpleNamespace

    from swssl.inference import runner
    from swssl.windows.tiling import Chunk, WindowGrid

    class Source:  # a 3 x 4 grid whose foreground windows come in three chunks; position 11 is background
        grid = WindowGrid(np.arange(3), np.arange(4), 1)
        foreground = np.ones((3, 4), bool)

        def chunks(self, encode, every_window):
            for positions in ([0, 1, 2, 3, 4], [5, 6], [8, 9, 10]):
                index = torch.tensor(positions)
                yield Chunk(index // 4, index % 4, torch.zeros(len(positions), 2))

    reports = []
    assert len(list(runner._Reporting(Source(), lambda *a: reports.append(a), every=0).chunks(None, False))) == 3
    assert reports == [(0, 12), (5, 12), (7, 12), (11, 12), (12, 12)]

    class FakeBar:
        made = []

        def __init__(self, **kwargs):
            self.kwargs, self.n, self.closed = kwargs, 0, False
            FakeBar.made.append(self)

        def update(self, count):
            self.n += count

        def close(self):
            self.closed = True

    monkeypatch.setattr(runner, "tqdm", FakeBar)
    for disabled in (False, True):
        with runner._frame_bar(SimpleNamespace(disable=disabled), "big.tif") as progress:
            for done, total in reports:
                progress(done, total)
        bar = FakeBar.made[-1]
        assert bar.kwargs["total"] == 12 and bar.n == 12 and bar.closed and bar.kwargs["desc"] == "big.tif"
        assert bar.kwargs["delay"] == runner.SLIDE_BAR_DELAY > 0 and bar.kwargs["disable"] is disabled
