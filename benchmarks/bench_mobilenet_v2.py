"""Benchmark lowbit INT8 against ONNX Runtime's own static quantization on pretrained MobileNetV2.

Every contender sees the same 64 calibration crops and is scored on the same 192
held-out crops (from disjoint source photos) and the 20 labelled foolbox ImageNet
images. Accuracy is measured against FP32 PyTorch; latency is batch 1, all
contenders timed in this one process in interleaved rounds so that background
load shifts them alike. The result is a Markdown report (BENCHMARKS.md).

    python benchmarks/bench_mobilenet_v2.py [--out BENCHMARKS.md] [--runs N] [--threads 2]
"""

from __future__ import annotations

import argparse
import copy
import os
import shlex
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnxruntime.quantization import (
    CalibrationDataReader,
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quantize_static,
)
from onnxruntime.quantization.shape_inference import quant_pre_process
from sections import cpu_info, lowbit_revision, write_section

import lowbit
from lowbit.codegen import export_integer, export_qdq
from lowbit.ir import QuantizedGraph
from lowbit.metrics import CONFIDENT_GAP, agreement, bootstrap_interval, confident_mask, logit_gap, paired_difference
from lowbit.models import calibration_and_heldout, foolbox_imagenet_crops, get_zoo_entry
from lowbit.models.loading import load_program
from lowbit.quantizer.capture import capture
from lowbit.quantizer.graph import Graph, run_graph
from lowbit.quantizer.quantize import quantize
from lowbit.quantizer.reference import run_reference
from lowbit.quantizer.simulate import dequantized_params, fake_quantizers

MODEL = "mobilenet_v2"
SEED = 0
OPSET = 17
EVAL_BATCH = 32
ROUNDS = 3
WARMUP_RUNS = 10
LATENCY_BLOCK = 50  # timed calls per turn when contenders take turns
TURN_WARMUP = 5  # untimed calls that start each turn
TURN_PAUSE_S = 0.1  # idle time between turns, so the previous runtime's spinning threads go to sleep
PERCENTILE = 99.999
CROPS_PER_LABELLED_PHOTO = 10  # in-domain agreement set: random crops of the 20 labelled ImageNet photos
INPUT_NAME = "input"
OUTPUT_NAME = "logits"

Predict = Callable[[np.ndarray], np.ndarray]

_START = time.perf_counter()


def log(message: str) -> None:
    print(f"[{time.perf_counter() - _START:6.1f}s] {message}", file=sys.stderr, flush=True)


# -- contenders --------------------------------------------------------------------------------------------------------

@dataclass
class Contender:
    name: str
    predict: Predict  # float32 batch -> logits
    timed: bool = True
    build_s: float | None = None  # time to produce the model (quantization, export)
    heldout: np.ndarray | None = None  # logits on the held-out set
    labelled: np.ndarray | None = None  # logits on the labelled set
    indomain: np.ndarray | None = None  # logits on crops of the labelled photos
    latency_ms: float | None = None  # min over rounds of the median call
    fastest_ms: float | None = None  # fastest single call


