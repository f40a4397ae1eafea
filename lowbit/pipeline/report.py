"""Fidelity of the quantized model on held-out inputs, and the report files (report.json, report.md).

FP32 is the captured float `Graph`; "quantized" is the reference executor on the integer IR (of whatever
widths: the weights / activations row gives them), the ground truth every backend must match. Per-layer
SQNR uses the fake-quant simulation (float ops on the integer grid), which is much cheaper than running
the reference layer by layer and differs from it only in requantization rounding.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import LowbitError
from ..io import atomic_file, write_json
from ..ir import QuantizedGraph
from ..metrics import (
    Agreement,
    bootstrap_interval,
    describe_agreement_summary,
    output_fidelity,
    paired_difference,
    sqnr_db,
)
from ..quantizer.graph import Graph, run_graph, run_node
from ..quantizer.reference import ModelData, run_reference_batches
from ..quantizer.reference import sample_rows as _rows
from ..quantizer.reference import samples_in as _count
from ..quantizer.simulate import dequantized_params, fake_quantizers
from .data import Inputs

EVAL_BATCH = 32
PER_LAYER_SAMPLES = 32  # enough for a stable per-layer SQNR; the side-by-side simulation is slow

Outputs = dict[str, np.ndarray]


# -- running the models ----------------------------------------------------------------------------------------------

def reference_outputs(qgraph: QuantizedGraph, x: ModelData, batch: int = EVAL_BATCH) -> Outputs:
    """The integer reference executor's float outputs, `batch` samples at a time."""
    return run_reference_batches(qgraph, x, batch)[0]


def _probe_points(graph: Graph, quantizers: dict[str, Any]) -> dict[str, str]:
    """Tensor to measure -> layer: the layer's output as its consumers see it, i.e. after a fused clamp."""
    probes = {}
    for layer in graph.layers:
        name = layer.name
        consumers = graph.consumers(name)
        if name not in quantizers and len(consumers) == 1 and consumers[0].op == "clamp":
            name = consumers[0].name
        probes[name] = layer.name
    return probes


@torch.no_grad()
def float_outputs_and_layer_sqnr(graph: Graph, qgraph: QuantizedGraph, x: ModelData, batch: int = EVAL_BATCH,
                                 layer_samples: int = PER_LAYER_SAMPLES) -> tuple[Outputs, dict[str, float | None]]:
    """FP32 outputs on all of `x`, and each layer's output SQNR (fake-quant vs float) on its first samples."""
    quantizers = fake_quantizers(qgraph)
    weights, biases = dequantized_params(qgraph)
    probes = _probe_points(graph, quantizers)
    signal = dict.fromkeys(probes.values(), 0.0)
    noise = dict.fromkeys(probes.values(), 0.0)
    last_use = graph.last_uses()
    parts: list[dict[str, torch.Tensor]] = []
    for start in range(0, _count(x), batch):
        rows = _rows(x, start, start + batch)
        xb = ({k: torch.from_numpy(v) for k, v in rows.items()} if isinstance(rows, Mapping) else
              {graph.inputs[0]: torch.from_numpy(rows)})
        if start >= layer_samples:
            parts.append(run_graph(graph, xb))
            continue
        # Float and fake-quant side by side, so every layer's error is measured without storing activations.
        float_env: dict[str, torch.Tensor] = {}
        quant_env: dict[str, torch.Tensor] = {}
        for i, node in enumerate(graph.nodes):
            if node.op == "input":
                f = q = xb[node.name]
            else:
                f = run_node(graph, node, [float_env[n] for n in node.inputs])
                q = run_node(graph, node, [quant_env[n] for n in node.inputs], weights.get(node.name),
                             biases.get(node.name))
            fq = quantizers.get(node.name)
            q = fq(q) if fq else q
            if node.name in probes:
                layer = probes[node.name]
                # vector_norm: one accurate reduction pass, no float64 copies of large activations.
                signal[layer] += float(torch.linalg.vector_norm(f)) ** 2
                noise[layer] += float(torch.linalg.vector_norm(q - f)) ** 2
            float_env[node.name], quant_env[node.name] = f, q
            for name in node.inputs:
                if last_use[name] == i and name not in graph.outputs:
                    del float_env[name], quant_env[name]
        parts.append({o: float_env[o] for o in graph.outputs})
    outputs = {o: torch.cat([p[o] for p in parts]).numpy() for o in graph.outputs}
    return outputs, {layer: sqnr_db(signal[layer], noise[layer]) for layer in signal}


