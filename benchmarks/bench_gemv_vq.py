"""Microbenchmark: lowbit's TVM VQ GEMV (`x86.gemv_vq`, vq2 and vq3, each tiling) beside its INT4 g128 GEMV.

For each SmolLM2-135M linear shape [in -> out], random VQ weights (int8 codebooks of 256 entries of 4 columns, and
for vq3 a residual codebook of 16; random indices and row scales) and random INT4 weights (group 128) feed the
kernels; each output is checked against a float64 evaluation of the dequantized weight before timing. The
contenders are timed in interleaved rounds from one Python loop each (so each includes its call overhead), on
`--threads` threads (TVM's pool and the plans), by the process's CPU time: the machine is shared, and wall time
then counts the time slices other jobs take (the cache they evict still counts). `cold` cycles through enough
copies of the weights to miss the cache (64 MB, past the 8 MB L3), as decode does when the whole model's weights
stream through once per token. GB/s counts the bytes of weights a call reads (`VQPacked.nbytes`, `Int4Packed.nbytes`).

    python benchmarks/bench_gemv_vq.py [--rows 1] [--rounds 5] [--threads 1] [--tiles default,nr=8:ks=1] [--cold]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable

ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
ap.add_argument("--rows", default="1", help="comma-separated M values (1 = decode)")
ap.add_argument("--rounds", type=int, default=5)
ap.add_argument("--min-ms", type=float, default=20.0, help="time per contender per round")
ap.add_argument("--threads", type=int, default=1)
ap.add_argument("--tiles", default="default",
                help="comma-separated tilings: 'default' (the plan's) or VQGemvPlan.of arguments, e.g. nr=4:ks=2:mr=1")
ap.add_argument("--shapes", default="576x576,576x192,576x1536,1536x576", help="in x out, comma-separated")
ap.add_argument("--clock", choices=("cpu", "wall"), default="cpu",
                help="cpu: the process's CPU time (robust to other jobs taking the cores; the default), wall: elapsed")
ap.add_argument("--cold", action="store_true", help="also time each kernel on cache-cold weights")
args = ap.parse_args()
for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "TVM_NUM_THREADS"):
    os.environ[var] = str(args.threads)

import numpy as np  # noqa: E402
import tvm  # noqa: E402

from lowbit.codegen.tvm import parse_target  # noqa: E402
from lowbit.codegen.tvm.x86.gemv_int4 import Int4GemvPlan, gemv_int4_func  # noqa: E402
from lowbit.codegen.tvm.x86.gemv_vq import VQGemvPlan, gemv_vq_func  # noqa: E402
from lowbit.codegen.tvm.x86.int4_groups import dequantize_int4, pack_int4_gemv  # noqa: E402
from lowbit.codegen.tvm.x86.vq_layout import pack_vq_gemv  # noqa: E402
from lowbit.ir.vq_weights import VQStage, VQWeights  # noqa: E402

COLD_BYTES = 64 << 20
IDLE_S = 0.1  # let the previous contender's worker threads stop spinning
PRESETS = {"vq2": (8,), "vq3": (8, 4)}


def random_vq(n: int, k: int, bits: tuple[int, ...], rng: np.random.Generator) -> VQWeights:
    stages = tuple(VQStage(rng.integers(-127, 128, (1 << b, 4)).astype(np.int8), np.float32(0.01 / (1 + 4 * s)),
                           rng.integers(0, 1 << b, (n, k // 4)).astype(np.uint16)) for s, b in enumerate(bits))
    return VQWeights((rng.random(n) + 0.5).astype(np.float32), stages, k)


def per_call_us(fn: Callable[[], object], min_ms: float) -> float:
    """CPU microseconds per call over a loop of at least `min_ms` (`--clock`)."""
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    fn()
    n = 1
    while True:
        t0 = clock()
        for _ in range(n):
            fn()
        t = clock() - t0
        if t * 1e3 >= min_ms:
            return t / n * 1e6
        n *= 2


def compile_main(func: tvm.tirx.PrimFunc, target: tvm.target.Target) -> tvm.runtime.Module:
    return tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), target=target)


Contender = tuple[Callable[[], object], Callable[[], np.ndarray], np.ndarray, int]


def contenders_of(name: str, lib: tvm.runtime.Module, x: np.ndarray, weights: list[np.ndarray], n: int,
                  w64: np.ndarray) -> dict[str, Contender]:
    """The hot call (and with --cold the cold one) of a compiled kernel; its reference output is x @ w64^T."""
    main = lib["main"]  # looked up once: the lookup costs as much as a small call
    a = [tvm.runtime.tensor(t) for t in (x, *weights, np.zeros((x.shape[0], n), np.float32))]
    ref = x.astype(np.float64) @ w64.T
    nbytes = sum(w.nbytes for w in weights)
    out = {name: ((lambda: main(*a)), a[-1].numpy, ref, nbytes)}
    if args.cold:
        cold = [[tvm.runtime.tensor(t) for t in weights] for _ in range(max(1, COLD_BYTES // nbytes))]
        it = iter(range(1 << 62))
        out[f"{name}, cold"] = ((lambda: main(a[0], *cold[next(it) % len(cold)], a[-1])), a[-1].numpy, ref, nbytes)
    return out


def main() -> None:
    target = tvm.target.Target(parse_target("llvm -mcpu=native", threads=args.threads))
    rng = np.random.default_rng(0)
    print(f"# {target}  threads {args.threads}  clock {args.clock}  tvm {tvm.__version__}  "
          f"load average {os.getloadavg()}", flush=True)
    header = "| M | in -> out | contender | us/call (median) | fastest | GB/s (median) | max err / max abs y |"
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    for rows in (int(m) for m in args.rows.split(",")):
        for shape in args.shapes.split(","):
            k, n = (int(d) for d in shape.split("x"))
            x = rng.standard_normal((rows, k)).astype(np.float32)
            contenders: dict[str, Contender] = {}
            for preset, bits in PRESETS.items():
                w = random_vq(n, k, bits, rng)
                packed = pack_vq_gemv(w)
                for spec in args.tiles.split(","):
                    kw = {} if spec == "default" else {key: int(val) for key, val in
                                                       (o.split("=") for o in spec.split(":"))}
                    plan = VQGemvPlan.of(rows, k, n, len(bits), 4, bits, args.threads, **kw)
                    contenders.update(contenders_of(f"{preset} {spec}", compile_main(gemv_vq_func(plan), target),
                                                    x, packed.arrays(), n, w.dequantize().astype(np.float64)))
            group = 128
            q = rng.integers(0, 16, (n, k)).astype(np.uint8)
            zero = rng.integers(0, 16, (n, -(-k // group))).astype(np.uint8)
            scale = (rng.random(zero.shape) * 0.02 + 0.002).astype(np.float32)
            lib = compile_main(gemv_int4_func(Int4GemvPlan.of(rows, k, n, group, args.threads)), target)
            contenders.update(contenders_of("int4 g128", lib, x, pack_int4_gemv(q, scale, zero, group).arrays(), n,
                                            dequantize_int4(q, scale, zero, group)))
            errs = {}
            for name, (call, out, ref, _) in contenders.items():
                call()
                errs[name] = float(np.max(np.abs(out() - ref)) / np.max(np.abs(ref)))  # relative to the largest
            times: dict[str, list[float]] = {name: [] for name in contenders}
            for _ in range(args.rounds):
                for name, (call, *_rest) in contenders.items():
                    time.sleep(IDLE_S)
                    times[name].append(per_call_us(call, args.min_ms))
            for name, (_, _, _, nbytes) in contenders.items():
                med = float(np.median(times[name]))
                print(f"| {rows} | {k} -> {n} | {name} | {med:.1f} | {min(times[name]):.1f} | "
                      f"{nbytes / med / 1e3:.2f} | {errs[name]:.1e} |", flush=True)
    print(f"# load average after: {os.getloadavg()}  {' '.join(sys.argv)}", flush=True)


if __name__ == "__main__":
    main()
