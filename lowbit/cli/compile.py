"""`lowbit compile`, `lowbit run` and `lowbit bench`: the compiled (TVM) side of an artifact.

    lowbit compile DIR [--target "llvm -mcpu=native"]   -> DIR/tvm/ (model.so, params.npz, tvm.json)
    lowbit run DIR --input x.npy [-o y.npy]
    lowbit bench DIR --against onnxruntime               -> latency ratios as JSON
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click
import numpy as np

from ..errors import LowbitError
from ..ir import QuantizedGraph
from ..runtime.loader import MANIFEST, TVM_DIR
from .artifact import file_hashes
from .main import lowbit, user_errors
from .options import tuning_options
from .progress import Progress

EXACT_CHECK_INPUTS = 8


def tvm_available() -> bool:
    try:
        import tvm  # noqa: F401
    except ImportError:
        return False
    return True


def compile_and_check(qgraph: QuantizedGraph, directory: Path, target: str, x: np.ndarray,
                      log: Callable[[str], None], want: dict[str, np.ndarray] | None = None,
                      tune_trials: int | None = None, tuning_cache: Path | None = None) -> dict[str, Any]:
    """Compile into `directory/tvm` and check the runtime against the reference executor on `x`, bit for bit.

    `want` may hold the reference outputs on `x` when the caller has them already.
    """
    from ..codegen.tvm import compile_to
    from ..quantizer.reference import run_reference
    from ..runtime import load

    meta = compile_to(qgraph, directory, target, log, tune_trials, tuning_cache)
    model = load(directory, verify=False)
    got = model.run(x)
    got = got if isinstance(got, dict) else {qgraph.outputs[0]: got}
    if want is None:
        want = run_reference(qgraph, x)
    exact = all(np.array_equal(got[name], want[name][:len(x)]) for name in qgraph.outputs)
    latency = model.benchmark(x[:1], repeats=50, warmup=20)
    tuning = meta["tuning"] and {k: v for k, v in meta["tuning"].items() if k != "layers"}
    return {"target": meta["target_string"], "kernels": meta["kernels"], "compile_seconds": meta["compile_seconds"],
            "tuning": tuning, "bit_exact": exact, "samples": len(x),
            "latency_ms": latency["median_ms"]}


def _update_manifest(directory: Path, tvm_summary: dict[str, Any]) -> None:
    """Re-hash every file and record the compiled model; written to a temp file, then renamed."""
    path = directory / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise LowbitError(f"{path}: cannot read: {e}") from e
    manifest["tvm"] = tvm_summary
    manifest["files"] = file_hashes(directory)
    fd, tmp = tempfile.mkstemp(prefix=f".{MANIFEST}.", dir=directory)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(manifest, indent=2, allow_nan=False) + "\n")
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)  # a stray file would fail the artifact's own hash check
        raise


def _input_shape(qgraph: QuantizedGraph) -> tuple[int, ...]:
    return tuple(qgraph.values[qgraph.inputs[0]].shape)


@lowbit.command("compile")
@click.argument("directory", type=click.Path(path_type=Path, file_okay=False))
@click.option("--target", default="llvm -mcpu=native", show_default=True,
              help='TVM target: "llvm -mcpu=NAME" (native = this CPU; CPUs only so far).')
@tuning_options
@click.option("--force", is_flag=True, help="Replace an existing DIR/tvm (once the new one is compiled and checked).")
@user_errors
def compile_command(directory: Path, target: str, tune_trials: int | None, tuning_cache: Path | None,
                    force: bool) -> None:
    """Compile the integer IR in DIRECTORY (a `lowbit quantize` output) with TVM into DIRECTORY/tvm."""
    if not tvm_available():
        raise LowbitError("TVM is not installed: pip install 'lowbit[tvm]' (apache-tvm)")
    if not (directory / MANIFEST).is_file():
        raise LowbitError(f"{directory}: not a lowbit artifact (no {MANIFEST}); create one with `lowbit quantize`")
    dest = directory / TVM_DIR
    if dest.exists() and not force:
        raise LowbitError(f"{dest}: already compiled; pass --force to replace it")
    progress = Progress()
    qgraph = QuantizedGraph.load(directory / "ir")
    x = np.random.default_rng(0).standard_normal((EXACT_CHECK_INPUTS, *_input_shape(qgraph)[1:]), dtype=np.float32)
    tmp = Path(tempfile.mkdtemp(prefix=".tvm.tmp-", dir=directory))
    try:
        with progress.stage("compile"):
            summary = compile_and_check(qgraph, tmp, target, x, lambda m: progress.echo("compile", m),
                                        tune_trials=tune_trials, tuning_cache=tuning_cache)
        if not summary["bit_exact"]:
            raise LowbitError(f"the compiled model does not match the reference executor on {len(x)} random inputs; "
                              "nothing was replaced (please report this model)")
        old = directory / f".tvm.old-{secrets.token_hex(4)}"
        if dest.exists():
            os.rename(dest, old)
        try:
            os.rename(tmp / TVM_DIR, dest)
            _update_manifest(directory, summary)
        except BaseException:  # Ctrl-C included: put the old tvm/ back, which the manifest still describes
            shutil.rmtree(dest, ignore_errors=True)
            if old.exists():
                os.rename(old, dest)
            raise
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    latency = f", {summary['latency_ms']:.2f} ms per batch"
    progress.echo("done", f"{dest}: {summary['target']}, bit-exact with the reference on {len(x)} random inputs"
                          f"{latency} ({progress.elapsed():.1f}s)")


def _load_array(path: Path) -> np.ndarray:
    try:
        data = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise LowbitError(f"{path}: cannot read a float array (.npy, or .npz with one array): {e}") from e
    if isinstance(data, np.lib.npyio.NpzFile):
        with data:
            if len(data.files) != 1:
                raise LowbitError(f"{path}: holds {len(data.files)} arrays ({data.files}); expected one")
            data = data[data.files[0]]
    if not np.all(np.isfinite(data)):
        raise LowbitError(f"{path}: contains NaN or Inf")
    return data


@lowbit.command("run")
@click.argument("directory", type=click.Path(path_type=Path, file_okay=False))
@click.option("--input", "input_path", required=True, type=click.Path(path_type=Path, dir_okay=False),
              help="Float input, as the model takes it (e.g. (N, 3, 224, 224) preprocessed), .npy or .npz.")
@click.option("-o", "--output", type=click.Path(path_type=Path, dir_okay=False), help="Write the output (.npy).")
@user_errors
def run_command(directory: Path, input_path: Path, output: Path | None) -> None:
    """Run the compiled model in DIRECTORY on an input array."""
    from ..runtime import load

    model = load(directory)
    y = model.run(_load_array(input_path))
    if not isinstance(y, np.ndarray):
        raise LowbitError("this model has several outputs; use lowbit.runtime.load(DIR).run() from Python")
    if output is not None:
        fd, tmp = tempfile.mkstemp(prefix=f".{output.name}.", suffix=".npy", dir=output.parent or Path("."))
        with os.fdopen(fd, "wb") as f:
            np.save(f, y)
        os.replace(tmp, output)
    summary = f"output {y.shape} {y.dtype}"
    if y.ndim == 2:
        summary += f"; top-1 per row: {np.argmax(y, axis=1)[:16].tolist()}{' ...' if len(y) > 16 else ''}"
    click.echo(summary + (f"; wrote {output}" if output else ""))


def _median_ms(fn: Callable[[], Any], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return float(np.median(times))


def bench(directory: Path, against: tuple[str, ...], repeats: int, rounds: int, threads: int) -> dict[str, Any]:
    """Median latency at batch 1 of the compiled model and of the ONNX models, interleaved; min over rounds."""
    from ..runtime import load

    model = load(directory)
    x = np.random.default_rng(0).standard_normal(model.inputs[0]["shape"]).astype(np.float32)
    runners: dict[str, Callable[[], Any]] = {"tvm": lambda: model.run(x)}
    if "onnxruntime" in against:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        for file in ("model.onnx", "model.int.onnx"):
            session = ort.InferenceSession(str(directory / file), options, providers=["CPUExecutionProvider"])
            feed = {session.get_inputs()[0].name: x}
            runners[f"onnxruntime:{file}"] = lambda s=session, f=feed: s.run(None, f)
    for fn in runners.values():  # warm-up
        for _ in range(10):
            fn()
    best = {name: float("inf") for name in runners}
    for _ in range(rounds):
        for name, fn in runners.items():
            best[name] = min(best[name], _median_ms(fn, repeats))
    result: dict[str, Any] = {
        "directory": str(directory), "target": model.target, "batch": model.inputs[0]["shape"][0],
        "threads": threads, "repeats": repeats, "rounds": rounds, "latency_ms": best,
        "ratios": {f"tvm / {name}": best["tvm"] / best[name] for name in best if name != "tvm"},
    }
    return result


@lowbit.command("bench")
@click.argument("directory", type=click.Path(path_type=Path, file_okay=False))
@click.option("--against", type=click.Choice(["onnxruntime", "none"]), multiple=True, default=("onnxruntime",),
              show_default=True, help="Also time the artifact's ONNX models in ONNX Runtime, in the same process.")
@click.option("--repeats", type=int, default=100, show_default=True, help="Runs per median.")
@click.option("--rounds", type=int, default=3, show_default=True, help="Interleaved rounds; the best median counts.")
@click.option("--threads", type=int, default=2, show_default=True, help="ONNX Runtime intra-op threads.")
@user_errors
def bench_command(directory: Path, against: tuple[str, ...], repeats: int, rounds: int, threads: int) -> None:
    """Time the compiled model in DIRECTORY (batch as compiled) against ONNX Runtime; prints JSON."""
    if repeats < 1 or rounds < 1:
        raise LowbitError("--repeats and --rounds must be at least 1")
    click.echo(json.dumps(bench(directory, against, repeats, rounds, threads), indent=2))
