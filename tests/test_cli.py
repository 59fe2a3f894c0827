"""End to end through the command line on a tiny generated dataset whose anomalies are obvious."""
import inspect
import json
import os
import subprocess
import sys
import tomllib
from importlib.metadata import version
from pathlib import Path

import pytest
from click.testing import CliRunner

from swssl import cli
from swssl.config import Config, build_config
from swssl.entry import COMMANDS, main
from swssl.registry import BACKBONE_NAMES, load
from tiny import TINY

def test_train_bank_eval_end_to_end(tiny_data, tmp_path):
    runner = CliRunner()
    run = tmp_path / "run"
    result = runner.invoke(cli.train, ["--preset", "small", "--config", str(tiny_data / "tiny.toml"),
                                       "--data", str(tiny_data), "--out", str(run)])
    assert result.exit_code == 0, result.output
    assert (run / "checkpoint.pt").is_file() and (run / "bank.safetensors").is_file()
    from PIL import Image
    with Image.open(run / "train_log.png") as plot:  # the training curves, drawn at the validation
        plot.verify()
        assert plot.format == "PNG" and min(plot.size) >= 300
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
    banked = (run / "bank.safetensors").stat().st_mtime_ns
    resumed = runner.invoke(cli.train, args + ["--resume"])
    assert resumed.exit_code == 0, resumed.output
    assert f"nothing to do: {run} is complete (1 epochs)" in resumed.output and "loading images" not in resumed.output
    assert (run / "bank.safetensors").stat().st_mtime_ns == banked
    (run / "bank.safetensors").unlink()  # finished, but without its bank: the bank is built, nothing trained
    rebuilt = runner.invoke(cli.train, args + ["--resume"])
    assert rebuilt.exit_code == 0 and "nothing to train" in rebuilt.output and (run / "bank.safetensors").is_file()
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


HEAVY = ("torch", "numpy", "onnx", "onnxruntime", "matplotlib", "sklearn", "scipy", "PIL")


@pytest.mark.parametrize("name", ["", *COMMANDS])
def test_help_imports_nothing_heavy(name):
    """`--help` of the group and of every command answers without torch, numpy or a runtime."""
    args = [name, "--help"] if name else ["--help"]
    code = ("import sys\nfrom click.testing import CliRunner\nfrom swssl.entry import main\n"
            f"result = CliRunner().invoke(main, {args!r})\nassert result.exit_code == 0, result.output\n"
            f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]", (name, done.stdout)


@pytest.mark.parametrize("name", COMMANDS)
def test_every_command_takes_h(name):
    """-h on the command itself (its swssl-* script) as well as under the group."""
    result = CliRunner().invoke(load(COMMANDS[name]), ["-h"])
    assert result.exit_code == 0 and "Usage:" in result.output and "-h, --help" in result.output, result.output


@pytest.mark.parametrize("argv, usage", [(["swssl", "-h"], "Usage: swssl [OPTIONS] COMMAND"),
                                         (["swssl", "infer", "-h"], "Usage: swssl infer [OPTIONS] SLIDES..."),
                                         (["-m", "swssl", "eval", "-h"], "eval [OPTIONS] RUN_DIR")])
def test_one_entry_point(argv, usage):
    command = [str(Path(sys.executable).with_name(argv[0])), *argv[1:]] if argv[0] == "swssl" else [sys.executable, *argv]
    done = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and usage in done.stdout, (done.stdout, done.stderr)


def test_version_is_the_distribution_s():
    result = CliRunner().invoke(main, ["--version"])
    assert result.exit_code == 0 and result.output.strip() == f"swssl, version {version('swssl')}"


def test_backbone_names_for_help_are_the_registered_backbones():
    from swssl.model.backbones import BACKBONES

    assert tuple(BACKBONES) == BACKBONE_NAMES


def test_config_prints_the_run_configuration_as_toml_that_trains_the_same(tmp_path_factory, tmp_path):
    from swssl.export.tiny import make_tiny_run

    run, _ = make_tiny_run(tmp_path_factory.getbasetemp() / "export-tiny")  # shared with the export tests
    saved = Config.from_dict(json.loads((run / "config.json").read_text()))
    result = CliRunner().invoke(main, ["config", str(run)])
    assert result.exit_code == 0, result.output
    assert tomllib.loads(result.output) == json.loads(json.dumps(saved.to_dict()))  # tuples are arrays
    (tmp_path / "run.toml").write_text(result.output)
    assert build_config("small", tmp_path / "run.toml") == saved
    checkpoint_only = tmp_path / "checkpoint-only"
    checkpoint_only.mkdir()
    (checkpoint_only / "checkpoint.pt").symlink_to(run / "checkpoint.pt")
    assert CliRunner().invoke(main, ["config", str(checkpoint_only)]).output == result.output


def test_config_leaves_out_what_toml_cannot_write():
    assert cli._without_none({"name": None, "train": {"lr": None, "seed": 0}}) == {"train": {"seed": 0}}


def test_config_of_a_missing_run_is_one_line(tmp_path):
    result = CliRunner().invoke(main, ["config", str(tmp_path / "nowhere")])
    assert result.exit_code == 1 and result.output == f"error: {tmp_path / 'nowhere'}: no such run folder\n"


def test_the_no_cuda_notice_is_dropped_on_the_cpu_only(tmp_path):
    """torch logs "No CUDA runtime is found" on importing cpp_extension with a CUDA_HOME but no GPU (as the
    compiled paths do): gone on the CPU, while the logger's other warnings still show."""
    import torch
    import torch.utils.cpp_extension
    from swssl.device import CUDA_NOTICE

    if torch.cuda.is_available():
        pytest.skip("a GPU is here: torch has nothing to say")
    assert CUDA_NOTICE in inspect.getsource(torch.utils.cpp_extension._find_cuda_home)
    code = ("import logging, torch\nfrom swssl.device import import_cpp_extension\n"
            "import_cpp_extension(torch.device('cpu'))\n"
            "logging.getLogger('torch.utils.cpp_extension').warning('another warning')")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "CUDA_HOME": str(tmp_path)})
    assert done.returncode == 0 and CUDA_NOTICE not in done.stderr and "another warning" in done.stderr, done.stderr