def ort_session(path: Path, threads: int, fuse: bool = True) -> ort.InferenceSession:
    """A CPU session; `fuse=False` disables graph optimizations, so QDQ models run as float ops on dequantized
    values instead of ORT's fused int8 kernels."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    if not fuse:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 3  # unused-initializer warnings etc. are noise here
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def ort_predict(session: ort.InferenceSession) -> Predict:
    input_name = session.get_inputs()[0].name
    output_name = session.get_outputs()[0].name  # lowbit's integer model lists its float output first

    def predict(x: np.ndarray) -> np.ndarray:
        return session.run([output_name], {input_name: x})[0]

    return predict


def torch_predict(model: torch.nn.Module) -> Predict:
    def predict(x: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return model(torch.from_numpy(x)).numpy()

    return predict


class ArrayReader(CalibrationDataReader):
    """Feeds the calibration array to ORT one sample at a time (batching would not change min/max or histograms)."""

    def __init__(self, x: np.ndarray, input_name: str):
        self.x = x
        self.input_name = input_name
        self.i = 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self.i >= len(self.x):
            return None
        self.i += 1
        return {self.input_name: self.x[self.i - 1:self.i]}

    def rewind(self) -> None:
        self.i = 0


def export_fp32_onnx(model: torch.nn.Module, path: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
        torch.onnx.export(
            model, (torch.zeros(1, 3, 224, 224),), str(path), dynamo=False, opset_version=OPSET,
            input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
            dynamic_axes={INPUT_NAME: {0: "N"}, OUTPUT_NAME: {0: "N"}},
        )


def preprocess_for_ort(fp32: Path, out: Path) -> tuple[Path, str]:
    """ORT's recommended pre-quantization pass (shape inference + graph optimization), or the raw model if it fails."""
    try:
        quant_pre_process(str(fp32), str(out))
        return out, "applied"
    except Exception as e:  # any failure just means quantizing the raw export
        log(f"quant_pre_process failed ({type(e).__name__}: {e}); quantizing the raw export")
        return fp32, f"failed ({type(e).__name__}), raw export used"


def ort_static(source: Path, out: Path, calib: np.ndarray, method: CalibrationMethod) -> None:
    extra = {"CalibPercentile": PERCENTILE} if method == CalibrationMethod.Percentile else {}
    quantize_static(
        str(source), str(out), ArrayReader(calib, INPUT_NAME),
        quant_format=QuantFormat.QDQ, per_channel=True,
        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
        calibrate_method=method, extra_options=extra,
    )


def weight_storage(path: Path) -> tuple[int, int]:
    """(uint8, int8) counts of weight tensors (rank >= 2 initializers read by DequantizeLinear)."""
    model = onnx.load(str(path))
    inits = {t.name: t for t in model.graph.initializer}
    counts = {onnx.TensorProto.UINT8: 0, onnx.TensorProto.INT8: 0}
    for node in model.graph.node:
        t = inits.get(node.input[0]) if node.op_type == "DequantizeLinear" else None
        if t is not None and len(t.dims) >= 2 and t.data_type in counts:
            counts[t.data_type] += 1
    return counts[onnx.TensorProto.UINT8], counts[onnx.TensorProto.INT8]


# -- measuring ---------------------------------------------------------------------------------------------------------

def batched(predict: Predict, x: np.ndarray) -> np.ndarray:
    return np.concatenate([predict(np.ascontiguousarray(x[i:i + EVAL_BATCH])) for i in range(0, len(x), EVAL_BATCH)])


def log_softmax(z: np.ndarray) -> np.ndarray:
    z = z.astype(np.float64)
    z = z - z.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def mean_kl(p_logits: np.ndarray, q_logits: np.ndarray) -> float:
    """Mean KL(softmax p || softmax q) over the batch."""
    lp, lq = log_softmax(p_logits), log_softmax(q_logits)
    return float(np.mean(np.sum(np.exp(lp) * (lp - lq), axis=1)))


