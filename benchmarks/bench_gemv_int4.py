"""Microbenchmark: lowbit's TVM INT4 group-wise GEMV/GEMM against ORT MatMulNBits, torch and numpy FP32.

For each SmolLM2-135M linear shape [in -> out] and group size, the same random q (uint8, 0..15), float32 scales
and uint8 zero points feed every INT4 contender, and their outputs are checked against a float64 evaluation of
the dequantized weight before timing. Contenders, timed in interleaved rounds from one Python loop each (so each
includes its call overhead), all on `--threads` threads:
- lowbit: `x86.gemv_int4` (TVM), float32 activations, weights unpacked in registers;
- ORT MatMulNBits (com.microsoft, bits 4, block_size = group, the same q/scale/zero), accuracy_level 0 (float32
  activations, as lowbit) and accuracy_level 4 (ORT quantizes activations to int8 per block: faster, less exact);
- torch.nn.functional.linear and numpy x @ W.T in float32 on the dequantized weight.
GB/s counts the bytes of weights each contender reads (INT4: nibbles, scales, zero points; FP32: 4 bytes per
weight). The memory-read bound is numpy summing an int64 view of a buffer larger than the L3 cache (one thread), and
`lowbit cold` is the TVM kernel cycling through enough copies of the weights to miss the cache, as decode does when
the whole model's weights stream through once per token.

    python benchmarks/bench_gemv_int4.py [--groups 32,64,128] [--rows 1] [--rounds 7] [--threads 2]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable

ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
ap.add_argument("--groups", default="32,64,128")
ap.add_argument("--rows", default="1", help="comma-separated M values (1 = decode)")
ap.add_argument("--rounds", type=int, default=5)
ap.add_argument("--min-ms", type=float, default=20.0, help="time per contender per round")
ap.add_argument("--threads", type=int, default=2)
args = ap.parse_args()
for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "TVM_NUM_THREADS"):
    os.environ[var] = str(args.threads)

import numpy as np  # noqa: E402
import onnx  # noqa: E402
import onnxruntime as ort  # noqa: E402
import torch  # noqa: E402
import tvm  # noqa: E402
from onnx import TensorProto, helper  # noqa: E402

from lowbit.codegen.tvm import parse_target  # noqa: E402
from lowbit.codegen.tvm.x86.gemv_int4 import Int4GemvPlan, gemv_int4_func  # noqa: E402
from lowbit.codegen.tvm.x86.int4_groups import Int4Packed, dequantize_int4, pack_int4_gemv  # noqa: E402

torch.set_num_threads(args.threads)
SHAPES = [(576, 576), (576, 192), (576, 1536), (1536, 576)]  # [in -> out]: q/o, k/v, gate/up, down
COLD_BYTES = 64 << 20  # past the 8 MB L3
# Each runtime's worker threads spin-wait after a call (OpenBLAS for up to ~0.1 s) and steal the 2 cores from the
# next contender: measured here, without this pause every contender ran 10-100x slower than alone.
IDLE_S = 0.3


def matmul_nbits_model(q: np.ndarray, scale: np.ndarray, zero: np.ndarray, group: int, rows: int,
                       accuracy_level: int) -> bytes:
    """A one-node ONNX model Y = A @ dequant(B)^T with com.microsoft MatMulNBits. Its layout: B uint8 [N, blocks,
    group / 2], two codes per byte along K, the lower K index in the low nibble (K padded with zeros to whole
    blocks); scales [N * blocks]; zero points uint8 [N * ceil(blocks / 2)], two blocks per byte, low nibble first."""
    n, k = q.shape
    blocks = scale.shape[1]
    qp = np.zeros((n, blocks * group), np.uint8)
    qp[:, :k] = q
    b = (qp[:, 0::2] | (qp[:, 1::2] << 4)).reshape(n, blocks, group // 2)
    zp = np.zeros((n, 2 * -(-blocks // 2)), np.uint8)
    zp[:, :blocks] = zero
    zpb = (zp[:, 0::2] | (zp[:, 1::2] << 4)).reshape(-1)
    inits = [helper.make_tensor("B", TensorProto.UINT8, b.shape, b.tobytes(), raw=True),
             helper.make_tensor("scales", TensorProto.FLOAT, [n * blocks], scale.astype(np.float32).tobytes(),
                                raw=True),
             helper.make_tensor("zp", TensorProto.UINT8, zpb.shape, zpb.tobytes(), raw=True)]
    node = helper.make_node("MatMulNBits", ["A", "B", "scales", "zp"], ["Y"], domain="com.microsoft", K=k, N=n,
                            bits=4, block_size=group, accuracy_level=accuracy_level)
    graph = helper.make_graph([node], "nbits", [helper.make_tensor_value_info("A", TensorProto.FLOAT, [rows, k])],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [rows, n])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft",
                                                                                                      1)])
    model.ir_version = 10
    onnx.checker.check_model(model)
    return model.SerializeToString()


def ort_call(model: bytes, x: np.ndarray, n: int) -> tuple[Callable[[], None], Callable[[], np.ndarray]]:
    """A timed call through I/O binding (no per-call allocation), and a getter of its output."""
    so = ort.SessionOptions()
    so.intra_op_num_threads = args.threads
    so.inter_op_num_threads = 1
    sess = ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])
    xv = ort.OrtValue.ortvalue_from_numpy(x)
    yv = ort.OrtValue.ortvalue_from_numpy(np.zeros((x.shape[0], n), np.float32))
    bind = sess.io_binding()
    bind.bind_ortvalue_input("A", xv)
    bind.bind_ortvalue_output("Y", yv)
    return (lambda: sess.run_with_iobinding(bind)), yv.numpy


def tvm_kernel(rows: int, k: int, n: int, group: int, target: tvm.target.Target) -> tvm.runtime.Module:
    plan = Int4GemvPlan.of(rows, k, n, group, args.threads)
    func = gemv_int4_func(plan).with_attr("global_symbol", "main")
    return tvm.compile(tvm.IRModule({"main": func}), target=target).mod


def per_call_us(fn: Callable[[], object], min_ms: float) -> float:
    """Microseconds per call over a loop of at least `min_ms`."""
    fn()
    n, t = 1, 0.0
    while True:
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        t = time.perf_counter() - t0
        if t * 1e3 >= min_ms:
            return t / n * 1e6
        n *= 2


def memory_bound_gbs() -> float:
    """GB/s of numpy summing an int64 view of a buffer past the L3 (one thread; the read bound of a stream)."""
    buf = np.ones(COLD_BYTES // 8, np.int64)
    us = min(per_call_us(buf.sum, 200) for _ in range(3))
    return COLD_BYTES / us / 1e3


def main() -> None:
    target = tvm.target.Target(parse_target("llvm -mcpu=native", threads=args.threads))
    rng = np.random.default_rng(0)
    groups = [int(g) for g in args.groups.split(",")]
    rows_list = [int(m) for m in args.rows.split(",")]
    print(f"# {target}  threads {args.threads}  ort {ort.__version__}  torch {torch.__version__}  "
          f"tvm {tvm.__version__}", flush=True)
    print(f"memory-read bound (numpy sum over {COLD_BYTES >> 20} MB, 1 thread): {memory_bound_gbs():.1f} GB/s",
          flush=True)
    header = "| M | in -> out | group | contender | us/call (median) | fastest | GB/s (median) | max err |"
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    for rows in rows_list:
        for k, n in SHAPES:
            for group in groups:
                blocks = -(-k // group)
                q = rng.integers(0, 16, (n, k)).astype(np.uint8)
                zero = rng.integers(0, 16, (n, blocks)).astype(np.uint8)
                scale = (rng.random((n, blocks)) * 0.02 + 0.002).astype(np.float32)
                x = rng.standard_normal((rows, k)).astype(np.float32)
                w64 = dequantize_int4(q, scale, zero, group)
                ref = x.astype(np.float64) @ w64.T
                mag = np.abs(x.astype(np.float64)) @ np.abs(w64).T  # error is relative to sum |x * w|
                w32 = w64.astype(np.float32)
                packed = pack_int4_gemv(q, scale, zero, group)
                int4_bytes = n * k // 2 + n * blocks * 5  # nibbles, float32 scale, one byte of zero point
                contenders: dict[str, tuple[Callable[[], object], Callable[[], np.ndarray], int]] = {}
                lib = tvm_kernel(rows, k, n, group, target)
                targs = [tvm.runtime.tensor(a) for a in (x, *packed.arrays(), np.zeros((rows, n), np.float32))]
                main = lib["main"]  # looked up once: the lookup costs as much as a small call
                contenders["lowbit tvm int4"] = (lambda f=main, a=targs: f(*a),
                                                 lambda a=targs: a[-1].numpy(), int4_bytes)
                copies = max(1, COLD_BYTES // packed.nbytes)
                cold = [[tvm.runtime.tensor(a) for a in Int4Packed.arrays(packed)] for _ in range(copies)]
                it = iter(range(1 << 62))
                contenders["lowbit tvm int4, cold"] = (
                    lambda f=main, a=targs, c=cold, it=it: f(a[0], *c[next(it) % len(c)], a[-1]),
                    lambda a=targs: a[-1].numpy(), int4_bytes)
                for level in (0, 4):
                    call, out = ort_call(matmul_nbits_model(q, scale, zero, group, rows, level), x, n)
                    contenders[f"ORT MatMulNBits acc{level}"] = (call, out, int4_bytes)
                xt, wt = torch.from_numpy(x), torch.from_numpy(w32)
                box: dict[str, object] = {}
                contenders["torch fp32 linear"] = (
                    lambda xt=xt, wt=wt, b=box: b.__setitem__("y", torch.nn.functional.linear(xt, wt)),
                    lambda b=box: b["y"].numpy(), 4 * n * k)
                contenders["numpy fp32"] = (lambda x=x, wt=w32.T, b=box: b.__setitem__("z", x @ wt),
                                            lambda b=box: b["z"], 4 * n * k)
                errs = {}
                for name, (call, out, _) in contenders.items():
                    call()
                    errs[name] = float(np.max(np.abs(out() - ref) / mag))
                times: dict[str, list[float]] = {name: [] for name in contenders}
                for _ in range(args.rounds):
                    for name, (call, _, _) in contenders.items():
                        time.sleep(IDLE_S)
                        times[name].append(per_call_us(call, args.min_ms))
                for name, (_, _, nbytes) in contenders.items():
                    med = float(np.median(times[name]))
                    print(f"| {rows} | {k} -> {n} | {group} | {name} | {med:.1f} | {min(times[name]):.1f} | "
                          f"{nbytes / med / 1e3:.1f} | {errs[name]:.1e} |", flush=True)
    print(f"# {' '.join(sys.argv)}", flush=True)


if __name__ == "__main__":
    main()
