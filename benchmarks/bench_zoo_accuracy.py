"""Every trained zoo CNN: lowbit's default recipe against ONNX Runtime static quantization, on the same data.

For each model, every contender is calibrated on the zoo's calibration set and scored against
FP32 on the same held-out set (plus the in-domain crops and the labelled set where the model has
them). lowbit is scored with its integer reference executor (what every lowbit backend computes
bit for bit); ONNX Runtime with its own QDQ models, run with its int8 kernels. Agreement comes with
95% bootstrap intervals over source photos, and the flips on confident inputs (FP32 top-1/top-2
logit gap above 1.0) are counted. Accuracy only: nothing here is timed.

    python benchmarks/bench_zoo_accuracy.py [--out BENCHMARKS.md] [--models mobilenet_v2,mnist_cnn]
"""

from __future__ import annotations

import argparse
import shlex
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
from bench_mobilenet_v2 import ArrayReader, ort_predict, ort_session, preprocess_for_ort
from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
from sections import cpu_info, lowbit_revision, write_section

from lowbit.metrics import CONFIDENT_GAP, agreement, confident_mask, mean_kl, paired_difference
from lowbit.models import foolbox_imagenet_crops, get_zoo_entry
from lowbit.pipeline.prepare import Source, prepare
from lowbit.pipeline.progress import Progress
from lowbit.pipeline.report import reference_outputs
from lowbit.quantizer.config import BitPlan, QuantConfig
from lowbit.quantizer.graph import Graph, run_graph
from lowbit.quantizer.quantize import quantize
from lowbit.quantizer.recipe import choose_recipe

MODELS = ("mobilenet_v2", "mnist_cnn")  # zoo:small_cnn has random weights: agreement with it means nothing
SEED = 0
OPSET = 17
EVAL_BATCH = 64
PERCENTILE = 99.999  # ORT's percentile setting, as in bench_mobilenet_v2
LOWBIT_RECIPES = {
    "lowbit default (auto recipe)": QuantConfig(seed=SEED),
    "lowbit percentile + GPTQ everywhere (the old default)": QuantConfig(calib_method="percentile", rounding="gptq",
                                                                        seed=SEED),
    "lowbit minmax + round-to-nearest": QuantConfig(calib_method="minmax", rounding="nearest", seed=SEED),
}
ORT_METHODS = {"ORT quantize_static MinMax": CalibrationMethod.MinMax,
               f"ORT quantize_static Percentile {PERCENTILE}": CalibrationMethod.Percentile}


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


@dataclass
class EvalSet:
    name: str
    x: np.ndarray
    photos: np.ndarray | None  # the source photo of each sample (None: independent samples)
    labels: np.ndarray | None = None
    fp32: np.ndarray = field(init=False)


@dataclass
class Scored:
    name: str
    logits: dict[str, np.ndarray]  # per evaluation set
    note: str = ""


def batched(predict, x: np.ndarray) -> np.ndarray:
    return np.concatenate([predict(np.ascontiguousarray(x[i:i + EVAL_BATCH])) for i in range(0, len(x), EVAL_BATCH)])


def eval_sets(name: str, prepared) -> list[EvalSet]:
    entry = get_zoo_entry(name)
    sets = [EvalSet("held-out", prepared.heldout.x, prepared.heldout.photos)]
    if name == "mobilenet_v2":
        x, photos = foolbox_imagenet_crops(10, SEED)
        sets.append(EvalSet("in-domain crops", x, photos))
    if entry.labelled is not None:
        x, labels = entry.labelled()
        sets.append(EvalSet("labelled", x, None, labels))
    return sets


def fp32_logits(graph: Graph, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return batched(lambda b: run_graph(graph, torch.from_numpy(b))[graph.outputs[0]].numpy(), x)


def lowbit_contenders(graph: Graph, calib: np.ndarray, sets: list[EvalSet]) -> list[Scored]:
    scored = []
    for label, config in LOWBIT_RECIPES.items():
        t0 = time.perf_counter()
        recipe = choose_recipe(graph, calib, config, BitPlan.uniform(graph, config.bits))
        qgraph = quantize(graph, calib, config, recipe=recipe)
        logits = {s.name: reference_outputs(qgraph, s.x)[graph.outputs[0]] for s in sets}
        seconds = time.perf_counter() - t0
        log(f"{label}: {recipe.describe(len(graph.layers))} ({seconds:.0f}s)")
        scored.append(Scored(label, logits, recipe.describe(len(graph.layers))))
    return scored


def ort_contenders(name: str, calib: np.ndarray, sets: list[EvalSet], tmp: Path) -> list[Scored]:
    entry = get_zoo_entry(name)
    fp32 = tmp / f"{name}.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(entry.build().eval(), (torch.zeros(entry.input_shape),), str(fp32), dynamo=False,
                          opset_version=OPSET, input_names=["input"], output_names=["logits"],
                          dynamic_axes={"input": {0: "N"}, "logits": {0: "N"}})
    source, _ = preprocess_for_ort(fp32, tmp / f"{name}.pre.onnx")
    scored = []
    for label, method in ORT_METHODS.items():
        out = tmp / f"{name}.{method.name}.onnx"
        extra = {"CalibPercentile": PERCENTILE} if method == CalibrationMethod.Percentile else {}
        quantize_static(str(source), str(out), ArrayReader(calib, "input"), quant_format=QuantFormat.QDQ,
                        per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        calibrate_method=method, extra_options=extra)
        predict = ort_predict(ort_session(out, threads=2))
        logits = {s.name: batched(predict, s.x) for s in sets}
        scored.append(Scored(label, logits))
        log(f"{label}: done")
    return scored


