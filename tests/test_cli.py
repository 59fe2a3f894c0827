"""End to end through the command line on a tiny generated dataset whose anomalies are obvious."""
import json
import os

import pytest
from click.testing import CliRunner

from swssl import cli
from tiny import TINY

def test_train_bank_eval_end_to_end(tiny_data, tmp_path):
    runner = CliRunner()
    run = tmp_path / "run"
    result = runner.invoke(cli.train, ["--preset", "small", "--config", str(tiny_data / "tiny.toml"),
                                       "--data", str(tiny_data), "--out", str(run)])
    assert result.exit_code == 0, result.output
    assert (run / "checkpoint.pt").is_file() and (run / "bank.safetensors").is_file()
    result = runner.invoke(cli.bank, [str(run), "--data", str(tiny_data), "--fp32"])
    assert result.exit_code == 0, result.output
    result = runner.invoke(cli.evaluate, [str(run), "--data", str(tiny_data), "--split", "test"])
    assert result.exit_code == 0, result.output
    for scorer in ("aligned", "global", "reference"):
        report = json.loads((run / "eval" / f"test-{scorer}" / "eval.json").read_text())
        assert report["images"] == 8 and report["abnormal"] == 4
        if scorer != "reference":
            assert report["image_auroc"] > 0.9, (scorer, report)
            assert report["lesion_hit_rate"] > 0.5, (scorer, report)
    assert (run / "eval" / "test-aligned" / "roc.png").is_file()
    assert list((run / "eval" / "test-aligned" / "heatmaps").glob("*.png"))


def test_errors_are_one_line(tiny_data, tmp_path):
    runner = CliRunner()
    (tmp_path / "broken.csv").write_text("path,label,split\nnowhere.png,0,train\n")
    result = runner.invoke(cli.train, ["--data", str(tmp_path / "broken.csv"), "--out", str(tmp_path / "r")])
    assert result.exit_code == 1
    assert result.output.startswith("error: ") and "broken.csv" in result.output
    assert len(result.output.strip().splitlines()) == 1 and "Traceback" not in result.output
    result = runner.invoke(cli.evaluate, [str(tmp_path), "--data", str(tiny_data)])
    assert result.exit_code == 1 and "no checkpoint" in result.output


def test_train_in_dense_mode_builds_and_uses_the_dense_bank(tiny_data, tmp_path):
    (tmp_path / "dense.toml").write_text(TINY.replace("step = 16", "step = 32"))
    runner = CliRunner()
    run = tmp_path / "run"
    result = runner.invoke(cli.train, ["--preset", "small", "--config", str(tmp_path / "dense.toml"),
                                       "--data", str(tiny_data), "--out", str(run), "--mode", "dense"])
    assert result.exit_code == 0, result.output
    assert (run / "bank-dense.safetensors").is_file() and not (run / "bank.safetensors").exists()
    result = runner.invoke(cli.evaluate, [str(run), "--data", str(tiny_data), "--split", "test", "--scorer", "aligned"])
    assert result.exit_code == 0, result.output  # the run's own mode: dense, its dense bank
    report = json.loads((run / "eval-dense" / "test-aligned" / "eval.json").read_text())
    assert report["config"]["geometry"]["mode"] == "dense" and report["image_auroc"] > 0.9, report


