"""Feature options (model.stages, model.neighbourhood): the assembled map against float64 numpy, and the option
followed by training, the bank, evaluation and the exports."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from swssl import cli
from swssl.config import load_preset
from swssl.errors import ConfigError
from swssl.export.manifest import read_manifest
from swssl.export.pipeline import ExportRequest, export_run
from swssl.inference.backends import load_backend
from swssl.model.checkpoint import load_encoder
from swssl.model.encoder import build_encoder
from swssl.scoring.bank import BankMismatchError, MemoryBank, bank_file

MID = {"stages": [2, 3], "neighbourhood": 3}


def neighbourhood_mean(cells: np.ndarray, size: int) -> np.ndarray:
    """Each cell of C x H x W averaged over the size x size square around it, over the cells that exist."""
    r = size // 2
    channels, height, width = cells.shape
    out = np.zeros_like(cells)
    for y in range(height):
        for x in range(width):
            out[:, y, x] = cells[:, max(0, y - r):y + r + 1, max(0, x - r):x + r + 1].mean(axis=(1, 2))
    return out


def block_mean(cells: np.ndarray, factor: int) -> np.ndarray:
    channels, height, width = cells.shape
    return cells.reshape(channels, height // factor, factor, width // factor, factor).mean(axis=(2, 4))


@pytest.mark.parametrize("backbone", ["resnet18", "mobilenet_v2"])
def test_mid_level_map_is_the_stages_averaged_pooled_and_concatenated(backbone):
    """float64 numpy from the trunk's own stage outputs: a 3-cell neighbourhood mean, stage 2 block-averaged to
    stage 3's stride 16, the two concatenated (128 + 256 channels for resnet18, 32 + 96 for mobilenet_v2)."""
    config = load_preset("small").override({"model": {"backbone": backbone, **MID}}).validate()
    torch.manual_seed(0)
    encoder = build_encoder(config).eval()
    images = torch.rand(2, 1, 96, 64)
    with torch.no_grad():
        got = encoder.feature_map(images).double().numpy()
        embedding = encoder(images).double().numpy()
        outputs = encoder.trunk((images.expand(-1, 3, -1, -1) - encoder.mean) / encoder.std)
    stage2, stage3 = (outputs[stage.node].double().numpy() for stage in encoder.layout.stages)
    assert stage2.shape[2:] == (12, 8) and stage3.shape[2:] == (6, 4)
    for index in range(2):
        expected = np.concatenate([block_mean(neighbourhood_mean(stage2[index], 3), 2),
                                   neighbourhood_mean(stage3[index], 3)])
        np.testing.assert_allclose(got[index], expected, rtol=1e-5, atol=1e-6 * np.abs(expected).max())
    assert got.shape[1] == encoder.dim == config.features.dim == stage2.shape[1] + stage3.shape[1]
    np.testing.assert_allclose(embedding, got.mean(axis=(2, 3)), rtol=1e-5, atol=1e-7)
    assert config.stride == encoder.stride == 16


def test_invalid_feature_options_are_refused_naming_the_key():
    demo = load_preset("small")
    for stages in ([], [3, 2], [2, 2], [0], [5]):
        with pytest.raises(ConfigError, match=r"model.stages must be distinct stages of resnet18 from 1 to 4"):
            demo.override({"model": {"stages": stages}}).validate()
    with pytest.raises(ConfigError, match="model.neighbourhood must be an odd number"):
        demo.override({"model": {"neighbourhood": 2}}).validate()
    with pytest.raises(ConfigError, match=r"model.stages \[2, 3\] needs geometry.patch to be a multiple of 16"):
        demo.override({"model": MID, "geometry": {"patch": 100}}).validate()


@pytest.fixture(scope="module")
def mid_run(tiny_data, tmp_path_factory):
    """A one-epoch dense-mode run on the tiny data with mid-level features (patch 32, step 16)."""
    run = tmp_path_factory.mktemp("mid") / "run"
    config = tiny_data / "mid.toml"
    config.write_text((tiny_data / "tiny.toml").read_text() + '[model]\nstages = [2, 3]\nneighbourhood = 3\n'
                      'weights = "none"\nbackbone = "resnet18"\n')
    result = CliRunner().invoke(cli.train, ["--preset", "small", "--config", str(config), "--data", str(tiny_data),
                                            "--out", str(run), "--mode", "dense"])
    assert result.exit_code == 0, result.output
    return run, tiny_data


def test_training_bank_and_eval_follow_the_feature_option(mid_run, tmp_path):
    run, data = mid_run
    encoder, config = load_encoder(run)
    assert config.model.stages == (2, 3) and config.model.neighbourhood == 3 and encoder.dim == 384
    bank = MemoryBank.load(run, config=config)
    assert bank.embeddings.shape[-1] == 384 and bank.config.model.stages == (2, 3)
    result = CliRunner().invoke(cli.evaluate, [str(run), "--data", str(data), "--scorer", "aligned",
                                               "--out", str(tmp_path / "eval")])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "eval" / "test-aligned" / "eval.json").read_text())
    low, high = report["image_auroc_95ci"]
    assert low <= report["image_auroc"] <= high and report["images"] == 8
    other = config.override({"model": {"stages": [3]}}).validate()
    with pytest.raises(BankMismatchError, match=r"model.stages: bank \(2, 3\), run \(3,\)"):
        MemoryBank.load(bank_file(run, "dense"), config=other)


@pytest.mark.parametrize("mode", ["exact", "dense"])
def test_onnx_exports_carry_the_feature_assembly(mid_run, mode, tmp_path):
    """The graph includes the stages' assembly: verified against PyTorch at export, and loaded back it embeds as
    the encoder does (384 channels, stride 16)."""
    run, data = mid_run
    export_run(run, ExportRequest(kinds=("onnx",), mode=mode, out=tmp_path, data=data), echo=lambda text: None)
    folder = tmp_path / ("onnx-dense" if mode == "dense" else "onnx")
    manifest = read_manifest(folder)
    assert manifest["verification"]["passed"] and manifest["config"]["model"]["stages"] == [2, 3]
    assert manifest["output"]["shape"][1] == 384
    backend, _ = load_backend(folder / "model.onnx", "onnxruntime", "cpu")
    encoder, _ = load_encoder(run)
    images = torch.rand(1, 1, 64, 48)
    with torch.inference_mode():
        if mode == "dense":
            assert backend.stride == 16
            got, expected = backend.feature_map(images), encoder.feature_map(images)
        else:
            windows = torch.rand(3, 1, 32, 32)
            got, expected = backend(windows), encoder(windows)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