def measure_latency(contenders: Sequence[Contender], x: np.ndarray, runs: int, rounds: int) -> None:
    """Batch-1 latency: the minimum over `rounds` rounds of each contender's median of `runs` calls.

    Within a round the contenders take turns in blocks of LATENCY_BLOCK calls, so every contender's calls are
    spread over the whole round and background load falls on all of them alike. Each turn starts after a
    pause (ONNX Runtime's and TVM's pool threads spin-wait after a call and would steal the cores from the
    next contender) and with TURN_WARMUP untimed calls that wake the runtime's threads and bring its weights
    back into cache. Rounds alternate the order of turns.
    """
    timed = [c for c in contenders if c.timed]
    for c in timed:
        for _ in range(WARMUP_RUNS):
            c.predict(x)
    medians: dict[str, list[float]] = {c.name: [] for c in timed}
    fastest: dict[str, float] = dict.fromkeys(medians, float("inf"))
    for r in range(rounds):
        log(f"latency round {r + 1}/{rounds} ({runs} runs per contender)")
        times: dict[str, list[float]] = {c.name: [] for c in timed}
        order = timed if r % 2 == 0 else timed[::-1]
        for done in range(0, runs, LATENCY_BLOCK):
            for c in order:
                time.sleep(TURN_PAUSE_S)
                for _ in range(TURN_WARMUP):
                    c.predict(x)
                for _ in range(min(LATENCY_BLOCK, runs - done)):
                    start = time.perf_counter()
                    c.predict(x)
                    times[c.name].append(time.perf_counter() - start)
        for c in timed:
            medians[c.name].append(statistics.median(times[c.name]))
            fastest[c.name] = min(fastest[c.name], *times[c.name])
    for c in timed:
        c.latency_ms = 1000 * min(medians[c.name])
        c.fastest_ms = 1000 * fastest[c.name]


# -- the report --------------------------------------------------------------------------------------------------------

def fmt_kl(kl: float) -> str:
    if kl == 0:
        return "0"
    return f"{kl:.4f}" if kl >= 1e-3 else f"{kl:.1e}"


def fmt_ratio(value: float | None, base: float | None) -> str:
    return "—" if value is None or not base else f"{value / base:.2f}"


def fmt_agreement(logits: np.ndarray, reference: np.ndarray, photos: np.ndarray, confident: bool = False) -> str:
    """'84.9% [79.2, 90.1] (163/192)': top-1 agreement with its bootstrap 95% interval over photos, on all
    samples or on the confident ones (FP32 gap above CONFIDENT_GAP)."""
    a = agreement(reference, logits, photos, confident_mask(reference) if confident else None)
    return f"{a.short()} ({a.agree}/{a.samples})"


def fmt_correct(logits: np.ndarray, labels: np.ndarray) -> str:
    """'17/20 [70, 95]': correct labels, with a bootstrap 95% interval in percent (one image per photo)."""
    correct = logits.argmax(1) == labels
    low, high, _ = bootstrap_interval(correct)
    return f"{int(correct.sum())}/{len(labels)} [{100 * low:.0f}, {100 * high:.0f}]"


def describe_set(reference: np.ndarray, photos: np.ndarray, what: str, confident: bool = False) -> str:
    """'192 held-out crops of 13 photos', or the confident ones among them."""
    mask = confident_mask(reference) if confident else np.ones(len(reference), bool)
    gap = f"confident (gap > {CONFIDENT_GAP}): " if confident else ""
    return f"{gap}{int(mask.sum())} {what} crops of {len(np.unique(photos[mask]))} photos"


def fmt_difference(a: np.ndarray, b: np.ndarray, reference: np.ndarray, photos: np.ndarray) -> str:
    """Agreement of `a` minus that of `b`, in points, with a paired bootstrap 95% interval over photos."""
    top1 = reference.argmax(1)
    diff, interval = paired_difference(a.argmax(1) == top1, b.argmax(1) == top1, photos)
    return f"{100 * diff:+.1f} points [{100 * interval.low:+.1f}, {100 * interval.high:+.1f}]"


def sqnr_db(logits: np.ndarray, reference: np.ndarray) -> float:
    return float(10 * np.log10(np.sum(reference.astype(np.float64) ** 2) / np.sum((logits - reference) ** 2)))


def agreement_columns(data: Data, fp32: Contender) -> tuple[str, str]:
    """The header cells and the alignment row of the four agreement columns: held-out and in-domain crops, all
    of them and the confident ones."""
    sets = [(fp32.heldout, data.heldout_photos, "held-out"), (fp32.indomain, data.indomain_photos, "ImageNet")]
    heads = [describe_set(ref, photos, what, confident) for ref, photos, what in sets for confident in (False, True)]
    return " | ".join(f"Agreement, {h}" for h in heads), "---:|---:|---:|---:"


