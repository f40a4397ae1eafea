"""Decode latency of one block linear per weight format: the M = 1 GEMV the TVM decoder runs for it, compiled
alone and timed on random operands of its layout, for a latency-budgeted bit-width search.

int2, int3 and int4 run on the same int4 kernel (`decoder_linears`: packed as nibbles), so they time the same
function and get the same latency; int8 runs on the int8 kernel. The plain (not accumulating, whole-buffer) GEMV
is timed: the decoder's o/down add into the residual and split members write column slices, which changes a
store per output vector, not the weight stream that dominates.

`python -m lowbit.codegen.tvm.linear_latency` prints SmolLM2-135M's table (its four linear shapes x int4, int8).
"""

from __future__ import annotations

import argparse
import statistics
from typing import Any

import numpy as np
import tvm

from ...errors import LowbitError
from ...ir.groupwise_weights import GroupWiseWeights, n_groups
from ...runtime.loader import use_threads
from .decoder_linears import KERNELS, LinearFunc, kernel_for_bits
from .remote import time_function
from .target import DEFAULT_TARGET, parse_target, target_string

SMOLLM2_SHAPES = ((576, 576), (576, 192), (576, 1536), (1536, 576))  # (K, N): q/o, k/v, gate/up, down
_COMPILED: dict[tuple[str, LinearFunc, int], tvm.runtime.Module] = {}  # (target, function, threads) -> library


def _compiled(target: dict[str, Any], f: LinearFunc, threads: int) -> tvm.runtime.Module:
    key = (target_string(target), f, threads)
    if key not in _COMPILED:
        mod = tvm.IRModule({"main": f.func(1, threads).with_attr("global_symbol", "main")})
        _COMPILED[key] = tvm.compile(mod, target=tvm.target.Target(target)).mod
    return _COMPILED[key]


def _operands(f: LinearFunc, bits: int, seed: int = 0) -> list[np.ndarray]:
    """x [1, K], the kernel's packed operands of random `bits`-bit weights [N, K], y [1, N]."""
    rng = np.random.default_rng(seed)
    groups = n_groups(f.K, f.group)
    w = GroupWiseWeights(rng.integers(0, 1 << bits, (f.N, f.K)).astype(np.uint8),
                         (rng.random((f.N, groups)) * 0.01 + 1e-3).astype(np.float32),
                         rng.integers(0, 1 << bits, (f.N, groups)).astype(np.uint8), bits, f.group)
    x = rng.standard_normal((1, f.K)).astype(np.float32)
    return [x, *KERNELS[f.kernel].pack([w]).values(), np.zeros((1, f.N), np.float32)]


def measure_linear_latency(shapes: list[tuple[int, int]], formats: list[tuple[int, int]],
                           target: str = DEFAULT_TARGET, threads: int | None = None, repeats: int = 20,
                           min_repeat_ms: float = 20.0) -> dict[tuple[int, int, int, int], float]:
    """Seconds per call of the decoder's M = 1 GEMV for each linear shape (K inputs, N outputs) and group-wise
    format (bits, group): {(K, N, bits, group): median over `repeats` timed runs}, on this machine with `threads`
    threads (the kernel's parallel tasks and TVM's pool; default: the target's -num-cores, else every available
    CPU, as the decoder library is compiled). Each distinct kernel is compiled once per process, so int2/int3/int4
    of one shape share one compile and one timing."""
    spec = parse_target(target, threads)
    threads = int(spec["num-cores"]) if threads is None else threads
    if threads < 1 or repeats < 1:
        raise LowbitError(f"measure_linear_latency: threads {threads} and repeats {repeats} must be positive")
    spec["num-cores"] = threads
    use_threads(threads)
    timed: dict[LinearFunc, float] = {}
    out = {}
    for k, n in shapes:
        for bits, group in formats:
            if n % 8 or k % 8 or group % 8 or group <= 0:
                raise LowbitError(f"measure_linear_latency: linear {k} -> {n} in groups of {group}: the kernels "
                                  "need K, N and the group in multiples of 8")
            f = LinearFunc(kernel_for_bits(bits), k, n, group, False, None)
            if f not in timed:
                library = _compiled(spec, f, threads)
                args = [tvm.runtime.tensor(a) for a in _operands(f, 4 if f.kernel == "int4" else 8)]
                ms = time_function(library, "main", tvm.cpu(), args, repeats, min_repeat_ms)
                timed[f] = statistics.median(ms) / 1e3
            out[(k, n, bits, group)] = timed[f]
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Per-linear decode latency of SmolLM2-135M's shapes (TVM GEMVs).")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--group", type=int, default=128)
    parser.add_argument("--target", default=DEFAULT_TARGET)
    args = parser.parse_args(argv)
    formats = [(4, args.group), (8, args.group)]
    table = measure_linear_latency(list(SMOLLM2_SHAPES), formats, args.target, args.threads, args.repeats)
    print(f"| K x N | int4 g{args.group} (us) | int8 g{args.group} (us) | int8 / int4 |")
    print("|---|---:|---:|---:|")
    for k, n in SMOLLM2_SHAPES:
        a, b = table[(k, n, 4, args.group)], table[(k, n, 8, args.group)]
        print(f"| {k} x {n} | {a * 1e6:.1f} | {b * 1e6:.1f} | {b / a:.2f} |")


if __name__ == "__main__":
    main()
