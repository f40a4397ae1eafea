"""Compile a `QuantizedGraph` with TVM and write the runtime's artifact (DIR/tvm/).

    tvm/model.so    the compiled Relax VM executable (kernels + graph)
    tvm/params.npz  the pre-packed constants `main` takes after the inputs
    tvm/tvm.json    target, required instruction sets, interface, parameter order,
                    and the sha256 of the two files above (checked by the runtime)
"""

from __future__ import annotations

import contextlib
import functools
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import tvm

from ... import __version__
from ...errors import LowbitError
from ...io import write_json
from ...ir import QuantizedGraph
from ...ir.ops import embedding
from ...ir.weights import u8s8_pairs_exact
from ...runtime.loader import TVM_DIR, TVM_FORMAT, TVM_META, sha256_file, use_threads
from . import kernels
from .lower import Lowered, lower
from .target import parse_target, required_features, target_string

Log = Callable[[str], None]


def layer_kernels(target: dict[str, Any]) -> tuple[Callable[..., Any] | None, Callable[..., Any] | None, str]:
    """The conv and dense kernel builders for `target`, and a name for the report."""
    features = set(required_features(target))
    if target["kind"] == "llvm" and "avx2" in features:
        return x86_layer_kernels(target, vnni="avxvnni" in features or {"avx512vnni", "avx512vl"} <= features,
                                 avx512="avx512f" in features)
    return None, None, "portable"


def x86_layer_kernels(target: dict[str, Any], vnni: bool,
                      avx512: bool = False) -> tuple[Callable[..., Any], Callable[..., Any], str]:
    """lowbit's x86 kernels: VNNI dot products (vpdpbusd) where the CPU has them, else AVX2 (vpmaddwd).

    `avx512` lets the requantize epilogue convert float64 to int32 rounding down in one instruction."""
    from . import x86

    options = {"num_threads": int(target.get("num-cores", x86.NUM_THREADS)), "vnni": vnni, "avx512": avx512}
    return (functools.partial(x86.conv2d_nhwc, **options), functools.partial(x86.dense, **options),
            "x86-vnni" if vnni else "x86-avx2")


def use_target_threads(target: dict[str, Any]) -> None:
    """Give TVM's CPU thread pool the target's cores before anything is timed or checked."""
    if target["kind"] == "llvm":
        use_threads(int(target.get("num-cores", 1)))


def build(qgraph: QuantizedGraph, target: dict[str, Any], conv2d: Callable[..., Any] | None = None,
          dense: Callable[..., Any] | None = None,
          integer_outputs: bool = False) -> tuple[tvm.runtime.Executable, Lowered, str]:
    """Lower and compile; returns the executable, the lowered module (for its params) and the kernel set.

    `conv2d`/`dense` override the target's layer kernels (tuned ones, say). `integer_outputs`: `main` also
    returns the integer values under the final dequantize, for bit-exact checks.
    """
    use_target_threads(target)
    fast_conv2d, fast_dense, kernel_set = layer_kernels(target)
    # lowbit's x86 conv kernels (and TunedKernels, which falls back to them) fuse residual adds
    x86 = kernel_set != "portable"
    lowered = lower(qgraph, conv2d or fast_conv2d, dense or fast_dense, fuse_residuals=x86,
                    integer_outputs=integer_outputs, encoder_threads=int(target.get("num-cores", 1)) if x86 else 0)
    try:
        executable = tvm.compile(lowered.mod, target=tvm.target.Target(target))
    except Exception as e:  # TVM's errors carry the failing pass and IR
        raise LowbitError(f"TVM failed to compile {qgraph.name} for {target_string(target)}: {e}") from e
    return executable, lowered, kernel_set


def _value_info(qgraph: QuantizedGraph, name: str) -> dict[str, Any]:
    v = qgraph.values[name]
    valid = embedding.input_ranges(qgraph).get(name)
    return {"name": name, "shape": list(v.shape), "dtype": v.dtype, **({"range": list(valid)} if valid else {})}


