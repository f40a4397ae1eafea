"""`lowbit bench DIR --against onnxruntime`: latency of the compiled model and the ONNX models, as JSON.

With --rpc-tracker/--rpc-key the compiled model is timed on a remote device instead (ONNX Runtime
is not: it would run here, which says nothing about the device)."""

from __future__ import annotations

import json
from pathlib import Path

import click

from ...errors import LowbitError
from ...pipeline.bench import bench
from ..options import rpc_options, rpc_target, user_errors


@click.command("bench")
@click.argument("directory", type=click.Path(path_type=Path, file_okay=False))
@click.option("--against", type=click.Choice(["onnxruntime", "none"]), multiple=True, default=("onnxruntime",),
              show_default=True, help="Also time the artifact's ONNX models in ONNX Runtime, in the same process.")
@click.option("--repeats", type=int, default=100, show_default=True, help="Runs per median.")
@click.option("--rounds", type=int, default=3, show_default=True, help="Interleaved rounds; the best median counts.")
@click.option("--threads", type=int, default=2, show_default=True, help="ONNX Runtime intra-op threads.")
@rpc_options
@user_errors
def bench_command(directory: Path, against: tuple[str, ...], repeats: int, rounds: int, threads: int,
                  rpc_tracker: str | None, rpc_key: str | None) -> None:
    """Time the compiled model in DIRECTORY (batch as compiled) against ONNX Runtime; prints JSON."""
    if repeats < 1 or rounds < 1:
        raise LowbitError("--repeats and --rounds must be at least 1")
    rpc = rpc_target(rpc_tracker, rpc_key)
    if rpc is not None:
        from ...codegen.tvm.remote_model import bench_remote

        click.echo(json.dumps(bench_remote(directory, rpc, repeats, rounds), indent=2))
        return
    click.echo(json.dumps(bench(directory, against, repeats, rounds, threads), indent=2))
