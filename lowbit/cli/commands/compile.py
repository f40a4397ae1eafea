"""`lowbit compile DIR [--target "llvm -mcpu=native"]`: compile an artifact's integer IR with TVM into DIR/tvm/.

The compiled model must give the reference executor's integers on CHECK_INPUTS random inputs
(saturating ones included), or nothing is replaced.
"""

from __future__ import annotations

import os
import secrets
import shutil
import tempfile
from pathlib import Path

import click

from ...errors import LowbitError
from ...ir import QuantizedGraph
from ...pipeline import checks
from ...pipeline.artifact import update_manifest
from ...pipeline.progress import Progress
from ...runtime.loader import MANIFEST, TVM_DIR, read_manifest
from ..options import rpc_options, rpc_target, tuning_options, user_errors


@click.command("compile")
@click.argument("directory", type=click.Path(path_type=Path, file_okay=False))
@click.option("--target", default="llvm -mcpu=native", show_default=True,
              help='TVM target: "llvm -mcpu=NAME" (native = this CPU; CPUs only so far; with --rpc-tracker, the '
                   "remote devices' CPU).")
@tuning_options
@rpc_options
@click.option("--force", is_flag=True, help="Replace an existing DIR/tvm (once the new one is compiled and checked).")
@user_errors
def compile_command(directory: Path, target: str, tune_trials: int | None, tuning_cache: Path | None,
                    rpc_tracker: str | None, rpc_key: str | None, force: bool) -> None:
    """Compile the integer IR in DIRECTORY (a `lowbit quantize` output) with TVM into DIRECTORY/tvm.

    With --rpc-tracker/--rpc-key, the compiled model is checked and timed on a remote device, and tuning
    measures there."""
    if not checks.tvm_available():
        raise LowbitError("TVM is not installed: pip install 'lowbit[tvm]' (apache-tvm)")
    rpc = rpc_target(rpc_tracker, rpc_key)
    if not (directory / MANIFEST).is_file():
        raise LowbitError(f"{directory}: not a lowbit artifact (no {MANIFEST}); create one with `lowbit quantize`")
    dest = directory / TVM_DIR
    if dest.exists() and not force:
        raise LowbitError(f"{dest}: already compiled; pass --force to replace it")
    progress = Progress()
    qgraph = QuantizedGraph.load(directory / "ir")
    text = read_manifest(directory).get("text")
    if text:  # a text model: random token ids and masks, as many ids as its embedding table has rows
        inputs = checks.text_check_inputs(None, int(text["vocab_size"]), int(text["seq_len"]))
    else:
        inputs = checks.check_inputs(tuple(qgraph.values[qgraph.inputs[0]].shape))
    tmp = Path(tempfile.mkdtemp(prefix=".tvm.tmp-", dir=directory))
    try:
        with progress.stage("compile"):
            summary = checks.compile_and_check(qgraph, tmp, target, inputs, lambda m: progress.echo("compile", m),
                                               tune_trials=tune_trials, tuning_cache=tuning_cache, rpc=rpc)
        if not summary["bit_exact"]:
            raise LowbitError(f"{checks.failure_message('the compiled model', summary, inputs)}; nothing was "
                              "replaced (please report this model)")
        old = directory / f".tvm.old-{secrets.token_hex(4)}"
        if dest.exists():
            os.rename(dest, old)
        try:
            os.rename(tmp / TVM_DIR, dest)
            update_manifest(directory, summary)
        except BaseException:  # Ctrl-C included: put the old tvm/ back, which the manifest still describes
            shutil.rmtree(dest, ignore_errors=True)
            if old.exists():
                os.rename(old, dest)
            raise
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    latency = f", {summary['latency_ms']:.2f} ms per batch"
    if rpc is not None:
        latency += f" on {summary['rpc']['device']} ({rpc.describe()})"
    progress.echo("done", f"{dest}: {summary['target']}, bit-exact with the reference on {inputs.describe()}"
                          f"{latency} ({progress.elapsed():.1f}s)")