def labelled_scores(graph: Graph, qgraph: QuantizedGraph, x: np.ndarray, labels: np.ndarray,
                    source: str) -> dict[str, Any]:
    """Top-1 accuracy of FP32 and the quantized model against true labels (one image per photo), with bootstrap
    95% intervals, and the interval of quantized minus FP32 (paired: both scored on the same images)."""
    output = graph.outputs[0]
    fp32 = torch.cat([run_graph(graph, torch.from_numpy(x[i:i + EVAL_BATCH]))[output]
                      for i in range(0, len(x), EVAL_BATCH)]).numpy()
    int8 = reference_outputs(qgraph, x)[qgraph.outputs[0]]
    correct_fp32, correct_int8 = fp32.argmax(1) == labels, int8.argmax(1) == labels
    difference, interval = paired_difference(correct_int8, correct_fp32)
    return {
        "samples": len(labels),
        "source": source,
        "top1_fp32": float(np.mean(correct_fp32)),
        "top1_fp32_interval": list(bootstrap_interval(correct_fp32)[:2]),
        "top1_int8": float(np.mean(correct_int8)),
        "top1_int8_interval": list(bootstrap_interval(correct_int8)[:2]),
        "int8_minus_fp32": {"value": difference, "low": interval.low, "high": interval.high},
    }


def qdq_check(directory: Path, qgraph: QuantizedGraph, x: ModelData, reference: Outputs,
              batch: int = EVAL_BATCH, photos: np.ndarray | None = None, embedding: bool = False) -> dict[str, Any]:
    """`model.onnx` in ONNX Runtime against the reference executor's outputs on `x` (`photos`: each sample's).

    It runs ORT's own int8 kernels on float tensors, so it is only close, not bit-exact.
    """
    from .checks import ort_session

    session = ort_session(directory / "model.onnx")
    names = [i.name for i in session.get_inputs()]

    def feed(rows: ModelData) -> dict[str, np.ndarray]:
        return dict(rows) if isinstance(rows, Mapping) else {names[0]: rows}

    parts = [session.run(qgraph.outputs, feed(_rows(x, i, i + batch))) for i in range(0, _count(x), batch)]
    got = {name: np.concatenate([p[k] for p in parts]) for k, name in enumerate(qgraph.outputs)}
    first = qgraph.outputs[0]
    return {
        "samples": _count(x),
        "bit_exact": all(np.array_equal(got[o], reference[o]) for o in qgraph.outputs),
        "max_abs_diff": max(float(np.max(np.abs(got[o] - reference[o]))) for o in qgraph.outputs),
        "vs_reference": output_fidelity(reference[first], got[first], photos, embedding),
    }


# -- the report ------------------------------------------------------------------------------------------------------

def layer_rows(graph: Graph, qgraph: QuantizedGraph, layer_sqnr: dict[str, float | None]) -> list[dict[str, Any]]:
    bits = qgraph.bit_plan()
    return [
        {
            "name": row["name"],
            "op": row["op"],
            "weight_shape": row["weight_shape"],
            "groups": row["groups"],
            "macs": row["macs"],
            "bits": bits[row["name"]],
            "sqnr_db": layer_sqnr.get(row["name"]),
            "source": row["source"],
        }
        for row in graph.layer_table()
    ]


def model_sizes(graph: Graph, qgraph: QuantizedGraph) -> dict[str, Any]:
    """Weights and biases of the quantizable layers, FP32 vs packed integers."""
    fp32 = 4 * sum(graph.weight(n.name).numel() + graph.bias(n.name).numel() for n in graph.layers)
    quantized = qgraph.weight_bytes()
    return {"fp32_bytes": int(fp32), "quantized_bytes": int(quantized),
            "compression": fp32 / quantized if quantized else None}


def data_summary(inputs: Inputs) -> dict[str, Any]:
    """Samples, distinct source photos (None: unknown) and where the data came from."""
    photos = None if inputs.photos is None else len(np.unique(inputs.photos))
    return {"samples": len(inputs), "photos": photos, "source": inputs.source}


def fmt_agreement(fidelity: dict[str, Any], confident: bool = True) -> str | None:
    """'84.9% [79.2, 90.1] (163/192 crops of 13 photos); confident inputs (gap > 1.0): ...' from an
    `output_fidelity` record; None for outputs that are not class scores."""
    summary = fidelity.get("agreement")
    if summary is None:
        return None if fidelity.get("top1_agreement") is None else fmt_pct(fidelity["top1_agreement"])
    return describe_agreement_summary(summary) if confident else Agreement.from_json(summary["top1"]).describe()


