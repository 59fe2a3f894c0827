"""The export stage on a CUDA machine (run by bench/gpu.sh): AOTI fp32/fp16/bf16 on CUDA, parity with PyTorch.

    python -m swssl.export.gpu_check --out bench/reports

Builds a tiny resnet18 run (random weights, generated images), exports AOTInductor packages
for CUDA in fp32, fp16 and bf16 (each verified by the export itself against the CPU fp32
reference), checks the eager encoder under the same precisions on CUDA, the ONNX file under
ONNX Runtime (CPU, and CUDA with IO binding when that provider exists), the same artifacts in
dense mode (feature map: whole images in, cells out), `auto`'s choice, and times each backend.
Writes gpu-export.md and gpu-export.json to --out as it goes, so a run cut short still leaves
what it found. Exit status 1 when any parity check failed.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable

import torch


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="bench/reports", help="Report folder.")
    parser.add_argument("--work", help="Scratch folder (default: a temporary one).")
    parser.add_argument("--precisions", default="fp32,fp16,bf16")
    parser.add_argument("--device", default="cuda", help="cuda (the point of it), or cpu for a smoke test.")
    args = parser.parse_args(argv)
    report = Report(Path(args.out))
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        report.line(f"CUDA is not available (torch {torch.__version__}); nothing to check on a GPU")
        report.save()
        return 2
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="swssl-gpu-"))
    run_checks(report, work, args.precisions.split(","), device)
    report.save()
    return 0 if report.ok else 1


class Report:
    def __init__(self, out: Path):
        self.out = out
        self.out.mkdir(parents=True, exist_ok=True)
        self.lines: list[str] = ["# Export stage on CUDA (bench/gpu.sh)", ""]
        self.data: dict[str, Any] = {"parity": [], "timing": [], "errors": []}
        self.ok = True

    def line(self, text: str = "") -> None:
        print(text, flush=True)
        self.lines.append(text)
        self.save()

    def save(self) -> None:
        (self.out / "gpu-export.md").write_text("\n".join(self.lines) + "\n")
        (self.out / "gpu-export.json").write_text(json.dumps(self.data, indent=2, default=str) + "\n")

    def step(self, name: str, action: Callable[[], Any]) -> Any:
        """Run one check; a failure is reported (with its cause) and the next check still runs."""
        try:
            return action()
        except Exception as exc:  # the report must say what broke and go on
            self.ok = False
            text = f"{type(exc).__name__}: {exc}".strip().splitlines()[0][:400]
            self.data["errors"].append({"step": name, "error": text, "traceback": traceback.format_exc()})
            self.line(f"- **{name} failed**: {text}")
            return None


def run_checks(report: Report, work: Path, precisions: list[str], device: torch.device) -> None:
    from swssl.inference import backends
    from swssl.export import verify as verification
    from swssl.export.errors import VerificationError
    from swssl.export.graph import GraphSpec
    from swssl.export.manifest import gpu_info, library_versions
    from swssl.export.pipeline import ExportRequest, export_run, load_source
    from swssl.export.profile import BatchProfile
    from swssl.export.tiny import make_tiny_run

    gpu = gpu_info(device) or {"name": platform.processor() or "CPU", "compute_capability": "-"}
    versions = library_versions()
    report.data.update(device=str(device), gpu=gpu, versions=versions, python=platform.python_version())
    report.line(f"Device: {device}, {gpu['name']} (compute capability {gpu['compute_capability']}); "
                f"torch {torch.__version__} (CUDA {torch.version.cuda}); onnxruntime {versions['onnxruntime']}; "
                f"TensorRT {versions['tensorrt']}")
    report.line()
    run, data = make_tiny_run(work, "resnet18", height=384, width=256, patch=128, step=64)
    source = load_source(run)
    profile = BatchProfile(1, 64, 256)
    windows, where = verification.training_windows(source.config, run, data, verification.default_window_count(profile))
    reference = verification.reference_embeddings(source.encoder, windows)

    def probe(mode: str) -> verification.Probe:
        """What an artifact of `mode` is checked on: the windows above, or whole training images (dense)."""
        config = source.config.with_mode(mode)
        if mode == "exact":
            return verification.Probe(GraphSpec.of(config, profile), windows, reference, where)
        return verification.make_probe(source.encoder, config, GraphSpec.of(config, BatchProfile(1, 1, 1)), run, data)

    report.line(f"Run: resnet18, random weights, patch 128; verification on {where}; reference: CPU fp32.")
    report.line()
    report.line("## Parity with the PyTorch fp32 reference")
    report.line()
    report.line("| artifact | precision | max abs | max rel | min cosine | tolerance (rel, cos) | passed | seconds |")
    report.line("|---|---|---|---|---|---|---|---|")

    def row(name: str, precision: str, result: dict[str, Any], seconds: float | None) -> None:
        t = result["tolerance"]
        report.data["parity"].append({"artifact": name, "precision": precision, **result, "seconds": seconds})
        if not result["passed"]:
            report.ok = False
        report.line(f"| {name} | {precision} | {result['max_abs_error']:.2e} | {result['max_rel_error']:.2e} | "
                    f"{result['min_cosine']:.6f} | {t['max_rel_error']:g}, {t['min_cosine']:g} | "
                    f"{'yes' if result['passed'] else '**NO**'} | {'' if seconds is None else f'{seconds:.1f}'} |")

    def eager(precision: str) -> None:
        from swssl.export.pipeline import strict_fp32

        backend = backends.TorchBackend(_fresh(source), device, precision=precision)
        with strict_fp32(device, precision):
            result = verification.verify(backend, windows, reference, precision, profile, where, str(device))
        row(f"torch eager ({device.type}{', TF32 off' if precision == 'fp32' and device.type == 'cuda' else ''})",
            precision, result, None)

    for precision in precisions:
        report.step(f"torch eager {precision}", lambda p=precision: eager(p))

    def aoti(precision: str, mode: str = "exact") -> None:
        started = time.perf_counter()
        request = ExportRequest(kinds=("aoti",), precision=precision, batch=profile if mode == "exact" else None,
                                mode=mode, device=str(device), data=data)
        dense = mode == "dense"
        manifest_path = run / "export" / f"aoti-{device.type}-{precision}{'-dense' if dense else ''}" / "manifest.json"
        try:
            export_run(run, request, echo=lambda text: None)
        except VerificationError:  # past tolerance: the manifest still holds the numbers
            pass
        seconds = time.perf_counter() - started
        manifest = json.loads(manifest_path.read_text())
        label = f"AOTInductor .pt2 ({device.type}{', dense' if dense else ''})"
        row(label, precision, manifest["verification"], seconds)

    for mode in ("exact", "dense"):
        for precision in precisions:
            report.step(f"aoti {device.type} {precision} {mode}", lambda p=precision, m=mode: aoti(p, m))

    def onnx(mode: str = "exact") -> None:
        import importlib.util

        absent = [m for m in ("onnx", "onnxscript", "onnxruntime") if importlib.util.find_spec(m) is None]
        if absent:
            report.line(f"| ONNX | - | - | - | - | - | not run: {', '.join(absent)} not installed | |")
            return
        started = time.perf_counter()
        request = ExportRequest(kinds=("onnx",), batch=profile if mode == "exact" else None, mode=mode, data=data)
        [manifest_path] = export_run(run, request, echo=lambda text: None)
        manifest = json.loads(Path(manifest_path).read_text())
        suffix = ", dense" if mode == "dense" else ""
        row(f"ONNX, onnxruntime CPU{suffix}", "fp32", manifest["verification"], time.perf_counter() - started)
        import onnxruntime

        if device.type != "cuda":
            return
        if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
            index = device.index if device.index is not None else torch.cuda.current_device()
            providers = [("CUDAExecutionProvider", {"device_id": index, "use_tf32": 0}), "CPUExecutionProvider"]
            backend = backends.OnnxRuntimeBackend(Path(manifest_path).parent / "model.onnx", device, providers)
            backend.stride = source.config.stride
            row(f"ONNX, {backend.name} IO binding, TF32 off{suffix}", "fp32",
                probe(mode).check(backend, "fp32", "cuda"), None)
        else:
            report.line("| ONNX, onnxruntime CUDA | - | - | - | - | - | not run: this onnxruntime has no CUDA provider | |")

    report.step("onnx", onnx)
    report.step("onnx dense", lambda: onnx("dense"))

    def auto() -> None:
        backend, _ = backends.load_backend(run, "auto", device)
        report.data["auto"] = backend.reason
        report.line()
        report.line(f"`load_backend(run, 'auto', '{device}')`: {backend.reason}")

    report.step("auto", auto)
    report.step("timing", lambda: timing(report, run, source, device, precisions))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _fresh(source):
    import copy

    return copy.deepcopy(source.encoder)


def timing(report: Report, run: Path, source, device: torch.device, precisions: list[str]) -> None:
    """Windows per second at batch 64 and 256 (128 px), each backend warmed up first."""
    from swssl.inference import backends

    report.line()
    report.line(f"## Throughput on {device} (windows/s, resnet18, 128 px windows)")
    report.line()
    report.line("| backend | precision | batch 64 | batch 256 |")
    report.line("|---|---|---|---|")
    candidates: list[tuple[str, str, Callable[[], backends.Backend]]] = []
    for precision in precisions:
        candidates.append(("torch eager", precision,
                           lambda p=precision: backends.TorchBackend(_fresh(source), device, precision=p)))
    for precision in precisions:
        if (run / "export" / f"aoti-{device.type}-{precision}").is_dir():
            candidates.append(("aoti", precision, lambda p=precision: backends.load_backend(
                run / "export" / f"aoti-{device.type}-{p}" / "model.pt2", "aoti", device)[0]))
    if (run / "export" / "onnx").is_dir() and backends._runtime_problem("onnxruntime", device) is None:
        candidates.append(("onnxruntime", "fp32", lambda: backends.load_backend(run, "onnxruntime", device)[0]))
    for name, precision, make in candidates:
        backend = report.step(f"timing {name} {precision}", make)
        if backend is None:
            continue
        rates = []
        for batch in (64, 256):
            x = torch.rand(batch, 1, 128, 128, device=device)
            for _ in range(3):
                backend(x)
            _sync(device)
            started, repeats = time.perf_counter(), 20 if device.type == "cuda" else 2
            for _ in range(repeats):
                backend(x)
            _sync(device)
            rates.append(batch * repeats / (time.perf_counter() - started))
        report.data["timing"].append({"backend": name, "precision": precision, "batch64": rates[0], "batch256": rates[1]})
        report.line(f"| {name} | {precision} | {rates[0]:,.0f} | {rates[1]:,.0f} |")


if __name__ == "__main__":
    sys.exit(main())
