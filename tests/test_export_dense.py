"""Dense-mode artifacts: the trunk's feature map exported (images in, cells out), verified, loaded by mode.

A tiny resnet18 run whose geometry can be dense (patch 32, step 32), with an exact ONNX export and
dense ONNX and AOTInductor exports side by side in RUN_DIR/export (made once per session in the
base temp folder; one AOTInductor compile). Tests that change files work on copies.
"""
import json
import shutil

import pytest
import torch
from click.testing import CliRunner

from swssl.inference.backends import (AotiBackend, BackendError, OnnxRuntimeBackend, TensorRTBackend, TorchBackend,
                                      load_backend)
from swssl.model.checkpoint import load_checkpoint, load_encoder, save_checkpoint
from swssl.windows.embed import embed_image
from swssl.export import cli, verify
from swssl.export.errors import ArtifactMismatch
from swssl.export.manifest import check_manifest, read_manifest
from swssl.export.onnx_export import check_onnx
from swssl.export.tiny import ensure_exports, make_tiny_run

BATCH = "1,4,16"


@pytest.fixture(scope="module")
def dense(tmp_path_factory):
    run, data = make_tiny_run(tmp_path_factory.getbasetemp() / "export-tiny-dense", step=32)
    ensure_exports(run, data, BATCH, aoti=False)
    ensure_exports(run, data, None, mode="dense")
    return run, data


@pytest.fixture
def copy(dense, tmp_path):
    run, _ = dense
    return shutil.copytree(run, tmp_path / "run")