def test_a_run_folder_is_resumed_or_overwritten_never_mixed(tiny_data, tmp_path):
    runner = CliRunner()
    run = tmp_path / "run"
    args = ["--preset", "small", "--config", str(tiny_data / "tiny.toml"), "--data", str(tiny_data), "--out", str(run)]
    assert runner.invoke(cli.train, args).exit_code == 0
    stamp = (run / "checkpoint.pt").stat().st_mtime_ns
    again = runner.invoke(cli.train, args)
    assert again.exit_code == 2 and "not empty" in again.output and "--overwrite" in again.output
    assert (run / "checkpoint.pt").stat().st_mtime_ns == stamp  # nothing touched
    resumed = runner.invoke(cli.train, args + ["--resume"])
    assert resumed.exit_code == 0, resumed.output
    assert "nothing to train" in resumed.output and "memory bank up to date" in resumed.output
    (run / "stale.txt").write_text("from the old run")
    replaced = runner.invoke(cli.train, args + ["--overwrite"])
    assert replaced.exit_code == 0, replaced.output
    assert not (run / "stale.txt").exists() and (run / "bank.safetensors").is_file()
    stranger = tmp_path / "stranger"
    stranger.mkdir()
    (stranger / "thesis.tex").write_text("not a run")
    refused = runner.invoke(cli.train, args[:-1] + [str(stranger), "--overwrite"])
    assert refused.exit_code == 2 and "does not look like a run folder" in refused.output
    assert (stranger / "thesis.tex").is_file()


@pytest.mark.parametrize("device", ["gpu", "cuda:x", "cuda"])
def test_every_command_refuses_a_bad_device_in_one_line(tiny_data, tmp_path, device):
    import torch

    if device == "cuda" and torch.cuda.is_available():
        pytest.skip("this machine has a GPU: --device cuda is valid here")
    from swssl.bench.cli import bench
    from swssl.export.cli import export

    runner = CliRunner()
    calls = [(cli.train, ["--data", str(tiny_data), "--out", str(tmp_path / "r")]),
             (cli.bank, [str(tmp_path), "--data", str(tiny_data)]),
             (cli.evaluate, [str(tmp_path), "--data", str(tiny_data)]),
             (cli.infer, [str(tiny_data / "test-0.png"), "--model", str(tmp_path), "--out", str(tmp_path / "o")]),
             (export, [str(tmp_path)])]
    if device != "cuda:x":
        calls.append((bench, ["--smoke", "--out", str(tmp_path / "b")]))
    for command, args in calls:
        result = runner.invoke(command, args + ["--device", device])
        assert result.exit_code == 2, (command.name, result.output)
        lines = result.output.strip().splitlines()
        assert len(lines) == 1 and f"--device {device}" in lines[0] or "Invalid value for '--device'" in result.output, (
            command.name, result.output)
        assert "Traceback" not in result.output


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_written_files_honour_the_umask(tmp_path, umask):
    from swssl.files import atomic_write

    old = os.umask(umask)
    try:
        atomic_write(tmp_path / "result.json", lambda tmp: tmp.write_text("{}"))
    finally:
        os.umask(old)
    assert (tmp_path / "result.json").stat().st_mode & 0o777 == 0o666 & ~umask


def test_one_bad_training_image_is_one_line_naming_it(tiny_data, tmp_path):
    """Training and bank building read through the same strict readers: a cut PNG among good ones stops
    them with one line naming it, for the cached and the lazily read (DataLoader worker) training path."""
    import shutil

    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)
    good = (data / "train-2.png").read_bytes()
    (data / "train-2.png").write_bytes(good[: len(good) // 2])
    runner = CliRunner()
    args = ["--preset", "small", "--config", str(data / "tiny.toml"), "--data", str(data)]
    cached = runner.invoke(cli.train, args + ["--out", str(tmp_path / "run")])
    (data / "lazy.toml").write_text(TINY.replace("workers = 0", "workers = 1"))
    from swssl.training import train as training

    original = training.CACHE_LIMIT_BYTES
    training.CACHE_LIMIT_BYTES = 0  # every image read in the DataLoader worker
    try:
        lazy = runner.invoke(cli.train, ["--preset", "small", "--config", str(data / "lazy.toml"), "--data", str(data),
                                         "--out", str(tmp_path / "lazy")])
    finally:
        training.CACHE_LIMIT_BYTES = original
    for result in (cached, lazy):
        assert result.exit_code == 1, result.output
        message = result.output.split("error: ")[-1]  # after the progress bar (stderr, no newline)
        assert result.output.count("error: ") == 1 and "train-2.png: " in message, result.output
        assert len(message.strip().splitlines()) == 1 and "Traceback" not in result.output, result.output
