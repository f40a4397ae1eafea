"""Benchmark lowbit's TVM-compiled MobileNetV2 against ONNX Runtime's best INT8 and FP32, in one process.

Contenders, all on the same pretrained MobileNetV2, batch 1, timed in interleaved
rounds (see bench_mobilenet_v2.measure_latency):
- FP32 in PyTorch and in ONNX Runtime;
- ORT quantize_static: QDQ, per-channel s8 weights, u8 activations (ORT's fast int8 path);
- lowbit INT8 compiled with TVM, untuned, and lowbit's QDQ model.onnx in ORT;
- lowbit with an INT4/INT8 plan (the largest layers at 4 bits until the weights are
  0.7x the INT8 size), compiled the same way.
The compiled models are also checked bit for bit against the reference executor on
the held-out set. Writes the "tvm" section of BENCHMARKS.md.

    python benchmarks/bench_tvm.py [--out BENCHMARKS.md] [--runs N] [--threads 2] [--baseline DIR]

`--baseline DIR` also times the models that another lowbit revision compiled
(DIR/int8 and DIR/mixed, each with its tvm/ folder and a `revision` file), in the
same interleaved rounds, and checks that their outputs equal this revision's bit for
bit: how a refactoring shows it changed neither results nor speed.
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
import tvm
from bench_mobilenet_v2 import (
    Contender,
    batched,
    export_fp32_onnx,
    fmt_agreement,
    load_data,
    log,
    measure_latency,
    ort_predict,
    ort_session,
    ort_static,
    preprocess_for_ort,
    torch_predict,
)
from onnxruntime.quantization import CalibrationMethod
from sections import cpu_info, lowbit_revision, write_section

import lowbit
from lowbit.codegen import export_qdq
from lowbit.codegen.tvm import compile_to
from lowbit.ir import QuantizedGraph
from lowbit.models import get_zoo_entry
from lowbit.models.loading import load_program
from lowbit.quantizer.capture import capture
from lowbit.quantizer.config import BitPlan
from lowbit.quantizer.graph import Graph
from lowbit.quantizer.quantize import quantize
from lowbit.quantizer.reference import run_reference
from lowbit.runtime import load

MODEL = "mobilenet_v2"
TARGET = "llvm -mcpu=native"
MIXED_SIZE = 0.7  # the INT4/INT8 plan's weight size, relative to uniform INT8


def largest_first_plan(graph: Graph, fraction: float) -> BitPlan:
    """INT8 everywhere, then the layers with the most weights to INT4 until the weights fit `fraction` of INT8."""
    sizes = {n.name: graph.weight(n.name).numel() for n in graph.layers}
    budget, total = fraction * sum(sizes.values()), float(sum(sizes.values()))
    bits = dict.fromkeys(sizes, 8)
    for name in sorted(sizes, key=sizes.get, reverse=True):
        if total <= budget:
            break
        bits[name] = 4
        total -= sizes[name] / 2
    return BitPlan(bits)


def compiled_contender(name: str, qgraph: QuantizedGraph, tmp: Path, heldout: np.ndarray,
                       tune_trials: int | None = None, cache: Path | None = None) -> tuple[Contender, dict]:
    """Compile `qgraph` (tuned with `tune_trials`), load it with the runtime, check it against the reference."""
    directory = tmp / "".join(ch if ch.isalnum() else "_" for ch in name)
    directory.mkdir()
    log(f"compiling {name}")
    start = time.perf_counter()
    meta = compile_to(qgraph, directory, TARGET, log, tune_trials, cache)
    compile_s = time.perf_counter() - start
    model = load(directory, verify=False)
    got = model.run(heldout)
    exact = bool(np.array_equal(got, run_reference(qgraph, heldout)[qgraph.outputs[0]]))
    log(f"{name}: compiled in {compile_s:.1f}s, bit-exact with the reference on {len(heldout)} inputs: {exact}")
    contender = Contender(name, model.run, build_s=compile_s)
    contender.heldout = got
    return contender, {"compile_s": compile_s, "bit_exact": exact, "target": meta["target_string"],
                       "kernels": meta["kernels"], "so_bytes": (directory / "tvm" / "model.so").stat().st_size,
                       "params_bytes": (directory / "tvm" / "params.npz").stat().st_size, "tuning": meta["tuning"]}


def baseline_contenders(directory: Path, current: dict[str, Contender], checks: dict,
                        heldout: np.ndarray) -> list[Contender]:
    """Another revision's compiled models, each checked to give exactly this revision's outputs."""
    found = []
    for key, now in current.items():
        revision = (directory / "revision").read_text().strip() if (directory / "revision").exists() else "?"
        model = load(directory / key, verify=False)
        contender = Contender(f"{now.name} (baseline {revision})", model.run)
        contender.heldout = model.run(heldout)
        identical = bool(np.array_equal(contender.heldout, now.heldout))
        log(f"{contender.name}: outputs identical to this revision's on {len(contender.heldout)} inputs: {identical}")
        checks[contender.name] = {**checks[now.name], "bit_exact": identical, "compile_s": float("nan"),
                                  "baseline": True}
        found.append(contender)
    return found


def _tuning_note(tuning: dict | None) -> str:
    if not tuning:
        return " (untuned)"
    return (f" (including {tuning['seconds']:.0f} s of MetaSchedule tuning, {tuning['trials']} trials requested; "
            f"{tuning['layers_using_tuned_kernels']} of {len(tuning['layers'])} layers run a tuned kernel, the rest "
            "kept the hand-written one as faster)")


def render(rows: list[Contender], fp32: Contender, ort_fp32: Contender, ort_int8: Contender, checks: dict,
           plans: dict, command: str, threads: int, runs: int, rounds: int, load_avg: tuple[float, float],
           photos: np.ndarray) -> str:
    """`photos`: each held-out crop's photo, which the agreement intervals resample."""
    ref = fp32.heldout.argmax(1)
    lines = [
        f"| Contender | Top-1 agreement with FP32 ({len(ref)} held-out crops of {len(np.unique(photos))} photos; "
        "bootstrap 95% interval over photos) | Latency, batch 1, median (ms) "
        f"| ÷ {ort_int8.name} | ÷ ORT FP32 | Build/compile (s) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for c in rows:
        build = "—" if c.build_s is None else f"{c.build_s:.1f}"
        lines.append(f"| {c.name} | {fmt_agreement(c.heldout, fp32.heldout, photos)} | {c.latency_ms:.2f} "
                     f"| {c.latency_ms / ort_int8.latency_ms:.2f} | {c.latency_ms / ort_fp32.latency_ms:.2f} "
                     f"| {build} |")
    cpu, flags = cpu_info()
    simd = ", ".join(f for f in ("avx2", "avx512f", "avx512_vnni", "avx_vnni") if f in flags) or "no AVX"
    check_lines = [f"  - {name}: {c['target']}, {c['kernels']} kernels, built in {c['compile_s']:.1f} s"
                   f"{_tuning_note(c['tuning'])}, library {c['so_bytes'] / 1e6:.1f} MB, constants "
                   f"{c['params_bytes'] / 1e6:.2f} MB, bit-exact with the reference executor on {len(ref)} held-out "
                   f"inputs: {'yes' if c['bit_exact'] else 'NO'}"
                   for name, c in checks.items() if not c.get("baseline")]
    check_lines += [f"  - {name}: compiled by that revision; outputs identical to this revision's on {len(ref)} "
                    f"held-out inputs: {'yes' if c['bit_exact'] else 'NO'}" for name, c in checks.items()
                    if c.get("baseline")]
    return "\n".join([
        "## TVM-compiled MobileNetV2 against ONNX Runtime",
        "",
        f"- Command: `{command}`",
        f"- Date: {datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}; lowbit {lowbit.__version__} "
        f"({lowbit_revision()}), apache-tvm {tvm.__version__}, onnxruntime {ort.__version__}, "
        f"torch {torch.__version__}",
        f"- Machine: {cpu} ({simd}), {os.cpu_count()} CPUs, {platform.system()} {platform.machine()}; "
        f"{threads} threads for ONNX Runtime, PyTorch and TVM; load average {load_avg[0]:.2f} at start, "
        f"{load_avg[1]:.2f} at end",
        f"- Latency: batch 1, each contender's median of {runs} calls, the minimum over {rounds} interleaved rounds "
        "(turns of 50 calls, each after a pause and 5 untimed calls; see bench_mobilenet_v2.measure_latency).",
        "",
        *lines,
        "",
        "- Compiled models (lowbit's own x86 kernels, VNNI or AVX2 by CPU; tuned ones also search with MetaSchedule):",
        *check_lines,
        f"- INT4/INT8 plan: {plans['mixed']}",
        "",
    ])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("BENCHMARKS.md"), help="report path (default BENCHMARKS.md)")
    parser.add_argument("--runs", type=int, default=200, help="timed batch-1 runs per contender per round")
    parser.add_argument("--threads", type=int, default=2, help="threads for ONNX Runtime, PyTorch and TVM")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved timing rounds (the minimum is reported)")
    parser.add_argument("--tune-trials", type=int, default=0,
                        help="also compile INT8 tuned with this many MetaSchedule trials (0: skip)")
    parser.add_argument("--tuning-cache", type=Path, help="tuning database directory (default: a fresh temp dir)")
    parser.add_argument("--baseline", type=Path,
                        help="compiled INT8 and INT4/INT8 models of another revision (DIR/int8, DIR/mixed) to time "
                             "side by side")
    args = parser.parse_args(argv)
    command = shlex.join(["python", *sys.argv] if argv is None else ["python", __file__, *argv])
    os.environ.setdefault("TVM_NUM_THREADS", str(args.threads))
    torch.set_num_threads(args.threads)
    load_start = os.getloadavg()[0]

    data = load_data()
    x1 = data.heldout[:1]
    model = get_zoo_entry(MODEL).build().eval()
    graph = capture(load_program(f"zoo:{MODEL}", None), MODEL)
    fp32 = Contender("FP32 PyTorch", torch_predict(model))
    with tempfile.TemporaryDirectory(prefix="lowbit-bench-tvm-") as tmp_name:
        tmp = Path(tmp_name)
        export_fp32_onnx(model, tmp / "fp32.onnx")
        ort_fp32 = Contender("ORT FP32", ort_predict(ort_session(tmp / "fp32.onnx", args.threads)))
        log("ORT quantize_static (QDQ, per-channel, u8 activations, percentile calibration)")
        source, _ = preprocess_for_ort(tmp / "fp32.onnx", tmp / "fp32.pre.onnx")
        ort_static(source, tmp / "ort_int8.onnx", data.calib, CalibrationMethod.Percentile)
        ort_int8 = Contender("ORT INT8 (quantize_static QDQ)", ort_predict(ort_session(tmp / "ort_int8.onnx",
                                                                                        args.threads)))

        log("lowbit quantize: INT8")
        int8 = quantize(graph, data.calib)
        weights = "saturation-safe" if export_qdq(int8, tmp / "lowbit.onnx") else "int8"
        lowbit_qdq = Contender(f"lowbit INT8 model.onnx in ORT ({weights} weights)",
                               ort_predict(ort_session(tmp / "lowbit.onnx", args.threads)))
        plan = largest_first_plan(graph, MIXED_SIZE)
        log(f"lowbit quantize: INT4/INT8 ({sum(b == 4 for b in plan.bits.values())} layers at 4 bits)")
        mixed = quantize(graph, data.calib, plan=plan)
        tvm_int8, check8 = compiled_contender("lowbit INT8, TVM", int8, tmp, data.heldout)
        tvm_mixed, check_mixed = compiled_contender("lowbit INT4/INT8, TVM", mixed, tmp, data.heldout)
        checks = {tvm_int8.name: check8, tvm_mixed.name: check_mixed}
        rows = [fp32, ort_fp32, ort_int8, lowbit_qdq, tvm_int8, tvm_mixed]
        if args.tune_trials:
            tuned, check_tuned = compiled_contender(f"lowbit INT8, TVM tuned ({args.tune_trials} trials)", int8, tmp,
                                                    data.heldout, args.tune_trials, args.tuning_cache or tmp / "cache")
            checks[tuned.name] = check_tuned
            rows.append(tuned)
        if args.baseline:
            rows += baseline_contenders(args.baseline, {"int8": tvm_int8, "mixed": tvm_mixed}, checks, data.heldout)
        for c in rows:
            if c.heldout is None:
                c.heldout = batched(c.predict, data.heldout)
        log("timing")
        measure_latency(rows, x1, args.runs, args.rounds)
    four = sum(b == 4 for b in plan.bits.values())
    plans = {"mixed": f"{four} of {len(plan.bits)} layers at INT4 (largest first), weights "
                      f"{mixed.weight_bytes() / int8.weight_bytes():.2f}× the INT8 size"}
    report = render(rows, fp32, ort_fp32, ort_int8, checks, plans,
                    command, args.threads, args.runs, args.rounds, (load_start, os.getloadavg()[0]),
                    data.heldout_photos)
    write_section(args.out, "tvm", report)
    print(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
