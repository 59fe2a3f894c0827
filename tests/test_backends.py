"""Inference backends: one interface; auto's choice; artifacts that do not fit are refused.

Uses the tiny run and its ONNX / AOTInductor exports shared with test_export.py (made once per
session in the base temp folder); tests that change files work on copies.
"""
import json
import shutil

import pytest
import torch

from swssl.inference.backends import (AotiBackend, Backend, BackendError, OnnxRuntimeBackend, TorchBackend,
                                      default_providers, load_backend)
from swssl.model.checkpoint import load_checkpoint, load_encoder, save_checkpoint
from swssl.errors import ConfigError
from swssl.export import verify
from swssl.export.errors import ArtifactMismatch
from swssl.export.manifest import check_manifest
from swssl.files import sha256_file
from swssl.export.tiny import ensure_exports, make_tiny_run

BATCH = "1,4,16"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    run, data = make_tiny_run(tmp_path_factory.getbasetemp() / "export-tiny")
    ensure_exports(run, data, BATCH)
    return run, data


@pytest.fixture
def copy(tiny, tmp_path):
    """A private copy of the tiny run with its exports, to tamper with."""
    run, _ = tiny
    return shutil.copytree(run, tmp_path / "run")


def windows(n, patch=32, seed=0):
    return torch.rand(n, 1, patch, patch, generator=torch.Generator().manual_seed(seed))


def test_torch_backend_is_the_encoder_in_every_precision(tiny):
    run, _ = tiny
    encoder, _ = load_encoder(run)
    x = windows(6)
    with torch.inference_mode():
        expected = encoder(x)
    backend = TorchBackend(load_encoder(run)[0])
    assert torch.allclose(backend(x), expected, atol=1e-5) and backend.max_batch is None
    assert backend(x[:0]).shape == (0, 512)
    low = TorchBackend(load_encoder(run)[0], precision="bf16")
    out = low(x)
    assert out.dtype == torch.float32
    assert verify.compare(out, expected)["min_cosine"] >= verify.TOLERANCES["bf16"].min_cosine


def test_calls_above_max_batch_are_split():
    class Recorder(Backend):
        max_batch, dim = 3, 2

        def __init__(self):
            self.sizes = []

        def _run(self, x):
            self.sizes.append(len(x))
            return x.flatten(1)[:, :2]

    backend = Recorder()
    x = windows(7, patch=2)
    assert torch.equal(backend(x), x.flatten(1)[:, :2]) and backend.sizes == [3, 3, 1]


def test_auto_picks_the_fastest_usable_export_and_says_why(copy):
    backend, config = load_backend(copy, "auto", "cpu")
    assert isinstance(backend, OnnxRuntimeBackend) and config.geometry.patch == 32
    assert "auto chose onnxruntime" in backend.reason and "tensorrt" in backend.reason
    backend, _ = load_backend(copy, "aoti", "cpu")
    assert isinstance(backend, AotiBackend)
    shutil.rmtree(copy / "export" / "onnx")
    backend, _ = load_backend(copy, "auto", "cpu")
    assert isinstance(backend, AotiBackend) and "no onnxruntime export" in backend.reason
    shutil.rmtree(copy / "export")
    backend, _ = load_backend(copy, "auto", "cpu")
    assert isinstance(backend, TorchBackend) and "swssl-export" in backend.reason
    with pytest.raises(BackendError, match=f"no aoti export for cpu .*swssl-export {copy} --aoti"):
        load_backend(copy, "aoti", "cpu")


def test_every_backend_gives_the_same_embeddings(tiny):
    run, _ = tiny
    x = windows(9, seed=3)
    outputs = {kind: load_backend(run, kind, "cpu")[0](x) for kind in ("torch", "onnxruntime", "aoti")}
    for kind, out in outputs.items():
        assert out.shape == (9, 512) and out.dtype == torch.float32
        metrics = verify.compare(out, outputs["torch"])
        assert metrics["max_rel_error"] < 1e-4 and metrics["min_cosine"] > 0.99999, (kind, metrics)


def test_a_tampered_artifact_is_refused(copy):
    path = copy / "export" / "onnx" / "model.onnx"
    data = bytearray(path.read_bytes())
    data[-10] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ArtifactMismatch) as caught:
        load_backend(copy, "onnxruntime", "cpu")
    message = str(caught.value)
    assert "model.onnx changed since export" in message and f"swssl-export {copy} --onnx" in message
    backend, _ = load_backend(copy, "auto", "cpu")  # auto passes over it and says so
    assert isinstance(backend, AotiBackend) and "changed since export" in backend.reason
    package = copy / "export" / "aoti-cpu-fp32" / "model.pt2"
    with open(package, "ab") as handle:
        handle.write(b"tampered")
    with pytest.raises(ArtifactMismatch, match=r"model.pt2 changed since export.*--aoti --precision fp32 --device cpu"):
        load_backend(package)


def test_a_corrupt_manifest_is_named(copy):
    (copy / "export" / "onnx" / "manifest.json").write_text('{"format": "swssl-export/1", "kind": ')
    with pytest.raises(BackendError, match=r"onnx/manifest.json: manifest.json is not valid JSON at line 1"):
        load_backend(copy, "onnxruntime", "cpu")


