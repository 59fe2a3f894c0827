"""Export stage: ONNX and AOTInductor artifacts verified against PyTorch, manifests, exit statuses.

One AOTInductor compile per session (resnet18, CPU): the tiny run and its exports live in the
session's base temp folder and are shared with test_backends.py.
"""
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from swssl.model.checkpoint import load_encoder, weights_digest
from swssl.export import cli, verify
from swssl.export.graph import GraphSpec
from swssl.export.manifest import FORMAT, read_manifest
from swssl.files import sha256_file
from swssl.export.onnx_export import check_onnx, export_onnx
from swssl.export.profile import BatchProfile
from swssl.export.tiny import ensure_exports, make_tiny_run
from swssl.model.encoder import PatchEncoder

ROOT = Path(__file__).resolve().parents[1]
BATCH = "1,4,16"
HAS_CUDA = torch.cuda.is_available()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    run, data = make_tiny_run(tmp_path_factory.getbasetemp() / "export-tiny")
    ensure_exports(run, data, BATCH)
    return run, data


def windows(n, patch, seed=0):
    return torch.rand(n, 1, patch, patch, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("backbone,patch", [("resnet18", 32), ("wide_resnet50_2", 64)])
def test_onnx_matches_torch_at_every_batch_size(tmp_path, backbone, patch):
    import onnx

    from swssl.inference.backends import OnnxRuntimeBackend

    torch.manual_seed(0)
    encoder = PatchEncoder(backbone).eval()
    profile = BatchProfile(1, 4, 8)
    info = export_onnx(encoder, GraphSpec.exact(patch, profile, encoder.stride), tmp_path / "model.onnx")
    assert info["opset"] >= 17 and info["external_data"] == []
    model = onnx.load(str(tmp_path / "model.onnx"))
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param  # dynamic batch axis
    assert [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim[1:]] == [1, patch, patch]
    assert len(model.graph.output) == 1 and model.graph.output[0].name == "embeddings"
    backend = OnnxRuntimeBackend(tmp_path / "model.onnx", "cpu")
    for n in (1, 4, 3, 11):  # min, opt, not opt, past the profile's max
        x = windows(n, patch, seed=n)
        with torch.inference_mode():
            expected = encoder(x)
        metrics = verify.compare(backend(x), expected)
        assert backend(x).shape == (n, encoder.dim)
        assert metrics["max_rel_error"] < 1e-4 and metrics["min_cosine"] > 0.99999, (n, metrics)


def test_default_export_is_a_verified_onnx_with_its_manifest(tiny, tmp_path):
    run, data = tiny
    result = CliRunner().invoke(cli.export, [str(run), "--batch", BATCH, "--data", str(data), "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert "verified" in result.output
    folder = tmp_path / "onnx"
    manifest = json.loads((folder / "manifest.json").read_text())
    encoder, config = load_encoder(run)
    assert manifest["format"] == FORMAT and manifest["kind"] == "onnx" and manifest["artifact"] == "model.onnx"
    assert manifest["artifact_sha256"] == sha256_file(folder / "model.onnx")
    assert manifest["source"]["weights_digest"] == weights_digest(encoder)
    assert manifest["source"]["checkpoint_sha256"] == sha256_file(run / "checkpoint.pt")
    assert manifest["config"]["geometry"] == config.to_dict()["geometry"]
    assert manifest["config"]["preprocess"]["mean"] == list(config.preprocess.mean)
    assert manifest["input"] == {**manifest["input"], "name": "windows", "shape": ["batch", 1, 32, 32],
                                 "dtype": "float32"}
    assert manifest["output"] == {"name": "embeddings", "shape": ["batch", 512], "dtype": "float32"}
    assert manifest["precision"] == "fp32" and manifest["batch"] == {"min": 1, "opt": 4, "max": 16}
    for library in ("torch", "onnx", "onnxruntime", "tensorrt"):
        assert library in manifest["versions"]
    assert manifest["versions"]["torch"] == torch.__version__
    assert manifest["export"]["opset"] >= 17
    check = manifest["verification"]
    assert check["passed"] and check["windows"] == 12 and check["batch_sizes"] == [1, 4, 7]
    assert check["max_rel_error"] < 1e-4 and check["min_cosine"] > 0.99999
    assert check["tolerance"] == {"max_rel_error": 1e-3, "min_cosine": 0.9999}
    assert manifest["command"].startswith(f"swssl-export {run} --onnx")


def test_aoti_cpu_package_matches_torch(tiny):
    from swssl.inference.backends import AotiBackend, load_backend

    run, _ = tiny
    manifest = read_manifest(run / "export" / "aoti-cpu-fp32")
    assert manifest["kind"] == "aoti" and manifest["device"] == "cpu" and manifest["verification"]["passed"]
    assert manifest["verification"]["max_rel_error"] < 1e-4
    backend, config = load_backend(run / "export" / "aoti-cpu-fp32" / "model.pt2")
    assert isinstance(backend, AotiBackend) and backend.max_batch == 16 and config.geometry.patch == 32
    encoder, _ = load_encoder(run)
    for n in (1, 4, 5, 37):  # 37 > max: split into 16 + 16 + 5
        x = windows(n, 32, seed=n)
        with torch.inference_mode():
            metrics = verify.compare(backend(x), encoder(x))
        assert metrics["max_rel_error"] < 1e-4 and metrics["min_cosine"] > 0.99999, (n, metrics)

def test_int8_onnx_is_quantized_runs_integer_kernels_and_is_verified(tiny, tmp_path):
    import numpy as np

    from swssl.inference.backends import OnnxRuntimeBackend, load_backend

    run, data = tiny
    result = CliRunner().invoke(cli.export, [str(run), "--onnx", "--precision", "int8", "--batch", BATCH,
                                             "--data", str(data), "--out", str(tmp_path), "--calibration-windows", "64"])
    assert result.exit_code == 0, result.output
    assert "onnx int8:" in result.output and "verified" in result.output
    manifest = read_manifest(tmp_path / "onnx-int8")
    assert manifest["kind"] == "onnx" and manifest["precision"] == "int8" and manifest["device"] == "cpu"
    assert manifest["verification"]["passed"] and manifest["verification"]["tolerance"]["min_cosine"] == 0.98
    assert manifest["export"]["from_sha256"] == read_manifest(tmp_path / "onnx")["artifact_sha256"]
    quantization = manifest["quantization"]
    assert quantization["format"] == "QDQ" and quantization["samples"] == 64
    kernels = quantization["kernels"]  # QLinearConv, not Conv after DequantizeLinear, but for the float first one
    float_convs = sum(kernels["nodes_per_op"].get(op, 0) for op in ("Conv", "FusedConv"))  # ORT may fuse its ReLU
    assert float_convs == len(quantization["float_nodes"]) == 1
    assert kernels["nodes_per_op"]["QLinearConv"] >= 10 and kernels["integer_share"] > 0
    assert "--precision int8" in manifest["command"]
    from swssl.export.quantize import cpu_int8_flags, weight_type_for
    assert quantization["pair"] == {"int8": "U8S8", "uint8": "U8U8"}[weight_type_for(cpu_int8_flags())]
    [first] = quantization["float_nodes"]  # the convolution that reads the image stays float32
    import onnx
    graph = onnx.load(str(tmp_path / "onnx-int8" / "model.onnx")).graph
    weight = next(node for node in graph.node if node.name == first).input[1]
    assert not any(node.op_type == "DequantizeLinear" and weight in node.output for node in graph.node)
    int8 = tmp_path / "onnx-int8" / "model.onnx"
    assert (tmp_path / "onnx-int8" / "model.onnx").stat().st_size < 0.5 * (tmp_path / "onnx" / "model.onnx").stat().st_size
    backend, _ = load_backend(int8)
    assert isinstance(backend, OnnxRuntimeBackend) and backend.precision == "int8"
    encoder, _ = load_encoder(run)
    x = windows(9, 32, seed=3) * 0.5 + 0.25
    with torch.inference_mode():
        metrics = verify.compare(backend(x), encoder(x))
    assert 0.9 < metrics["min_cosine"] < 0.999999  # close, and not the float32 graph under another name
    assert np.isfinite(metrics["max_abs_error"])



def test_int8_weights_follow_vnni_and_an_u8s8_graph_is_refused_without_it(monkeypatch):
    from swssl.export import quantize
    from swssl.inference.backends import BackendError, OnnxRuntimeBackend

    assert quantize.weight_type_for(["avx2", "avx512_vnni"]) == "int8"
    assert quantize.weight_type_for(["avx2", "avx_vnni"]) == "int8"
    assert quantize.weight_type_for(["avx2", "avx512bw"]) == "uint8"  # AVX2 / AVX-512 without VNNI saturate U8S8
    monkeypatch.setattr(quantize, "cpu_int8_flags", lambda: ["avx2"])
    assert quantize.pair_problem({"pair": "U8U8"}) is None
    manifest = {"precision": "int8", "quantization": {"pair": "U8S8"}}
    with pytest.raises(BackendError, match="VNNI"):
        OnnxRuntimeBackend.from_manifest(Path("model.onnx"), manifest, torch.device("cpu"), None, 8)
    monkeypatch.setattr(quantize, "cpu_int8_flags", lambda: ["avx2", "avx512_vnni"])
    assert quantize.pair_problem({"pair": "U8S8"}) is None


def test_a_verification_failure_exits_1_with_the_numbers_and_is_refused(tiny, tmp_path, monkeypatch):
    from swssl.inference.backends import load_backend
    from swssl.export.errors import ArtifactMismatch

    run, data = tiny
    monkeypatch.setitem(verify.TOLERANCES, "fp32", verify.Tolerance(max_rel_error=0.0, min_cosine=1.1))
    result = CliRunner().invoke(cli.export, [str(run), "--batch", BATCH, "--data", str(data), "--out", str(tmp_path)])
    assert result.exit_code == 1
    error = [line for line in result.output.splitlines() if line.startswith("error: ")]
    assert len(error) == 1 and "verification failed" in error[0] and "min_cosine" in error[0], result.output
    manifest = read_manifest(tmp_path / "onnx")
    assert manifest["verification"]["passed"] is False
    with pytest.raises(ArtifactMismatch, match="failed verification"):
        load_backend(tmp_path / "onnx" / "model.onnx")


@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is not None and HAS_CUDA,
                    reason="TensorRT and a GPU are present: --trt works here")
def test_trt_without_tensorrt_or_gpu_exits_2_with_one_line(tiny):
    run, _ = tiny
    result = CliRunner().invoke(cli.export, [str(run), "--trt"])
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    if importlib.util.find_spec("tensorrt") is None:
        assert "TensorRT is not installed" in lines[0] and "swssl[gpu]" in lines[0]
    else:
        assert "CUDA GPU" in lines[0]


def test_missing_run_or_checkpoint_exits_2(tmp_path):
    runner = CliRunner()
    result = runner.invoke(cli.export, [str(tmp_path / "nowhere")])
    assert result.exit_code == 2 and "no such run directory" in result.output
    result = runner.invoke(cli.export, [str(tmp_path)])
    assert result.exit_code == 2 and "no checkpoint" in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_bad_options_exit_1(tiny):
    run, _ = tiny
    result = CliRunner().invoke(cli.export, [str(run), "--batch", "8,2,4"])
    assert result.exit_code == 1 and "MIN <= OPT <= MAX" in result.output
    result = CliRunner().invoke(cli.export, [str(run), "--aoti", "--precision", "int8", "--device", "cpu"])
    assert result.exit_code == 1 and "int8" in result.output.lower()


def test_external_data_is_written_hashed_and_checked(tiny, tmp_path):
    from swssl.inference.backends import load_backend
    from swssl.export.errors import ArtifactMismatch
    from swssl.export.pipeline import ExportRequest, export_run

    run, data = tiny
    request = ExportRequest(kinds=("onnx",), batch=BatchProfile.parse(BATCH), out=tmp_path, data=data,
                            external_data_threshold=0)
    export_run(run, request, echo=lambda text: None)
    manifest = read_manifest(tmp_path / "onnx")
    assert list(manifest["external_data"]) == ["model.onnx.data"]
    assert (tmp_path / "onnx" / "model.onnx.data").stat().st_size > 10 * (tmp_path / "onnx" / "model.onnx").stat().st_size
    check_onnx(tmp_path / "onnx" / "model.onnx")
    backend, _ = load_backend(tmp_path / "onnx" / "model.onnx")
    assert backend(windows(2, 32)).shape == (2, 512)
    with open(tmp_path / "onnx" / "model.onnx.data", "r+b") as handle:
        handle.seek(100)
        handle.write(b"\x00\x01\x02\x03")
    with pytest.raises(ArtifactMismatch, match="model.onnx.data changed since export"):
        load_backend(tmp_path / "onnx" / "model.onnx")


def test_verification_windows_come_from_the_run_bank_or_data(tiny, tmp_path):
    from safetensors.torch import save_file

    run, data = tiny
    _, config = load_encoder(run)
    bank_run = tmp_path / "run"
    bank_run.mkdir()
    paths = sorted(str(p) for p in data.glob("*.npy"))
    save_file({"embeddings": torch.zeros(1)}, str(bank_run / "bank.safetensors"), metadata={"paths": json.dumps(paths)})
    x, source = verify.training_windows(config, bank_run, count=10)
    assert x.shape == (10, 1, 32, 32) and "memory bank" in source
    assert 0 <= float(x.min()) and float(x.max()) <= 1 and bool((x.amax(dim=(1, 2, 3)) > 0).all())
    y, source = verify.training_windows(config, None, data, count=10)
    assert "--data" in source and torch.equal(x, y)  # same images, same seed, same windows


def test_verification_batches_cover_min_opt_and_an_odd_size():
    assert verify.verification_batches(72, BatchProfile(1, 64, 256)) == [1, 64, 7]
    assert verify.verification_batches(12, BatchProfile(1, 4, 16)) == [1, 4, 7]
    assert verify.verification_batches(40, BatchProfile(2, 4, 16)) == [2, 4, 16, 16, 2]


def test_fp32_tolerance_catches_a_wrong_normalisation():
    torch.manual_seed(0)
    right = PatchEncoder("resnet18").eval()
    wrong = PatchEncoder("resnet18", mean=(0.45, 0.45, 0.45)).eval()
    wrong.load_state_dict({**right.state_dict(), "mean": torch.full((1, 3, 1, 1), 0.45)})
    x = windows(16, 32)
    with torch.inference_mode():
        metrics = verify.compare(wrong(x), right(x))
    tolerance = verify.TOLERANCES["fp32"]
    assert metrics["max_rel_error"] > tolerance.max_rel_error or metrics["min_cosine"] < tolerance.min_cosine


def test_gpu_script_is_valid_bash():
    script = ROOT / "bench" / "gpu.sh"
    assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0
    text = script.read_text()
    assert "set -euo pipefail" in text and "swssl.export.gpu_check" in text


def test_export_path_needs_no_optional_readers_or_training_modules(tmp_path):
    """bench/gpu.sh runs where pydicom, zarr and tqdm are absent: nothing on its path may import them."""
    code = f"""
import sys
for name in ("pydicom", "zarr", "tqdm", "scipy", "sklearn", "matplotlib"):
    sys.modules[name] = None
import swssl.inference.backends, swssl.export.cli, swssl.export.pipeline, swssl.export.gpu_check, swssl.export.aoti
import swssl.export.onnx_export, swssl.export.tensorrt_build, swssl.export.verify, swssl.export.manifest
from swssl.export.tiny import make_tiny_run
from swssl.export.verify import training_windows
from swssl.model.checkpoint import load_encoder
run, data = make_tiny_run({str(tmp_path)!r})
encoder, config = load_encoder(run)
windows, _ = training_windows(config, run, data, count=3)
print("ok", tuple(windows.shape))
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "ok (3, 1, 32, 32)" in result.stdout


# --- where a GPU exists -------------------------------------------------------------------------

needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="no CUDA GPU on this machine (torch.cuda.is_available() is False)")


@needs_cuda
def test_aoti_cuda_package_matches_torch(tiny, tmp_path):
    run, data = tiny
    result = CliRunner().invoke(cli.export, [str(run), "--aoti", "--device", "cuda", "--precision", "bf16",
                                             "--batch", BATCH, "--data", str(data), "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    manifest = read_manifest(tmp_path / "aoti-cuda-bf16")
    assert manifest["gpu"]["compute_capability"] and manifest["verification"]["passed"]


@needs_cuda
def test_onnxruntime_cuda_io_binding_matches_torch(tiny):
    import onnxruntime

    from swssl.inference.backends import load_backend

    if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
        pytest.skip("this onnxruntime has no CUDAExecutionProvider (pip install onnxruntime-gpu)")
    run, _ = tiny
    backend, _ = load_backend(run, "onnxruntime", "cuda")
    assert backend.io_binding
    encoder, _ = load_encoder(run)
    x = windows(5, 32)
    out = backend(x.cuda())
    assert out.device.type == "cuda"
    with torch.inference_mode():
        assert verify.compare(out, encoder(x))["min_cosine"] > 0.9999


@pytest.mark.parametrize("precision", ["fp16", "int8"])
def test_tensorrt_engine_matches_torch(tiny, tmp_path, precision):
    pytest.importorskip("tensorrt", reason="TensorRT is not installed (pip install 'swssl[gpu]'); engines need it")
    if not HAS_CUDA:
        pytest.skip("TensorRT engines need a CUDA GPU and torch.cuda.is_available() is False")
    from swssl.inference.backends import TensorRTBackend, load_backend

    run, data = tiny
    result = CliRunner().invoke(cli.export, [str(run), "--trt", "--precision", precision, "--batch", BATCH,
                                             "--data", str(data), "--out", str(tmp_path),
                                             "--calibration-windows", "64"])
    assert result.exit_code == 0, result.output
    manifest = read_manifest(tmp_path / f"tensorrt-{precision}")
    assert manifest["versions"]["tensorrt"] and manifest["gpu"]["compute_capability"]
    assert manifest["verification"]["passed"] and (tmp_path / "tensorrt.timing-cache").is_file()
    backend, _ = load_backend(tmp_path / f"tensorrt-{precision}" / "model.engine", "tensorrt", "cuda")
    assert isinstance(backend, TensorRTBackend) and backend.max_batch == 16
    encoder, _ = load_encoder(run)
    x = windows(20, 32)
    with torch.inference_mode():
        metrics = verify.compare(backend(x.cuda()), encoder(x))
    assert metrics["min_cosine"] >= verify.TOLERANCES[precision].min_cosine
