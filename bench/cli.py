"""`swssl-bench`: throughput, latency and memory of every path, side by side with the official way.

    swssl-bench --device cpu --out bench/reports          # make bench: about 3 minutes on 2 cores
    python -m swssl.bench.cli --device cuda --backbone wide_resnet50_2 --backbone resnet18   # bench/gpu.sh
"""
from __future__ import annotations

import shlex
import sys
from pathlib import Path

import click

from swssl.cli import CONTEXT, friendly_errors
from swssl.registry import BACKBONE_NAMES


def _list(kind: type):
    def parse(ctx: click.Context, param: click.Parameter, value: str | None):
        if value is None:
            return None
        try:
            items = [kind(part) for part in value.replace(" ", "").split(",") if part]
        except ValueError:
            raise click.BadParameter(f"expected comma-separated {kind.__name__} values, not {value!r}") from None
        if not items:
            raise click.BadParameter("expected at least one value")
        return items
    return parse


@click.command(context_settings={**CONTEXT, "max_content_width": 100})
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True,
              help="Where to measure (auto: cuda when there is one). Defaults below depend on it.")
@click.option("--backbone", "backbones", multiple=True, type=click.Choice(BACKBONE_NAMES),
              help="Encoder(s) to measure, repeatable [default: resnet18; wide_resnet50_2 is the paper's "
                   "(about 40 windows/s on 2 CPU cores)].")
@click.option("--backends", callback=_list(str), help="Comma list of torch, torch-compiled, onnxruntime, aoti, "
              "tensorrt [default: cpu torch,onnxruntime,aoti; cuda torch,onnxruntime,aoti,tensorrt; unavailable "
              "ones are listed as skipped].")
@click.option("--precisions", callback=_list(str), help="Torch eager precisions [default: cpu fp32,bf16; cuda "
              "fp32,bf16,fp16].")
@click.option("--modes", callback=_list(str), help="Geometry modes: exact (window by window, as the paper) and/or "
              "dense (one trunk pass per slice) [default: exact,dense].")
@click.option("--export-precisions", callback=_list(str), help="Export precisions [default: cpu fp32,int8; cuda "
              "fp16]: AOTInductor and TensorRT in each; ONNX Runtime runs the float32 file, and the INT8 one "
              "when int8 is listed (AOTInductor has no int8).")
@click.option("--batches", callback=_list(int), help="Encoder batch sizes [default: cpu 1,4,16,64,256; cuda "
              "1,8,32,128,512].")
@click.option("--e2e-batch", type=click.IntRange(1),
              help="Runner batch size end to end [default: probed per path, as swssl-infer does].")
@click.option("--bank-sizes", callback=_list(int),
              help="Bank rows of the bank-scaling table (synthetic 512-d; brute force, FAISS flat and IVF, coreset) "
                   "[default: 10000,100000; 0: none; 1000000 takes about 10 minutes on 2 cores].")
@click.option("--slides", type=click.IntRange(1), help="DBT-sized slices end to end [default: cpu 8, cuda 16].")
@click.option("--bank-images", type=click.IntRange(1), help="Normal images in the memory bank [default: cpu 4, cuda 8].")
@click.option("--data", default=None, help="Slices from: auto (the demo data when here or buildable, else "
              "synthetic), demo, synthetic, or a dataset folder/manifest (its test split) [default: auto].")
@click.option("--slide-size", type=click.IntRange(128), help="Side of the generated native slide in px "
              "[default: cpu 4096, cuda 8192].")
@click.option("--official-windows", type=click.IntRange(1), help="Windows timed the official way "
              "[default: cpu 200, cuda 300].")
@click.option("--warmup", type=click.IntRange(0), help="Untimed calls before each measurement.")
@click.option("--repeats", type=click.IntRange(1), help="Timed repetitions (at least) per measurement.")
@click.option("--min-seconds", type=click.FloatRange(0), help="Keep repeating short calls until this much time.")
@click.option("--peak-size", type=click.IntRange(16), help="n of the n x n matmul that measures the peak.")
@click.option("--budget", type=click.FloatRange(0), default=0, show_default=True,
              help="Seconds after which steps not yet started are skipped (0: no limit).")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=Path("bench/reports"),
              show_default=True, help="Report folder: <device>-<date>.md, .json, .png.")
@click.option("--name", help="Report file stem instead of <device>-<date>.")
@click.option("--work", type=click.Path(file_okay=False, path_type=Path),
              help="Scratch folder (runs, exports, images) [default: a temporary one, removed at the end].")
@click.option("--keep-work", is_flag=True, help="Keep the temporary scratch folder.")
@click.option("--smoke", is_flag=True, help="Tiny geometry and counts: checks the harness in seconds (numbers meaningless).")
@click.option("--seed", type=int, default=0, show_default=True)
@friendly_errors
def bench(device: str, backbones: tuple[str, ...], smoke: bool, out: Path, **given) -> None:
    """Benchmark the encoder paths, the runner end to end and the official way on this machine; write a report."""
    import torch

    from swssl.bench import session
    from swssl.device import parse_device

    device = parse_device(device).type
    unknown = [b for b in given["backends"] or [] if b not in session.BACKENDS]
    if unknown:
        raise click.BadParameter(f"unknown backend(s) {', '.join(unknown)}; choose from {', '.join(session.BACKENDS)}",
                                 param_hint="--backends")
    wrong_modes = [m for m in given["modes"] or [] if m not in ("exact", "dense")]
    if wrong_modes:
        raise click.BadParameter(f"unknown mode(s) {', '.join(wrong_modes)}; choose from exact, dense",
                                 param_hint="--modes")
    for name in ("precisions", "export_precisions"):
        wrong = [p for p in given[name] or [] if p not in session.PRECISIONS]
        if wrong:
            raise click.BadParameter(f"unknown precision(s) {', '.join(wrong)}; choose from "
                                     f"{', '.join(session.PRECISIONS)}", param_hint=f"--{name.replace('_', '-')}")
    command = shlex.join(["swssl-bench", *sys.argv[_depth(click.get_current_context()):]])
    options = session.make_options(torch.device(device), out, smoke=smoke, backbones=list(backbones) or None,
                                   command=command, **given)
    result, written = session.run(options)
    for line in result.get("headline", []):
        click.echo(line)
    click.echo("report: " + ", ".join(str(p) for p in written))
    problems = result["errors"] + [e for m in result["models"] for e in m["errors"]]
    if problems:
        click.echo(f"{len(problems)} step(s) failed (see the report)", err=True)
        raise SystemExit(1)


def _depth(ctx: click.Context) -> int:
    """How many words of sys.argv name the command (1 for swssl-bench, 2 for `swssl bench`): the rest are
    its arguments, which the report's reproduction line repeats."""
    return 1 if ctx.parent is None else 1 + _depth(ctx.parent)


if __name__ == "__main__":
    bench()