def test_exports_of_other_weights_are_refused(copy):
    state = load_checkpoint(copy)
    encoder, config = load_encoder(copy)
    with torch.no_grad():
        encoder.trunk.conv1.weight.mul_(1.01)  # "retrained"
    save_checkpoint(copy / "checkpoint.pt", encoder, None, state["epoch"] + 1, config, [])
    for kind in ("onnxruntime", "aoti"):
        with pytest.raises(ArtifactMismatch, match="exported from other weights"):
            load_backend(copy, kind, "cpu")
    backend, _ = load_backend(copy, "auto", "cpu")
    assert isinstance(backend, TorchBackend) and "other weights" in backend.reason


def test_exports_of_another_geometry_are_refused(copy):
    path = copy / "export" / "onnx" / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["config"]["geometry"]["patch"] = 64
    path.write_text(json.dumps(manifest))
    with pytest.raises(ArtifactMismatch, match="geometry.patch: export 64, run 32"):
        load_backend(copy, "onnxruntime", "cpu")


def test_device_gpu_and_tensorrt_mismatches_are_named(tmp_path):
    artifact = tmp_path / "model.engine"
    artifact.write_bytes(b"engine")
    base = {"format": "swssl-export/1", "artifact": artifact.name, "artifact_sha256": sha256_file(artifact),
            "verification": {"passed": True}, "source": {"run_dir": "runs/x"}, "batch": {"min": 1, "opt": 8, "max": 64},
            "_folder": str(tmp_path)}
    engine = {**base, "kind": "tensorrt", "precision": "fp16", "device": "cuda",
              "gpu": {"name": "A100", "compute_capability": "8.0"}, "versions": {"tensorrt": "10.0.1"},
              "tensorrt": {"version_compatible": False}}
    here = {"tensorrt": "10.3.0", "gpu": {"name": "H100", "compute_capability": "9.0"}}
    with pytest.raises(ArtifactMismatch) as caught:
        check_manifest(engine, runtime=here)
    message = str(caught.value)
    assert "compute capability 8.0 (A100), this GPU is 9.0 (H100)" in message
    assert "built with TensorRT 10.0.1, this is TensorRT 10.3.0" in message
    assert "swssl-export runs/x --trt --precision fp16 --batch 1,8,64" in message
    compatible = {**engine, "gpu": here["gpu"], "tensorrt": {"version_compatible": True}}
    assert check_manifest(compatible, runtime=here) == artifact  # later TensorRT of the same major: allowed
    with pytest.raises(ArtifactMismatch, match="same major"):
        check_manifest(compatible, runtime={**here, "tensorrt": "11.0.0"})
    with pytest.raises(ArtifactMismatch, match="TensorRT is not installed"):
        check_manifest({**engine, "gpu": here["gpu"]}, runtime={**here, "tensorrt": None})
    package = {**base, "kind": "aoti", "precision": "fp32", "device": "cuda",
               "versions": {"torch": torch.__version__}}
    with pytest.raises(ArtifactMismatch, match=r"built for cuda, asked to run on cpu.*--aoti --precision fp32 --device cuda"):
        check_manifest(package, device="cpu")
    with pytest.raises(ArtifactMismatch, match="compiled with torch 1.13"):
        check_manifest({**package, "versions": {"torch": "1.13.1"}}, device="cuda")


def test_artifact_files_load_with_their_manifest_only(tiny, tmp_path):
    run, _ = tiny
    backend, config = load_backend(run / "export" / "onnx" / "model.onnx")
    assert isinstance(backend, OnnxRuntimeBackend) and config.geometry.patch == 32 and backend.dim == 512
    backend, _ = load_backend(run / "checkpoint.pt")
    assert isinstance(backend, TorchBackend)
    with pytest.raises(BackendError, match="cannot run on the aoti backend"):
        load_backend(run / "export" / "onnx" / "model.onnx", "aoti")
    shutil.copy(run / "export" / "onnx" / "model.onnx", tmp_path / "model.onnx")
    with pytest.raises(ArtifactMismatch, match="no export manifest"):
        load_backend(tmp_path / "model.onnx")
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(BackendError, match="not a model"):
        load_backend(tmp_path / "notes.txt")
    with pytest.raises(BackendError, match="unknown backend"):
        load_backend(run, "openvino")
    moved = tmp_path / "elsewhere"  # deployed without its run: the manifest's config and sha256 still apply
    shutil.copytree(run / "export" / "onnx", moved)
    manifest = json.loads((moved / "manifest.json").read_text())
    manifest["source"]["run_dir"] = str(tmp_path / "gone")
    (moved / "manifest.json").write_text(json.dumps(manifest))
    backend, config = load_backend(moved / "model.onnx")
    assert "not checked" in backend.reason and config.geometry.patch == 32


def test_providers_follow_the_device(tmp_path):
    assert default_providers(torch.device("cpu"), ["CUDAExecutionProvider", "CPUExecutionProvider"],
                             tmp_path / "m.onnx") == ["CPUExecutionProvider"]
    if torch.cuda.is_available():
        chosen = default_providers(torch.device("cuda:0"), ["CUDAExecutionProvider", "CPUExecutionProvider"],
                                   tmp_path / "m.onnx")
        assert chosen[0] == ("CUDAExecutionProvider", {"device_id": 0}) and chosen[-1] == "CPUExecutionProvider"


def test_cuda_requests_without_cuda_are_refused(tiny):
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    run, _ = tiny
    with pytest.raises(ConfigError, match="CUDA is not available"):
        load_backend(run, "auto", "cuda")
