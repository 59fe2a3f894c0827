"""`swssl <command>` (and `python -m swssl <command>`): one entry point over every swssl-* command.

The commands are named ("module:attribute", as in swssl.registry), not imported: the group imports a
command's module only when that command is used or listed (click's LazyGroup pattern), and no command
module imports torch or numpy at the top, so `swssl --help` answers at once.
"""
from __future__ import annotations

import click

from swssl.cli import CONTEXT
from swssl.registry import load

COMMANDS = {
    "demo-data": "swssl.cli:demo_data",
    "train": "swssl.cli:train",
    "bank": "swssl.cli:bank",
    "eval": "swssl.cli:evaluate",
    "compare": "swssl.cli:compare",
    "infer": "swssl.cli:infer",
    "export": "swssl.export.cli:export",
    "bench": "swssl.bench.cli:bench",
    "config": "swssl.cli:show_config",
}


class LazyGroup(click.Group):
    """A group whose subcommands are imported when first looked up, from "module:attribute" names."""

    def __init__(self, *args, lazy_commands: dict[str, str], **kwargs):
        super().__init__(*args, **kwargs)
        self.lazy_commands = lazy_commands

    def list_commands(self, ctx: click.Context) -> list[str]:
        return [*super().list_commands(ctx), *self.lazy_commands]

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name in self.lazy_commands:
            return load(self.lazy_commands[name])
        return super().get_command(ctx, name)


@click.group(cls=LazyGroup, lazy_commands=COMMANDS, context_settings=CONTEXT)
@click.version_option(package_name="swssl", prog_name="swssl")
def main() -> None:
    """SWSSL anomaly detection in large medical images. Each command is also a script of its own
    (swssl train = swssl-train); `swssl COMMAND -h` for its options.

    Example: swssl demo-data data/demo; swssl train --preset demo --data data/demo --out runs/demo
    """