def fmt_interval(value: float, interval: list[float] | tuple[float, float]) -> str:
    """'45.0% [25.0, 65.0]'."""
    return f"{100 * value:.1f}% [{100 * interval[0]:.1f}, {100 * interval[1]:.1f}]"


def fmt_db(value: float | None) -> str:
    return "inf (exact)" if value is None else f"{value:.1f} dB"


def fmt_pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.2f}%"


def fmt_bytes(n: int) -> str:
    return f"{n / 1e6:.2f} MB" if n >= 1e6 else f"{n / 1e3:.1f} kB"


def fmt_count(n: int) -> str:
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return str(n)


def bits_summary(bit_plan: dict[str, int]) -> str:
    counts = Counter(bit_plan.values())
    return ", ".join(f"{b}-bit ({n} layer{'s' if n != 1 else ''})" for b, n in sorted(counts.items(), reverse=True))


def render_markdown(report: dict[str, Any]) -> str:
    """report.md: a summary table first, then timings and the per-layer table."""
    fid = report["fidelity"]
    model, size = report["model"], report["size"]
    rows: list[tuple[str, str]] = [
        ("model", f"`{model['spec']}` ({model['nodes']} nodes, {model['layers']} layers, "
                  f"{fmt_count(model['macs'])} MACs, {fmt_count(model['params'])} parameters)"),
        ("weights / activations", f"{bits_summary(report['bit_plan'])} / {_activations(report)}"),
        ("calibration", f"{samples_text(report['calibration'])}: {report['calibration']['source']}"),
        ("recipe", _recipe(report)),
        ("held-out", f"{samples_text(report['heldout'])}: {report['heldout']['source']}"),
        *_agreement_rows(fid),
        ("mean KL(FP32 ‖ quantized)", "n/a" if fid["mean_kl"] is None else f"{fid['mean_kl']:.5f}"),
        ("output SQNR", fmt_db(fid["sqnr_db"])),
    ]
    lab = report.get("labelled")
    if lab:
        if "top1_fp32_interval" in lab:
            d = lab["int8_minus_fp32"]
            text = (f"FP32 {fmt_interval(lab['top1_fp32'], lab['top1_fp32_interval'])}, quantized "
                    f"{fmt_interval(lab['top1_int8'], lab['top1_int8_interval'])}; quantized − FP32 "
                    f"{100 * d['value']:+.1f} points [{100 * d['low']:+.1f}, {100 * d['high']:+.1f}]")
        else:
            text = f"FP32 {fmt_pct(lab['top1_fp32'])}, quantized {fmt_pct(lab['top1_int8'])}"
        rows.append((f"labelled top-1 ({lab['samples']} images)", text))
    compression = f" ({size['compression']:.2f}x smaller)" if size["compression"] else ""
    rows.append(("layer weights + biases",
                 f"FP32 {fmt_bytes(size['fp32_bytes'])} → {fmt_bytes(size['quantized_bytes'])}{compression}"))
    ort_checks = report.get("onnxruntime") or {}
    if "model.int.onnx" in ort_checks:
        c = ort_checks["model.int.onnx"]
        verdict = "bit-exact" if c["bit_exact"] else f"NOT bit-exact ({c['first_difference']})"
        rows.append(("model.int.onnx in ONNX Runtime", f"{verdict} vs the reference on {_inputs(c)}"))
    if "model.onnx" in ort_checks:
        c = ort_checks["model.onnx"]["vs_reference"]
        weights = report.get("onnx_weights")
        stored = f"; {weights['stored']} weights" if weights else ""
        closeness = (f"cosine with the reference {fmt_cosine(c['cosine'])}" if c.get("cosine") else
                     f"top-1 agreement with the reference {fmt_agreement(c, confident=False)}")
        rows.append(("model.onnx (QDQ) in ONNX Runtime", f"{closeness}, SQNR {fmt_db(c['sqnr_db'])}{stored}"))
    tvm = report.get("tvm")
    if tvm:
        verdict = "bit-exact" if tvm["bit_exact"] else f"NOT bit-exact ({tvm['first_difference']})"
        latency = f"; {tvm['latency_ms']:.2f} ms at batch 1"
        rows.append((f"TVM ({tvm['target']}, {tvm['kernels']} kernels)",
                     f"{verdict} vs the reference on {_inputs(tvm)}; compiled in "
                     f"{tvm['compile_seconds']:.1f} s{latency}"))
    if report.get("integer_only") is not None:
        rows.append(("model.int.onnx integer-only", "yes" if report["integer_only"] else
                     f"no: float tensors {', '.join(report['float_tensors_in_int_model'])}"))
    rows.append(("total time", f"{report['timings']['total_s']:.1f} s"))

    lines = [f"# lowbit quantization report: {model['name']}", ""]
    mismatches = report.get("mismatches") or []
    if mismatches:  # kept only because --allow-mismatch was given: say so before anything else
        lines += ["**Warning: the checks failed; this artifact was kept only because of --allow-mismatch. "
                  "Do not deploy it.**", "", *[f"- {m}" for m in mismatches], ""]
    lines += ["| | |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in rows]
    notes = list(report.get("notes") or [])
    bootstrap = (fid.get("agreement") or {}).get("bootstrap")
    if bootstrap:
        what = ("photos (crops of one photo are correlated)" if bootstrap["resampled"] == "photos" else
                "samples, as if independent: the data does not say which photo each came from")
        notes.insert(0, f"Intervals: {100 * bootstrap['level']:.0f}% bootstrap percentile intervals, resampling "
                        f"{what}; {bootstrap['resamples']} resamples, seed {bootstrap['seed']}. Confident inputs: "
                        f"FP32 top-1/top-2 logit gap above {float(fid['agreement']['confident']['gap'])}, the figure "
                        "least hurt by near ties.")
    if notes:
        lines += ["", *[f"- {n}" for n in notes]]
    lines += _wide_activation_lines(report)
    if report.get("smoothing"):
        lines += ["", "## SmoothQuant", "", *_smoothing_lines(report["smoothing"])]
    lines += ["", "## Stage timings", "", "| stage | seconds |", "|---|---:|"]
    lines += [f"| {k} | {v:.2f} |" for k, v in report["timings"]["stages"].items()]
    for k, v in report["timings"]["steps"].items():
        lines.append(f"| &nbsp;&nbsp;{k} | {v:.2f} |")
    lines += ["", "## Layers", "",
              f"SQNR: each layer's output, fake-quant vs FP32, on the first {report['per_layer_samples']} "
              "held-out samples (errors of earlier layers included).", "",
              "| # | layer | op | weight shape | groups | MACs | bits | rounding | SQNR |",
              "|---:|---|---|---|---:|---:|---:|---|---:|"]
    for i, row in enumerate(report["layers"]):
        shape = "×".join(map(str, row["weight_shape"]))
        lines.append(f"| {i} | `{row['name']}` | {row['op']} | {shape} | {row['groups']} | "
                     f"{fmt_count(row['macs'])} | {row['bits']} | {row.get('rounding', '')} | "
                     f"{fmt_db(row['sqnr_db'])} |")
    return "\n".join(lines) + "\n"


def _activations(report: dict[str, Any]) -> str:
    wide = sorted(report.get("activation_bits") or {})
    if not wide:
        return "8-bit"
    return f"8-bit, 16-bit for {len(wide)} tensor{'s' if len(wide) > 1 else ''}: {', '.join(f'`{n}`' for n in wide)}"


def _wide_activation_lines(report: dict[str, Any]) -> list[str]:
    """With --max-drop: the search behind the plan, and what each 16-bit tensor saves and costs."""
    found = report.get("search")
    if found is None:
        return []
    costs = report.get("activation_costs") or {}
    lines = ["", "## 16-bit activations", "",
             f"Chosen by a search (`search/report.md`): the plan with the fewest extra BOPs whose measured top-1 "
             f"agreement is within {100 * found['max_drop']:.2f}% of the plan with every such tensor at 16 bits. "
             f"{len(costs)} tensor{'s' if len(costs) != 1 else ''} kept at 16 bits."]
    if costs:
        lines += ["", "| tensor | predicted loss saved | BOPs added |", "|---|---:|---:|"]
        lines += [f"| `{t}` | {c['loss_saved']:.3g} | {c['bops'] / 1e9:.3f} G |" for t, c in costs.items()]
    return lines


def _recipe(report: dict[str, Any]) -> str:
    """The ranges and rounding used, and how they were chosen (the config's `auto` parts: by validation error)."""
    recipe = report.get("recipe")
    if recipe is None:
        return report["config"]["calib_method"]
    chosen = (f"{recipe['calib_method']} activation ranges, GPTQ rounding on {len(recipe['gptq_layers'])}/"
              f"{len(report['layers'])} layers (round-to-nearest elsewhere)")
    if recipe["chosen_by"] != "validation":
        return f"{chosen}; chosen by {recipe['chosen_by']}"
    ranges = ", ".join(f"{m} {e:.4g}" for m, e in recipe["range_error"].items())
    rounding = ("" if "gptq_model_error" not in recipe else
                f"; with the layers' GPTQ choices {recipe['gptq_model_error']:.4g}")
    return (f"{chosen}; chosen by {recipe['metric']} on {recipe['validation_samples']} calibration samples held "
            f"back from the {recipe['fit_samples']} fitted (round-to-nearest with {ranges}{rounding})")


def samples_text(data: dict[str, Any]) -> str:
    """'192 samples of 13 photos', '64 samples' (photos unknown), from a `data_summary`."""
    photos = data.get("photos")
    of = "" if photos is None else f" of {photos} photo{'s' if photos != 1 else ''}"
    return f"{data['samples']} samples{of}"


def fmt_cosine(cosine: dict[str, Any]) -> str:
    """'mean 0.9921 [0.9910, 0.9931], worst 1% 0.9702, min 0.9650 (200 samples)' from a `cosine_summary`."""
    lo, hi = cosine["interval"]
    return (f"mean {cosine['mean']:.4f} [{lo:.4f}, {hi:.4f}], worst 1% {cosine['worst_1pct']:.4f}, "
            f"min {cosine['min']:.4f} ({cosine['samples']} samples)")


def _agreement_rows(fid: dict[str, Any]) -> list[tuple[str, str]]:
    """The embedding cosine row, or the top-1 agreement row and the one on confident inputs."""
    if fid.get("cosine"):
        return [("embedding cosine FP32 vs quantized", fmt_cosine(fid["cosine"]))]
    summary = fid.get("agreement")
    if summary is None:
        return [("top-1 agreement FP32 vs quantized", fmt_pct(fid["top1_agreement"]))]
    confident = summary["confident"]
    return [("top-1 agreement FP32 vs quantized", Agreement.from_json(summary["top1"]).describe()),
            (f"… on confident inputs (FP32 gap > {float(confident['gap'])})",
             Agreement.from_json(confident).describe())]


def _smoothing_lines(smoothing: dict[str, Any]) -> list[str]:
    """One row per group of linears reading one tensor: where 1/s folds, alpha, outlier ratio and W8A8 error."""
    lines = [f"alpha {smoothing['alpha']}; statistics from {smoothing['tokens']} calibration tokens. Outliers: max / "
             "median over channels of max|X|; error: relative W8A8 error of X·Wᵀ on held-back tokens.", "",
             "| tensor | read by | folded into | alpha | outliers before → after | error before → after |",
             "|---|---|---|---:|---|---|"]
    for g in smoothing["groups"]:
        into = f"`{g['folded_into']}`" if g["applied"] else f"not applied: {g['reason'] or 'no alpha helped'}"
        alpha = "" if g["alpha"] is None else f"{g['alpha']:.1f}"
        lines.append(f"| `{g['tensor']}` | {len(g['layers'])} linear(s) | {into} | {alpha} | "
                     f"{g['outliers_before']:.1f} → {g['outliers_after']:.1f} | "
                     f"{g['error_before']:.2e} → {g['error_after']:.2e} |")
    return lines


def _inputs(check: dict[str, Any]) -> str:
    """"80 inputs (64 held-out, 8 random, 8 saturating)" for a backend check's record (a text model's extreme
    inputs are "full_length" ones: `CheckInputs.to_json` names the last count by its kind)."""
    n = check["inputs"]
    extreme = next(k for k in n if k not in ("total", "heldout", "random"))
    return (f"{n['total']} inputs ({n['heldout']} held-out, {n['random']} random, {n[extreme]} "
            f"{extreme.replace('_', '-')})")


def write_reports(directory: Path, report: dict[str, Any]) -> None:
    path = directory / "report.json"
    try:
        write_json(path, report)
        path = directory / "report.md"
        with atomic_file(path) as f:
            f.write(render_markdown(report))
    except OSError as e:  # disk full, quota, permissions: a clear error, not a traceback
        raise LowbitError(f"{path}: cannot write the report: {e.strerror or e}") from e

