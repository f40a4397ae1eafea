"""The `lowbit` command line (and its `quantize` shortcut): the group, and every command registered on it.

Each command is a thin module in `lowbit.cli.commands` that parses options and calls the
library (`lowbit.pipeline`); none of them imports this module, so there is no import cycle.
"""

from __future__ import annotations

import click

from .. import __version__
from .commands import bench, compile, embed, evaluate, generate, quantize, run, search, sensitivity
from .options import EXIT_INTERRUPTED, EXIT_USER_ERROR, user_errors

__all__ = ["EXIT_INTERRUPTED", "EXIT_USER_ERROR", "lowbit", "main", "quantize_main", "user_errors"]


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="lowbit")
def lowbit() -> None:
    """lowbit: post-training quantization compiler (integer-only graphs, ONNX export)."""


for _command in (quantize.quantize_command, compile.compile_command, run.run_command, embed.embed_command,
                 bench.bench_command, sensitivity.sensitivity_command, search.search_command, evaluate.eval_command,
                 generate.generate_command):
    lowbit.add_command(_command)


def main() -> None:
    """Console script `lowbit`."""
    lowbit(prog_name="lowbit")


def quantize_main() -> None:
    """Console script `quantize`: the same as `lowbit quantize`."""
    quantize.quantize_command(prog_name="quantize")
