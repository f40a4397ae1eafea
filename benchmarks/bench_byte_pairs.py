"""One int8 GEMM alone, MiniLM-L6's FFN shapes: lowbit's AVX2 kernel on full int8 weights (int16 pairs, vpmaddwd)
against 7-bit weights (u8 x s8 byte pairs, vpmaddubsw; `--bits 7`), and ONNX Runtime's MatMulInteger U8S8, whose
byte pairs are not exact on CPUs without VNNI (the exactness line). One thread, interleaved rounds.

    python benchmarks/bench_byte_pairs.py [--out BENCHMARKS.md]

Writes section `byte_pairs`. Each lowbit build is checked bit for bit against the reference executor first.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import tvm
from sections import cpu_info, lowbit_revision, write_section

from lowbit.codegen.tvm.compile import build
from lowbit.codegen.tvm.target import parse_target
from lowbit.ir import Op, QuantizedGraph, Value
from lowbit.ir.dyadic import dyadic
from lowbit.ir.weights import weight_range
from lowbit.quantizer.reference import run_reference

SHAPES = ((128, 384, 1536), (128, 1536, 384))  # (M, K, N): MiniLM's FFN up and down at batch 1, seq 128
TARGET = "llvm -mcpu=native -num-cores=1"
STEP = 1 / 16  # inputs are integers times this, so the input quantize recovers them exactly


def one_linear(m: int, k: int, n: int, bits: int, rng: np.random.Generator) -> QuantizedGraph:
    """quantize -> an int8-input linear with random `bits`-bit weights, requantized to int8 -> dequantize."""
    lo, hi = weight_range(bits)
    multiplier, shift = dyadic(rng.uniform(2e-5, 1e-4, n))
    arrays = {"weight": rng.integers(lo, hi + 1, (n, k)).astype(np.int8),
              "bias": rng.integers(-3000, 3000, n).astype(np.int32), "multiplier": multiplier, "shift": shift}
    values = {"x": Value("x", "float32", (m, k)), "x_q": Value("x_q", "int8", (m, k), STEP),
              "y_q": Value("y_q", "int8", (m, n), 0.05), "y": Value("y", "float32", (m, n))}
    ops = [Op("x_quantize", "quantize", ["x"], "x_q"),
           Op("layer", "linear", ["x_q"], "y_q", {"weight_bits": bits, "qmin": -128, "qmax": 127}, arrays),
           Op("y_dequantize", "dequantize", ["y_q"], "y")]
    return QuantizedGraph(values, ops, ["x"], ["y"], f"linear{bits}")


def lowbit_call(qgraph: QuantizedGraph, x: np.ndarray):
    executable, lowered, kernels = build(qgraph, parse_target(TARGET))
    vm = tvm.relax.VirtualMachine(executable, tvm.cpu())
    args = [tvm.runtime.tensor(x), *(tvm.runtime.tensor(a) for a in lowered.params.values())]
    if not np.array_equal(vm["main"](*args).numpy(), run_reference(qgraph, x)["y"]):
        raise SystemExit(f"{qgraph.name}: the TVM build differs from the reference executor")
    return lambda: vm["main"](*args)


def ort_matmul_integer(a: np.ndarray, b: np.ndarray) -> ort.InferenceSession:
    h = onnx.helper
    graph = h.make_graph([h.make_node("MatMulInteger", ["a", "b"], ["y"])], "u8s8",
                         [h.make_tensor_value_info("a", onnx.TensorProto.UINT8, list(a.shape))],
                         [h.make_tensor_value_info("y", onnx.TensorProto.INT32, [a.shape[0], b.shape[1]])],
                         [onnx.numpy_helper.from_array(b, "b")])
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    return ort.InferenceSession(h.make_model(graph, opset_imports=[h.make_opsetid("", 13)]).SerializeToString(),
                                options, providers=["CPUExecutionProvider"])


def best_ms(calls: dict[str, object], runs: int, rounds: int) -> dict[str, float]:
    """Min over interleaved rounds of the mean of `runs` calls."""
    best = {name: float("inf") for name in calls}
    for _ in range(rounds):
        for name, call in calls.items():
            call()
            start = time.perf_counter()
            for _ in range(runs):
                call()
            best[name] = min(best[name], (time.perf_counter() - start) / runs * 1e3)
    return best


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent.parent / "BENCHMARKS.md")
    parser.add_argument("--runs", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=6)
    args = parser.parse_args(argv)
    rng = np.random.default_rng(0)
    lines = ["## One int8 GEMM: int16 pairs, byte pairs (`--bits 7`) and ORT's MatMulInteger (issue #13)", "",
             f"- Command: `{f'python benchmarks/{Path(__file__).name} {shlex.join(argv)}'.rstrip()}`",
             f"- Date: {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC; machine: {cpu_info()[0]}; lowbit "
             f"{lowbit_revision()}; 1 thread; target `{TARGET}`; min over {args.rounds} interleaved rounds of the "
             f"mean of {args.runs} calls",
             "- lowbit: quantize, the linear with its requantize epilogue, dequantize (built whole; checked bit for "
             "bit against the reference first). ORT: MatMulInteger u8 x s8 alone, int32 out.", "",
             "| M, K, N | lowbit int8 weights ms | GMAC/s | lowbit 7-bit weights ms | GMAC/s | ORT MatMulInteger ms "
             "| GMAC/s | ORT outputs exact |", "|---|---:|---:|---:|---:|---:|---:|---|"]
    for m, k, n in SHAPES:
        x = (rng.integers(-128, 128, (m, k)) * STEP).astype(np.float32)
        a = rng.integers(0, 256, (m, k)).astype(np.uint8)
        b = rng.integers(-128, 128, (k, n)).astype(np.int8)
        session = ort_matmul_integer(a, b)
        exact = np.array_equal(session.run(None, {"a": a})[0], a.astype(np.int64) @ b.astype(np.int64))
        calls = {bits: lowbit_call(one_linear(m, k, n, bits, rng), x) for bits in (8, 7)}
        ms = best_ms({**calls, "ort": lambda s=session, a=a: s.run(None, {"a": a})}, args.runs, args.rounds)
        gmacs = {name: m * k * n / t * 1e-6 for name, t in ms.items()}
        lines.append(f"| {m}, {k}, {n} | " + " | ".join(f"{ms[c]:.3f} | {gmacs[c]:.1f}" for c in (8, 7, "ort"))
                     + f" | {'yes' if exact else 'no (saturated pair sums)'} |")
    write_section(args.out, "byte_pairs", "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main(sys.argv[1:])