def agreement_cells(c: Contender, fp32: Contender, data: Data) -> str:
    return " | ".join(fmt_agreement(logits, ref, photos, confident)
                      for logits, ref, photos in ((c.heldout, fp32.heldout, data.heldout_photos),
                                                  (c.indomain, fp32.indomain, data.indomain_photos))
                      for confident in (False, True))


def render_table(contenders: Sequence[Contender], fp32: Contender, ort_fp32: Contender, best_static: Contender,
                 data: Data) -> str:
    y_lab = data.y_lab
    heads, align = agreement_columns(data, fp32)
    lines = [
        f"| Contender | {heads} "
        f"| Labelled top-1 ({len(y_lab)}) | Mean KL(FP32 ‖ model) | Latency, batch 1, median (ms) "
        f"| Fastest call (ms) | ÷ ORT FP32 | ÷ {best_static.name} | Build time (s) |",
        f"|---|{align}|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for c in contenders:
        latency = "—" if c.latency_ms is None else f"{c.latency_ms:.2f}"
        fastest = "—" if c.fastest_ms is None else f"{c.fastest_ms:.2f}"
        build = "—" if c.build_s is None else f"{c.build_s:.1f}"
        lines.append(
            f"| {c.name} | {agreement_cells(c, fp32, data)} | {fmt_correct(c.labelled, y_lab)} "
            f"| {fmt_kl(mean_kl(fp32.heldout, c.heldout))} | {latency} | {fastest} "
            f"| {fmt_ratio(c.latency_ms, ort_fp32.latency_ms)} | {fmt_ratio(c.latency_ms, best_static.latency_ms)} "
            f"| {build} |"
        )
    return "\n".join(lines)


@dataclass
class Data:
    calib: np.ndarray
    heldout: np.ndarray
    x_lab: np.ndarray
    y_lab: np.ndarray
    x_indomain: np.ndarray  # crops of the labelled photos
    calib_sources: list[str]
    heldout_sources: list[str]
    heldout_photos: np.ndarray  # each held-out crop's photo: agreement intervals resample photos
    indomain_photos: np.ndarray


def load_data() -> Data:
    entry = get_zoo_entry(MODEL)
    calib, heldout = entry.calibration(SEED), entry.heldout(SEED)
    x_lab, y_lab = entry.labelled()
    split = calibration_and_heldout(len(calib), len(heldout), SEED)  # for the source names
    if not (np.array_equal(split.calib, calib) and np.array_equal(split.heldout, heldout)):
        raise SystemExit("the zoo's data split differs from calibration_and_heldout(); the report would be wrong")
    x_indomain, indomain_photos = foolbox_imagenet_crops(CROPS_PER_LABELLED_PHOTO, SEED)
    return Data(calib, heldout, x_lab, y_lab, x_indomain, split.calib_sources, split.heldout_sources,
                split.heldout_photos, indomain_photos)


@dataclass
class Results:
    contenders: list[Contender]
    fp32: Contender  # FP32 PyTorch: the accuracy baseline
    ort_fp32: Contender
    statics: dict[CalibrationMethod, Contender]  # ORT quantize_static per calibration method
    unfused: dict[CalibrationMethod, tuple[np.ndarray, np.ndarray]]  # their logits with QDQ fusion off
    lowbit_int: Contender
    reference: Contender
    floor: list[Contender]  # perturbed FP32 models: how well this data lets a low-precision model agree
    pre_status: str  # outcome of quant_pre_process
    uint8_weights: int  # weight tensors lowbit's model.onnx stores as uint8
    int8_weights: int


def run_benchmark(data: Data, tmp: Path, threads: int, runs: int) -> Results:
    """Build every contender, score it on the held-out and labelled sets, then time them all."""
    model = get_zoo_entry(MODEL).build().eval()
    fp32 = Contender("FP32 PyTorch", torch_predict(model))

    log("exporting FP32 ONNX")
    start = time.perf_counter()
    fp32_onnx = tmp / "fp32.onnx"
    export_fp32_onnx(model, fp32_onnx)
    ort_fp32 = Contender("FP32 ONNX Runtime", ort_predict(ort_session(fp32_onnx, threads)),
                         build_s=time.perf_counter() - start)

    start = time.perf_counter()
    source, pre_status = preprocess_for_ort(fp32_onnx, tmp / "fp32.pre.onnx")
    pre_s = time.perf_counter() - start
    statics: dict[CalibrationMethod, Contender] = {}
    static_paths: dict[CalibrationMethod, Path] = {}
    for method in (CalibrationMethod.MinMax, CalibrationMethod.Entropy, CalibrationMethod.Percentile):
        log(f"ORT quantize_static, {method.name} calibration")
        start = time.perf_counter()
        path = static_paths[method] = tmp / f"ort_{method.name.lower()}.onnx"
        ort_static(source, path, data.calib, method)
        label = f"{method.name} {PERCENTILE}" if method == CalibrationMethod.Percentile else method.name
        statics[method] = Contender(f"ORT quantize_static ({label})", ort_predict(ort_session(path, threads)),
                                    build_s=pre_s + time.perf_counter() - start)

    log("lowbit: capture + quantize")
    start = time.perf_counter()
    graph = capture(load_program(f"zoo:{MODEL}", None), MODEL)
    qgraph = quantize(graph, data.calib)
    quantize_s = time.perf_counter() - start
    log("lowbit: export model.onnx and model.int.onnx")
    lowbit_onnx: list[Contender] = []
    for file, exporter, name in (("model.onnx", export_qdq, "lowbit INT8, model.onnx (QDQ) in ORT"),
                                 ("model.int.onnx", export_integer, "lowbit INT8, model.int.onnx in ORT")):
        start = time.perf_counter()
        exporter(qgraph, tmp / file)
        lowbit_onnx.append(Contender(name, ort_predict(ort_session(tmp / file, threads)),
                                     build_s=quantize_s + time.perf_counter() - start))
    output = qgraph.outputs[0]
    reference = Contender("lowbit INT8, reference executor", lambda x: run_reference(qgraph, x)[output],
                          timed=False, build_s=quantize_s)

    contenders = [fp32, ort_fp32, *statics.values(), *lowbit_onnx, reference]
    for c in contenders:
        log(f"accuracy: {c.name}")
        c.heldout = batched(c.predict, data.heldout)
        c.labelled = batched(c.predict, data.x_lab)
        c.indomain = batched(c.predict, data.x_indomain)

    # The same quantize_static models without fusion: float math on the same quantized values, so no int16
    # saturation. Separates the quality of ORT's calibration from the effect of its AVX2 kernels.
    unfused: dict[CalibrationMethod, tuple[np.ndarray, np.ndarray]] = {}
    for method, path in static_paths.items():
        log(f"accuracy without QDQ fusion: {statics[method].name}")
        predict = ort_predict(ort_session(path, threads, fuse=False))
        unfused[method] = batched(predict, data.heldout), batched(predict, data.x_lab)

    floor = noise_floor(model, graph, qgraph)
    for c in floor:
        log(f"noise floor: {c.name}")
        c.heldout, c.indomain = batched(c.predict, data.heldout), batched(c.predict, data.x_indomain)

    log("latency")
    measure_latency(contenders, np.ascontiguousarray(data.heldout[:1]), runs, ROUNDS)
    return Results(contenders, fp32, ort_fp32, statics, unfused, lowbit_onnx[1], reference, floor, pre_status,
                   *weight_storage(tmp / "model.onnx"))


def noise_floor(model: torch.nn.Module, graph: Graph, qgraph: QuantizedGraph) -> list[Contender]:
    """FP32 with one source of error at a time: half-precision floats, or one part of lowbit's INT8 model
    (its input grid, its weights, its activation grids) in fake-quant. They show how much agreement this
    data leaves to any low-precision model."""
    fake_quant = fake_quantizers(qgraph)
    weights, biases = dequantized_params(qgraph)
    input_name, output = graph.inputs[0], graph.outputs[0]

    def half(dtype: torch.dtype) -> Predict:
        half_model = copy.deepcopy(model).to(dtype)

        def predict(x: np.ndarray) -> np.ndarray:
            with torch.inference_mode():
                return half_model(torch.from_numpy(x).to(dtype)).float().numpy()
        return predict

    def fake(tensors: set[str], with_weights: bool) -> Predict:
        def grid(name: str, t: torch.Tensor) -> torch.Tensor:
            return fake_quant[name](t) if name in tensors else t

        def predict(x: np.ndarray) -> np.ndarray:
            with torch.inference_mode():
                w, b = (weights, biases) if with_weights else (None, None)
                return run_graph(graph, torch.from_numpy(x), grid, w, b)[output].numpy()
        return predict

    activations = set(fake_quant) - {input_name}
    return [Contender("FP16 PyTorch (weights and activations)", half(torch.float16), timed=False),
            Contender("BF16 PyTorch (weights and activations)", half(torch.bfloat16), timed=False),
            Contender("FP32, only the input rounded to lowbit's int8 grid", fake({input_name}, False), timed=False),
            Contender("FP32, only the activations rounded to lowbit's int8 grids", fake(activations, False),
                      timed=False),
            Contender("FP32, only the weights replaced by lowbit's INT8 weights", fake(set(), True), timed=False),
            Contender("lowbit INT8 in fake-quant (all of the above but the half floats)",
                      fake(set(fake_quant), True), timed=False)]


def render_floor(r: Results, data: Data) -> str:
    heads, align = agreement_columns(data, r.fp32)
    lines = [f"| FP32 model with | {heads} | SQNR held-out (dB) | SQNR ImageNet (dB) |", f"|---|{align}|---:|---:|"]
    for c in r.floor:
        lines.append(f"| {c.name} | {agreement_cells(c, r.fp32, data)} | {sqnr_db(c.heldout, r.fp32.heldout):.1f} "
                     f"| {sqnr_db(c.indomain, r.fp32.indomain):.1f} |")
    return "\n".join(lines)


def render_report(data: Data, r: Results, command: str, threads: int, runs: int,
                  load_start: float, load_end: float) -> tuple[str, str]:
    """The whole Markdown report, and the table alone (for stdout)."""
    y_lab, ref_top1 = data.y_lab, r.fp32.heldout.argmax(1)
    best_static = max(r.statics.values(), key=lambda c: (np.sum(c.heldout.argmax(1) == ref_top1),
                                                         np.sum(c.labelled.argmax(1) == y_lab),
                                                         -mean_kl(r.fp32.heldout, c.heldout)))
    table = render_table(r.contenders, r.fp32, r.ort_fp32, best_static, data)

    exact = (np.array_equal(r.lowbit_int.heldout, r.reference.heldout)
             and np.array_equal(r.lowbit_int.labelled, r.reference.labelled))
    unfused = "".join(
        f"\n  - {method.name}: {fmt_agreement(h, r.fp32.heldout, data.heldout_photos)} agreement, "
        f"{fmt_correct(lab, y_lab)} labelled, mean KL {fmt_kl(mean_kl(r.fp32.heldout, h))}"
        for method, (h, lab) in r.unfused.items()
    )
    heldout_diff = fmt_difference(r.lowbit_int.heldout, best_static.heldout, r.fp32.heldout, data.heldout_photos)
    indomain_diff = fmt_difference(r.lowbit_int.indomain, best_static.indomain, r.fp32.indomain,
                                   data.indomain_photos)
    versus = f"{heldout_diff} on the held-out crops, {indomain_diff} on the ImageNet crops"
    gap, gap_indomain = logit_gap(r.fp32.heldout), logit_gap(r.fp32.indomain)
    cpu, flags = cpu_info()
    vnni = "avx512_vnni" in flags
    simd = ", ".join(f for f in ("avx2", "avx512f", "avx512_vnni", "avx_vnni") if f in flags) or "no AVX"
    versions = {"lowbit": f"{lowbit.__version__} ({lowbit_revision()})", "torch": torch.__version__,
                "onnxruntime": ort.__version__, "onnx": onnx.__version__, "numpy": np.__version__}

    if vnni or "avx_vnni" in flags:
        kernels = ("This CPU has VNNI, so ONNX Runtime's u8×s8 int8 kernels accumulate exactly in int32; "
                   "lowbit's uint8 weight storage (below) is not needed here.")
    else:
        kernels = ("This CPU lacks VNNI (neither AVX-512 VNNI nor AVX-VNNI), so ONNX Runtime's u8×s8 int8 kernels\n"
                   "  take the AVX2 path (vpmaddubsw), which adds pairs of u8×s8 products in *saturating* int16.\n"
                   "  quantize_static's int8 weights (reduce_range=False, the default used here) can saturate "
                   "there;\n  ORT's documentation suggests reduce_range or U8U8 when that costs accuracy.")
    entropy = ""
    if np.array_equal(r.statics[CalibrationMethod.Entropy].heldout, r.statics[CalibrationMethod.MinMax].heldout):
        entropy = ("\n- ORT's Entropy calibration, as reached through quantize_static, gives the same model as "
                   "MinMax: it uses\n  128 histogram bins and 128 quantized bins (its defaults, which quantize_static "
                   "cannot change),\n  which leaves one candidate threshold: the full range.")

    report = f"""# Benchmarks: MobileNetV2, lowbit vs ONNX Runtime static quantization

Generated by `benchmarks/bench_mobilenet_v2.py`; do not edit by hand.

- Command: `{command}`
- Date: {datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}
- Machine: {cpu}, {os.cpu_count()} logical CPUs ({simd}); AVX-512 VNNI: {"yes" if vnni else "no"};
  1-minute load average {load_start:.2f} at start, {load_end:.2f} at end (other jobs included)
- Versions: {", ".join(f"{k} {v}" for k, v in versions.items())}
- Model: torchvision MobileNetV2 1.0, ImageNet-pretrained (`zoo:{MODEL}`), input 1×3×224×224
- Data (seed {SEED}), identical for every contender:
  - calibration: {len(data.calib)} crops of {len(data.calib_sources)} photos ({", ".join(data.calib_sources)})
  - held-out: {len(data.heldout)} crops of {len(data.heldout_sources)} other photos \
({", ".join(data.heldout_sources)})
  - labelled: the {len(y_lab)} ImageNet images bundled with foolbox (resize 256, center crop 224)
  - in-domain: {len(data.x_indomain)} random crops ({CROPS_PER_LABELLED_PHOTO} per photo, 25–100% of the area) \
of those {len(y_lab)} ImageNet photos, for agreement on the photos the model was trained for

{table}

Top-1 agreement is measured against FP32 PyTorch, on the held-out crops and on the in-domain ImageNet crops apart,
each on all crops and on the confident ones (FP32 top-1/top-2 logit gap above {CONFIDENT_GAP}, the figure least hurt
by near ties). [low, high] is a bootstrap 95% interval that resamples photos, not crops (crops of one photo are
correlated; 2000 resamples, seed 0). Mean KL(softmax FP32 ‖ softmax model) is on the held-out crops;
labelled top-1 counts correct predictions against the true ImageNet labels, with a bootstrap interval in percent.
{r.lowbit_int.name} minus {best_static.name}, paired (both scored on the same crops, photos resampled): {versus}.
Latency is batch 1 with {threads}
intra-op threads (ORT `intra_op_num_threads`, `torch.set_num_threads`), all contenders in one process:
{WARMUP_RUNS} warm-up calls each, then {ROUNDS} rounds of {runs} timed calls per contender, the contenders taking
turns in blocks of {LATENCY_BLOCK} calls (each after a {TURN_PAUSE_S} s pause and {TURN_WARMUP} untimed calls) so that
background load falls on all alike; the median column is the minimum of the per-round medians, and ratios are
taken from it (below 1 is faster). The fastest single call shows the speed without interference, which matters
when the machine is loaded.
Build time is the wall time to make the model (ORT: pre-processing, calibration, quantization; lowbit: capture,
calibration, quantization, export).

Notes:

- ORT quantize_static: QDQ format, per-channel, activations QUInt8, weights QInt8, calibrated on the same
  {len(data.calib)} inputs through a `CalibrationDataReader`; percentile {PERCENTILE} via `CalibPercentile`.
  `quant_pre_process` (symbolic shape inference + ORT graph optimization) before quantization: {r.pre_status}.
  The FP32 ONNX model is the TorchScript export (`dynamo=False`), opset {OPSET}, dynamic batch.
- {kernels}
  With graph optimizations disabled (no QDQ fusion: float ops on the dequantized values, so no saturation)
  the same quantize_static models score:{unfused}{entropy}
- lowbit's `model.onnx` (`--onnx-weights auto`) keeps int8 weights where this CPU's u8×s8 kernels are exact (VNNI);
  elsewhere it stores weight tensors with |w| > 64 as uint8 + zero point 128 (the same real values), so that ORT
  uses its exact but slower u8×u8 kernels for them: {r.uint8_weights} of
  {r.uint8_weights + r.int8_weights} weight tensors here. It runs ORT's int8 kernels and is close to the reference
  executor, not bit-exact.
- lowbit's `model.int.onnx` is integer-only (ConvInteger/MatMulInteger, integer requantization) and matches the
  reference executor bit for bit; outputs identical to it on all {len(data.heldout) + len(y_lab)} held-out and
  labelled inputs here: {"yes" if exact else "**NO**"}. It is a correctness artifact, not the fast path (ORT runs
  its requantization as separate integer ops); the fast path is the TVM-compiled model (see the TVM section).
- The reference executor is lowbit's ground-truth interpreter of the integer IR (numpy/torch); it is not timed.

## How much agreement this data allows

Each row below is FP32 PyTorch with one source of error added. Many held-out crops are textures, cells,
coins or sky, where the FP32 prediction is a near tie: {100 * np.mean(gap < 0.2):.0f}% of them have a top-1/top-2
logit gap under 0.2 (median gap {np.median(gap):.2f}; in-domain crops: {100 * np.mean(gap_indomain < 0.2):.0f}%, median
{np.median(gap_indomain):.2f}), so tiny output noise flips them.

{render_floor(r, data)}
"""
    return report, table


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("BENCHMARKS.md"), help="report path (default BENCHMARKS.md)")
    parser.add_argument("--runs", type=int, default=100, help="timed batch-1 runs per contender per round")
    parser.add_argument("--threads", type=int, default=2, help="intra-op threads for ONNX Runtime and PyTorch")
    args = parser.parse_args(argv)
    if args.runs < 1 or args.threads < 1:
        parser.error("--runs and --threads must be at least 1")
    command = shlex.join(["python", *sys.argv] if argv is None else ["python", __file__, *argv])
    load_start = os.getloadavg()[0]
    torch.set_num_threads(args.threads)
    ort.set_default_logger_severity(3)

    log("loading data")
    data = load_data()
    with tempfile.TemporaryDirectory(prefix="lowbit-bench-") as tmp:
        results = run_benchmark(data, Path(tmp), args.threads, args.runs)
    report, table = render_report(data, results, command, args.threads, args.runs, load_start, os.getloadavg()[0])
    write_section(args.out, "mobilenet_v2", report)
    print(table)
    log(f"wrote {args.out} in {time.perf_counter() - _START:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