def images(height, width, count=1, seed=0):
    """Raw images with a dark border strip, as slices have (cells of background and of tissue)."""
    x = torch.rand(count, 1, height, width, generator=torch.Generator().manual_seed(seed))
    x[..., :, -width // 4:] = 0
    return x


def test_dense_onnx_cells_match_the_feature_map_on_non_square_sizes(dense):
    run, _ = dense
    path = run / "export" / "onnx-dense" / "model.onnx"
    check_onnx(path, "dense")
    backend, _ = load_backend(path, "onnxruntime", "cpu")  # from its manifest: the stride among the rest
    encoder, _ = load_encoder(run)
    assert backend.dense and backend.dim == 512
    for height, width, count in ((96, 160, 1), (224, 64, 2)):
        x = images(height, width, count, seed=height)
        out = backend.feature_map(x)
        with torch.inference_mode():
            expected = encoder.feature_map(x)
        assert out.shape == (count, 512, height // 32, width // 32) and out.dtype == torch.float32
        metrics = verify.compare(out.flatten(2).transpose(1, 2).flatten(0, 1),
                                 expected.flatten(2).transpose(1, 2).flatten(0, 1))
        assert metrics["max_rel_error"] < 1e-4 and metrics["min_cosine"] > 0.99999, (height, width, metrics)
    windows = images(32, 32, 3)
    with torch.inference_mode():
        assert verify.compare(backend(windows), encoder(windows))["max_rel_error"] < 1e-4  # windows still work
    assert backend.feature_map(x[:0]).shape == (0, 512, 7, 2)
    with pytest.raises(BackendError, match="multiples of 32"):
        backend.feature_map(images(50, 64))


def test_dense_manifests_record_the_interface_mode_and_checks(dense):
    run, data = dense
    for folder in ("onnx-dense", "aoti-cpu-fp32-dense"):
        manifest = read_manifest(run / "export" / folder)
        assert manifest["config"]["geometry"]["mode"] == "dense" and manifest["batch"] == {"min": 1, "opt": 1, "max": 1}
        assert manifest["input"]["name"] == "images" and manifest["input"]["shape"] == ["batch", 1, "height", "width"]
        assert manifest["input"]["sides"] == {"min": 32, "opt": 1024, "max": 2048 + 2 * 224}
        assert manifest["output"]["name"] == "cells" and manifest["output"]["shape"][:2] == ["batch", 512]
        assert "--mode dense" in manifest["command"] and manifest["source"]["run_mode"] == "exact"
        check = manifest["verification"]
        assert check["passed"] and check["images"] == 2 and check["shapes"] == [[128, 96], [128, 96]]
        assert check["cells"] == 2 * 4 * 3 and check["max_rel_error"] < 1e-4 and check["min_cosine"] > 0.99999
    assert read_manifest(run / "export" / "onnx")["config"]["geometry"]["mode"] == "exact"  # both modes side by side


@pytest.mark.parametrize("kind", ["auto", "onnxruntime", "aoti"])
def test_dense_mode_loads_dense_artifacts_that_embed_like_torch(dense, kind):
    run, _ = dense
    backend, config = load_backend(run, kind, "cpu", mode="dense")
    assert config.geometry.mode == "dense" and backend.artifact.parent.name.endswith("-dense")
    assert isinstance(backend, AotiBackend if kind == "aoti" else OnnxRuntimeBackend)
    reference, _ = load_backend(run, "torch", "cpu", mode="dense")
    image = images(160, 96)[0, 0].numpy()  # not the run's size: the grid follows the image
    embeddings, foreground = embed_image(backend, image, config)
    expected, expected_foreground = embed_image(reference, image, config)
    assert embeddings.shape == expected.shape == (5, 3, 512) and torch.equal(foreground, expected_foreground)
    metrics = verify.compare(embeddings.flatten(0, 1), expected.flatten(0, 1))
    assert metrics["max_rel_error"] < 1e-4 and metrics["min_cosine"] > 0.99999, metrics


def test_exact_artifacts_are_refused_or_passed_over_in_dense_mode(copy):
    for folder in ("onnx-dense", "aoti-cpu-fp32-dense"):
        shutil.rmtree(copy / "export" / folder)
    with pytest.raises(ArtifactMismatch) as caught:
        load_backend(copy, "onnxruntime", "cpu", mode="dense")
    message = str(caught.value)
    assert "exported in exact mode" in message and "the run is used in dense mode" in message
    assert f"make one for dense mode with: swssl-export {copy} --onnx --mode dense" in message
    backend, config = load_backend(copy, "auto", "cpu", mode="dense")
    assert isinstance(backend, TorchBackend) and config.geometry.mode == "dense"
    assert "exported in exact mode" in backend.reason
    assert f"no aoti export for cpu in dense mode (make one: swssl-export {copy} --aoti --device cpu --mode dense)" \
        in backend.reason
    exact, _ = load_backend(copy, "onnxruntime", "cpu")
    with pytest.raises(BackendError, match="exact-mode artifact .* export one with --mode dense"):
        exact.feature_map(images(64, 64))


def test_a_run_is_used_in_its_own_mode_and_an_artifact_file_in_its_own(dense):
    run, _ = dense
    backend, config = load_backend(run, "auto", "cpu")  # the run's own mode: exact, its exact export
    assert config.geometry.mode == "exact" and backend.artifact.parent.name == "onnx" and not backend.dense
    backend, config = load_backend(run / "export" / "onnx-dense" / "model.onnx")  # a file: its own mode
    assert backend.dense and config.geometry.mode == "dense"
    with pytest.raises(ArtifactMismatch, match="exported in dense mode .* make one for exact mode"):
        load_backend(run / "export" / "onnx-dense" / "model.onnx", mode="exact")


def test_cli_exports_dense_onnx_with_a_passing_manifest(dense, tmp_path):
    run, data = dense
    result = CliRunner().invoke(cli.export, [str(run), "--onnx", "--mode", "dense", "--data", str(data),
                                             "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert "2 training images (128 x 96 px" in result.output and "cells of 2 images" in result.output
    manifest = json.loads((tmp_path / "onnx-dense" / "manifest.json").read_text())
    assert manifest["verification"]["passed"] and manifest["config"]["geometry"]["mode"] == "dense"
    assert not (tmp_path / "onnx").exists()


def test_a_run_in_dense_mode_exports_and_loads_dense_by_default(dense, copy, tmp_path):
    _, data = dense
    state = load_checkpoint(copy)
    encoder, config = load_encoder(copy)
    save_checkpoint(copy / "checkpoint.pt", encoder, None, state["epoch"], config.with_mode("dense"), [])
    backend, config = load_backend(copy, "auto", "cpu")
    assert config.geometry.mode == "dense" and backend.artifact.parent.name == "onnx-dense"
    result = CliRunner().invoke(cli.export, [str(copy), "--onnx", "--data", str(data), "--out", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    manifest = read_manifest(tmp_path / "out" / "onnx-dense")
    assert manifest["source"]["run_mode"] == "dense" and " --mode dense " in manifest["command"]
    with pytest.raises(ArtifactMismatch, match=f"make one for exact mode with: swssl-export {copy} --onnx --mode exact"):
        check_manifest(manifest, config=config.with_mode("exact"), run_dir=copy)


def test_dense_export_of_a_geometry_that_cannot_be_dense_exits_2(tmp_path_factory):
    run, _ = make_tiny_run(tmp_path_factory.getbasetemp() / "export-tiny")  # step 16: not a multiple of 32
    result = CliRunner().invoke(cli.export, [str(run), "--onnx", "--mode", "dense"])
    assert result.exit_code == 2 and "multiples of the feature stride" in result.output  # a usage error


def test_the_tensorrt_provider_profile_spans_the_image_sides(dense, monkeypatch):
    from swssl.inference import backends
    from swssl.export.graph import GraphSpec

    run, _ = dense
    monkeypatch.setattr(backends.importlib.util, "find_spec", lambda name: object())  # as if TensorRT were installed
    spec = GraphSpec.from_manifest(read_manifest(run / "export" / "onnx-dense"))
    [(name, options), *_] = backends.default_providers(torch.device("cuda:0"), ["TensorrtExecutionProvider"],
                                                       run / "m.onnx", spec)
    assert name == "TensorrtExecutionProvider" and options["trt_profile_min_shapes"] == "images:1x1x32x32"
    assert options["trt_profile_opt_shapes"] == "images:1x1x1024x1024"
    assert options["trt_profile_max_shapes"] == "images:1x1x2496x2496"


def test_tensorrt_dense_engine_matches_the_feature_map(dense, tmp_path):
    pytest.importorskip("tensorrt", reason="TensorRT is not installed (pip install 'swssl[gpu]'); engines need it")
    if not torch.cuda.is_available():
        pytest.skip("TensorRT engines need a CUDA GPU and torch.cuda.is_available() is False")
    run, data = dense
    result = CliRunner().invoke(cli.export, [str(run), "--trt", "--precision", "fp16", "--mode", "dense",
                                             "--data", str(data), "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    manifest = read_manifest(tmp_path / "tensorrt-fp16-dense")
    assert manifest["verification"]["passed"] and manifest["batch"] == {"min": 1, "opt": 1, "max": 1}
    backend, _ = load_backend(tmp_path / "tensorrt-fp16-dense" / "model.engine", "tensorrt", "cuda", mode="dense")
    assert isinstance(backend, TensorRTBackend) and backend.dense
    encoder, _ = load_encoder(run)
    for height, width in ((96, 160), (2496, 64)):
        x = images(height, width)
        with torch.inference_mode():
            expected = encoder.feature_map(x)
        out = backend.feature_map(x.cuda())
        assert out.shape == expected.shape
        metrics = verify.compare(out.flatten(2)[0].T, expected.flatten(2)[0].T)
        assert metrics["min_cosine"] >= verify.TOLERANCES["fp16"].min_cosine, (height, width, metrics)
    with pytest.raises(BackendError, match="outside the engine's profile"):
        backend.feature_map(images(2528, 64).cuda())
