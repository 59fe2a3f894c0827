"""`swssl-export`: the export stage's command line (a thin click wrapper over swssl.export.pipeline).

Exit status: 0 exported and verified; 1 an export failed (verification past tolerance, a bad
option, a build error), one line `error: ...`; 2 something this machine or the request lacks
(the run or its checkpoint, TensorRT, a GPU, the export extra), one line naming what to install.
"""
from __future__ import annotations

from pathlib import Path

import click

from swssl.registry import ARTIFACTS
from swssl.cli import CONTEXT, friendly_errors
from swssl.export.profile import DEFAULT_BATCH, DEFAULT_DENSE_BATCH


def artifact_flags(command):
    """One flag per artifact kind (swssl.registry), each collected into `kinds`."""
    for kind in reversed(ARTIFACTS):
        command = click.option(kind.flag, "kinds", flag_value=kind.name, multiple=True, help=kind.help)(command)
    return command


@click.command(context_settings=CONTEXT)
@click.argument("run_dir", type=click.Path(path_type=Path))
@artifact_flags
@click.option("--precision", type=click.Choice(["fp32", "fp16", "bf16", "int8"]), default="fp32", show_default=True,
              help="TensorRT: fp16/bf16 builder flags, int8 by entropy calibration; AOTI: weights cast to fp16/bf16; "
                   "ONNX: fp32, and with int8 also a statically quantized copy for the CPU (onnx-int8/).")
@click.option("--mode", type=click.Choice(["exact", "dense"]),
              help="exact: windows in, embeddings out; dense: images (tiles) in, the trunk's feature cells out, "
                   "to RUN_DIR/export/<format>-dense/ (for swssl-infer --mode dense). Default: the run's own mode.")
@click.option("--batch", "batch",
              help=f"MIN,OPT,MAX per call: the dynamic batch range (TensorRT optimisation profile); windows "
                   f"(default {DEFAULT_BATCH}), or images with --mode dense (default {DEFAULT_DENSE_BATCH}).")
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path),
              help="Artifact folder (default RUN_DIR/export).")
@click.option("--device", default="auto", show_default=True,
              help="Device for --aoti and --trt: auto (CUDA when there is one), cpu, cuda or cuda:N.")
@click.option("--data", type=click.Path(exists=True, path_type=Path),
              help="Training data for verification and INT8 calibration (default: the images of the run's "
                   "memory bank, else the demo data).")
@click.option("--verify-windows", type=click.IntRange(min=1),
              help="Windows compared with PyTorch (default MIN+OPT+7); dense artifacts are compared on whole images.")
@click.option("--calibration-windows", default=512, show_default=True, type=click.IntRange(min=1),
              help="Normal training windows for INT8 calibration (dense mode calibrates on 8 whole images).")
@click.option("--opset", default=18, show_default=True, type=click.IntRange(min=17),
              help="ONNX opset (18+: torch.export-based exporter; 17: the legacy TorchScript exporter).")
@click.option("--version-compatible", is_flag=True,
              help="TensorRT: an engine that also runs on later TensorRT releases of the same major version.")
@click.option("--timing-cache", type=click.Path(dir_okay=False, path_type=Path),
              help="TensorRT timing cache file (default OUT/tensorrt.timing-cache), reused across builds.")
@friendly_errors
def export(run_dir: Path, kinds: tuple[str, ...], precision: str, mode: str | None, batch: str | None,
           out_dir: Path | None, device: str, data: Path | None, verify_windows: int | None, calibration_windows: int,
           opset: int, version_compatible: bool, timing_cache: Path | None) -> None:
    """Export RUN_DIR's encoder for inference and verify each artifact against PyTorch.

    Input: a batch of raw windows (N x 1 x P x P, float32 in [0, 1]); output: N x D embeddings.
    With --mode dense: raw images N x 1 x H x W (multiples of 32) in, cells N x D x H/32 x W/32 out.
    Each artifact gets a manifest.json (source checkpoint, configuration, interface, precision,
    batch profile, versions, verification numbers) that the loaders check.

    Examples: swssl-export runs/demo; swssl-export runs/demo --aoti --device cpu;
    swssl-export runs/dbt --trt --precision fp16 --batch 1,256,512; swssl-export runs/demo --onnx --mode dense
    """
    from swssl.export.pipeline import ExportRequest, export_run
    from swssl.export.profile import BatchProfile

    request = ExportRequest(kinds=kinds, precision=precision, mode=mode,
                            batch=BatchProfile.parse(batch) if batch is not None else None, out=out_dir,
                            device=device, data=data, verify_windows=verify_windows,
                            calibration_windows=calibration_windows, opset=opset,
                            version_compatible=version_compatible, timing_cache=timing_cache)
    manifests = export_run(run_dir, request, echo=click.echo)
    for manifest in manifests:
        click.echo(f"manifest: {manifest}")