def compile_to(qgraph: QuantizedGraph, directory: Path, target_spec: str, log: Log = lambda _: None,
               tune_trials: int | None = None, cache: Path | None = None, rpc: Any = None) -> dict[str, Any]:
    """Compile `qgraph` for `target_spec` into `directory / "tvm"`; returns what tvm.json records.

    With `tune_trials` (0 reuses the records already in the cache), MetaSchedule tunes the
    layers first and each layer keeps whichever of its tuned and hand-written kernels is faster.
    With `rpc` (a `remote.RpcTarget`), both are measured on the devices under its key.
    `directory / "tvm"` must not exist yet: callers build artifacts in a temporary directory.
    """
    target = parse_target(target_spec)
    tuning = None
    conv2d = dense = None
    use_target_threads(target)  # tuning's measurement processes inherit it
    if tune_trials is not None:
        from . import tune

        start = time.perf_counter()
        directory_db = tune.database_dir(cache or tune.default_cache(), target)
        database = tune.tune(qgraph, target, tune_trials, directory_db, log, rpc)
        tuning_s = time.perf_counter() - start
        fast_conv2d, fast_dense, _ = layer_kernels(target)
        # the portable kernels (None here) are what a non-x86 target's tuned kernels race
        tuned = tune.TunedKernels(database, target, fast_conv2d or kernels.conv2d_nhwc, fast_dense or kernels.dense)
        conv2d, dense = tuned.conv2d, tuned.dense
    start = time.perf_counter()
    log(f"lowering {len(qgraph.ops)} ops for {target_string(target)}")
    with contextlib.ExitStack() as stack:
        if tune_trials is not None and rpc is not None:  # tuned kernels race the hand-written ones there
            from .remote import device_session

            tuned.device = stack.enter_context(device_session(rpc))
        executable, lowered, kernel_set = build(qgraph, target, conv2d, dense, integer_outputs=True)
    compile_s = time.perf_counter() - start
    if tune_trials is not None:
        used = sum(c["kernel"] == "tuned" for c in tuned.choices)
        tuning = {"trials": tune_trials, "seconds": round(tuning_s, 1), "database": str(directory_db),
                  "layers_with_records": sum(c["tuned_ms"] is not None for c in tuned.choices),
                  "layers_using_tuned_kernels": used,
                  "layers": {op.name: c for op, c in zip(qgraph.layers, tuned.choices, strict=True)}}
        log(f"{used} of {len(tuned.choices)} layers use a tuned kernel (faster than the hand-written one)")
    out = directory / TVM_DIR
    out.mkdir(parents=False, exist_ok=False)
    executable.export_library(str(out / "model.so"))
    with open(out / "params.npz", "wb") as f:
        np.savez(f, **{f"p{i}": a for i, a in enumerate(lowered.params.values())})
    meta = {
        "format": TVM_FORMAT,
        "lowbit_version": __version__,
        "tvm_version": tvm.__version__,
        "target": target,
        "target_string": target_string(target),
        "required_features": required_features(target),
        "kernels": kernel_set,
        "inputs": [_value_info(qgraph, n) for n in lowered.inputs],
        "outputs": [_value_info(qgraph, n) for n in lowered.outputs],
        # Returned after the outputs; the runtime's run_integers gives them, for checks.
        "integer_outputs": [_value_info(qgraph, n) for n in lowered.integer_outputs],
        "params": list(lowered.params),
        "compile_seconds": round(compile_s, 2),
        "tuning": tuning,
        "files": {name: sha256_file(out / name) for name in ("model.so", "params.npz")},
    }
    write_json(out / TVM_META, meta)
    log(f"compiled with {kernel_set} kernels in {compile_s:.1f}s")
    if kernel_set == "x86-avx2":  # GEMM layers: linears and convs with more than one input channel per group
        pairs = [op.name for op in qgraph.layers if op.attrs["weight_bits"] == 8 and op.arrays["weight"].shape[1] > 1
                 and not u8s8_pairs_exact(op.arrays["weight"])]
        if pairs:
            log(f"note: no VNNI on this target, so {len(pairs)} int8 GEMM layers multiply in int16 pairs; --bits 7 "
                "(int8 on [-63, 63]) lets them use exact u8 x s8 byte pairs, which run faster (BENCHMARKS.md)")
    return meta