def render_model(name: str, prepared, sets: list[EvalSet], contenders: list[Scored]) -> str:
    graph = prepared.graph
    lines = [f"### `zoo:{name}`", "",
             f"- calibration: {len(prepared.calib)} samples, {prepared.calib.source}",
             *[f"- {s.name}: {len(s.x)} samples" + (f" of {len(np.unique(s.photos))} photos" if s.photos is not None
                                                    else "") for s in sets], ""]
    agreement_sets = [s for s in sets if s.labels is None]
    header = ["contender"]
    for s in agreement_sets:
        header += [f"agreement, {s.name}", f"confident {s.name} (gap > {CONFIDENT_GAP}): agree / flips",
                   f"mean KL, {s.name}"]
    header += [f"labelled top-1 ({len(s.x)})" for s in sets if s.labels is not None]
    lines += ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
    fp32_row = ["FP32 (captured graph)"]
    for s in agreement_sets:
        fp32_row += ["100%", f"{int(confident_mask(s.fp32).sum())} confident / 0", "0"]
    fp32_row += [f"{int((s.fp32.argmax(1) == s.labels).sum())}/{len(s.x)}" for s in sets if s.labels is not None]
    lines.append("| " + " | ".join(fp32_row) + " |")
    for c in contenders:
        row = [c.name]
        for s in agreement_sets:
            a = agreement(s.fp32, c.logits[s.name], s.photos)
            confident = agreement(s.fp32, c.logits[s.name], s.photos, confident_mask(s.fp32))
            row += [a.describe(), f"{confident.short()}; {confident.samples - confident.agree} flips",
                    f"{mean_kl(s.fp32, c.logits[s.name]):.2e}"]
        row += [f"{int((c.logits[s.name].argmax(1) == s.labels).sum())}/{len(s.x)}" for s in sets
                if s.labels is not None]
        lines.append("| " + " | ".join(row) + " |")
    lines.append("")
    # Differences are claimed only with paired intervals: lowbit's default against every other contender.
    default = contenders[0]
    for other in contenders[1:]:
        for s in agreement_sets:
            ours = default.logits[s.name].argmax(1) == s.fp32.argmax(1)
            theirs = other.logits[s.name].argmax(1) == s.fp32.argmax(1)
            diff, interval = paired_difference(ours, theirs, s.photos)
            lines.append(f"- {s.name}: lowbit default minus {other.name}: {100 * diff:+.1f} points, paired 95% "
                         f"interval [{100 * interval.low:+.1f}, {100 * interval.high:+.1f}]")
    lines += ["- lowbit's recipes as chosen: " + "; ".join(f"{c.name}: {c.note}" for c in contenders if c.note),
              f"- layers: {len(graph.layers)}", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, help="write the section into this Markdown file (e.g. BENCHMARKS.md)")
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated zoo names")
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    started = datetime.now(timezone.utc)
    sections = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            log(f"zoo:{name}")
            prepared = prepare(Source(f"zoo:{name}", seed=SEED), Progress(write=lambda _: None))
            sets = eval_sets(name, prepared)
            for s in sets:
                s.fp32 = fp32_logits(prepared.graph, s.x)
            contenders = lowbit_contenders(prepared.graph, prepared.calib.x, sets)
            contenders += ort_contenders(name, prepared.calib.x, sets, Path(tmp))
            sections.append(render_model(name, prepared, sets, contenders))
    model, flags = cpu_info()
    command = "python benchmarks/bench_zoo_accuracy.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    text = "\n".join([
        "# Benchmarks: every trained zoo CNN, lowbit's default recipe against ONNX Runtime static quantization",
        "", "Generated by `benchmarks/bench_zoo_accuracy.py`; do not edit by hand.", "",
        f"- Command: `{command.strip()}`",
        f"- Date: {started:%Y-%m-%d %H:%M} UTC; machine: {model}, AVX-512 VNNI: "
        f"{'yes' if 'avx512_vnni' in flags else 'no'}; lowbit {lowbit_revision()}",
        "- Every contender is calibrated on the same samples and scored against FP32 on the same ones. lowbit: its "
        "integer reference executor (every lowbit backend gives its outputs bit for bit); ORT: QDQ, per-channel "
        "s8 weights, u8 activations, run with its int8 kernels. Intervals: 95% bootstrap over source photos "
        "(2000 resamples); a confident input has an FP32 top-1/top-2 logit gap above 1.0; a flip is a confident "
        "input whose top-1 changed. Mean KL(softmax FP32 ‖ softmax model) separates contenders whose "
        "agreement is equal.", "",
        *sections,
    ])
    print(text)
    if args.out:
        write_section(args.out, "zoo_accuracy", text)
        log(f"wrote the zoo_accuracy section of {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
