"""MiniLM-L6 sentence embeddings: lowbit's integer-only encoder against ONNX Runtime's INT8 recipes and FP32.

Every contender embeds the same text: the 200 held-out sentences (cosine with FP32 PyTorch), Lee-50's
documents, and WordSim-353's words (Spearman against human scores; SimLex-999's 1028 words are left out:
each word is a full seq-128 pass of the integer model, minutes per contender). Quantized
contenders calibrate on the same 128 sentences (lowbit's default calibration text). Intervals are
bootstrap 95% intervals: over sentences for the cosine, over documents (Lee-50) or word pairs for the
Spearman difference with FP32. Latency is measured at batch 1 and 8, seq 128, every contender in this
one process, in interleaved rounds (bench_mobilenet_v2.measure_latency).

lowbit's accuracy is computed by the integer reference executor, or by `model.int.onnx` in ONNX Runtime
after checking it bit for bit against the reference on held-out sentences (the faster of the two when it
exists). The result is a Markdown section of BENCHMARKS.md.

    python benchmarks/bench_minilm.py [--out BENCHMARKS.md] [--threads 2] [--runs 50]
"""

from __future__ import annotations

import argparse
import shlex
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from bench_mobilenet_v2 import OPSET, log, measure_latency, ort_session
from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_dynamic, quantize_static
from sections import cpu_info, lowbit_revision, write_section

from lowbit.ir import QuantizedGraph
from lowbit.metrics import bootstrap_interval
from lowbit.models.minilm import minilm_calibration_text, minilm_heldout_text, minilm_l6
from lowbit.quantizer.capture import capture
from lowbit.quantizer.config import BitPlan, QuantConfig
from lowbit.quantizer.graph import Graph
from lowbit.quantizer.quantize import quantize, wide_tensors
from lowbit.quantizer.reference import run_reference
from lowbit.quantizer.smooth import smooth
from lowbit.text import read_lee50, read_word_pairs
from lowbit.text.corpora import WORDSIM353, Lee50
from lowbit.text.similarity import row_cosines, spearman

SEQ_LEN = 128
EVAL_BATCH = 32
RESAMPLES = 1000
Embed = Callable[[np.ndarray, np.ndarray], np.ndarray]  # (input_ids, attention_mask) -> embeddings

@dataclass
class Contender:
    name: str
    embed: Embed
    build_s: float | None = None
    timed: bool = True
    evaluate: bool = True  # False: timed only (another contender computes the same integers)
    outputs: dict[str, np.ndarray] = field(default_factory=dict)  # eval set -> embeddings
    latency_ms: float | None = None
    fastest_ms: float | None = None
    predict: Callable[[np.ndarray], np.ndarray] | None = None  # set per batch size for measure_latency
    batch: int | None = None  # a static-batch build (TVM): timed at that batch only


def _ort_embed(path: Path, threads: int) -> Embed:
    session = ort_session(path, threads)
    output = next(o.name for o in session.get_outputs() if o.type == "tensor(float)")

    def embed(ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        return session.run([output], {"input_ids": ids, "attention_mask": mask})[0]

    return embed


class _TokenReader(CalibrationDataReader):
    def __init__(self, ids: np.ndarray, mask: np.ndarray):
        self.ids, self.mask, self.i = ids, mask, 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self.i >= len(self.ids):
            return None
        self.i += 1
        return {"input_ids": self.ids[self.i - 1:self.i], "attention_mask": self.mask[self.i - 1:self.i]}

    def rewind(self) -> None:
        self.i = 0


def export_fp32(model: torch.nn.Module, example: tuple[torch.Tensor, torch.Tensor], path: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, example, str(path), dynamo=False, opset_version=OPSET,
                          input_names=["input_ids", "attention_mask"], output_names=["embedding"],
                          dynamic_axes={"input_ids": {0: "N"}, "attention_mask": {0: "N"}, "embedding": {0: "N"}})


def lowbit_embed(graph: Graph, qgraph: QuantizedGraph, check: dict[str, np.ndarray], threads: int,
                 folder: Path) -> tuple[Embed, str]:
    """`model.int.onnx` in ORT, checked bit for bit against the reference; the reference if it cannot export."""
    from lowbit.codegen import export_integer
    from lowbit.errors import LowbitError

    path = folder / f"{qgraph.name}.int.onnx"
    try:
        export_integer(qgraph, path)
    except LowbitError as e:
        log(f"model.int.onnx not available ({e}); lowbit's accuracy from the reference executor")
        return (lambda ids, mask: run_reference(qgraph, {"input_ids": ids, "attention_mask": mask})[
            graph.outputs[0]]), "reference executor"
    session = ort_session(path, threads)
    want = run_reference(qgraph, check, integer_outputs=True)
    got = dict(zip(qgraph.int_outputs, session.run(qgraph.int_outputs, check), strict=True))
    for name in qgraph.int_outputs:
        if not np.array_equal(got[name], want[name]):
            raise SystemExit(f"{path}: integer output {name} differs from the reference executor")
    return _ort_embed(path, threads), "model.int.onnx in ORT (bit-exact with the reference)"


def tvm_embed(qgraph: QuantizedGraph, check: dict[str, np.ndarray], batch: int = 1) -> Embed:
    """The TVM build of `qgraph` at a static `batch` (this machine's CPU), checked bit for bit against the
    reference on the `check` sentences (a multiple of `batch`)."""
    import tvm

    from lowbit.codegen.tvm.compile import build
    from lowbit.codegen.tvm.target import DEFAULT_TARGET, parse_target

    start = time.perf_counter()
    executable, lowered, kernels = build(qgraph.with_batch(batch), parse_target(DEFAULT_TARGET), integer_outputs=True)
    log(f"TVM build at batch {batch} ({kernels} kernels) in {time.perf_counter() - start:.0f}s")
    vm = tvm.relax.VirtualMachine(executable, tvm.cpu())
    params = [tvm.runtime.tensor(a) for a in lowered.params.values()]

    def run(ids: np.ndarray, mask: np.ndarray) -> list:
        return vm["main"](tvm.runtime.tensor(ids), tvm.runtime.tensor(mask), *params)

    want = run_reference(qgraph, check, integer_outputs=True)[qgraph.int_outputs[0]]
    for i in range(0, len(want), batch):
        got = run(check["input_ids"][i:i + batch], check["attention_mask"][i:i + batch])[len(lowered.outputs)]
        if not np.array_equal(got.numpy(), want[i:i + batch]):
            raise SystemExit(f"the TVM build of {qgraph.name} at batch {batch} differs from the reference executor "
                             f"on sentences {i}..{i + batch - 1}")

    def embed(ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        parts = []
        for i in range(0, len(ids), batch):  # the last chunk padded with its first row to the static batch
            rows = min(batch, len(ids) - i)
            take = np.r_[np.arange(i, i + rows), np.full(batch - rows, i)]
            parts.append(run(np.ascontiguousarray(ids[take]), np.ascontiguousarray(mask[take]))[0].numpy()[:rows])
        return np.concatenate(parts)

    return embed


def embed_all(embed: Embed, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
    parts = [embed(np.ascontiguousarray(ids[i:i + EVAL_BATCH]), np.ascontiguousarray(mask[i:i + EVAL_BATCH]))
             for i in range(0, len(ids), EVAL_BATCH)]
    return np.concatenate(parts).astype(np.float64)


# -- scoring -----------------------------------------------------------------------------------------------------------

def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def lee50_difference(emb: np.ndarray, fp32: np.ndarray, seed: int = 0) -> tuple[float, tuple[float, float]]:
    """Spearman(emb) - Spearman(fp32) on Lee-50 and its 95% interval, resampling documents."""
    lee = read_lee50()
    a, b = _unit(emb), _unit(fp32)
    rng = np.random.default_rng(seed)

    def rho(docs: np.ndarray) -> float:
        i, j = np.triu_indices(len(docs), k=1)
        keep = docs[i] != docs[j]
        di, dj = np.minimum(docs[i], docs[j])[keep], np.maximum(docs[i], docs[j])[keep]
        human = lee.similarities[di, dj]
        return spearman((a[di] * a[dj]).sum(1), human) - spearman((b[di] * b[dj]).sum(1), human)

    draws = [rho(rng.integers(0, len(a), len(a))) for _ in range(RESAMPLES)]
    return rho(np.arange(len(a))), (float(np.percentile(draws, 2.5)), float(np.percentile(draws, 97.5)))


def word_difference(name: str, emb: np.ndarray, fp32: np.ndarray, words: list[str],
                    seed: int = 0) -> tuple[float, tuple[float, float]]:
    pairs = read_word_pairs(name)
    index = {w: k for k, w in enumerate(words)}
    first, second = [index[w] for w in pairs.first], [index[w] for w in pairs.second]
    sims = [(_unit(e)[first] * _unit(e)[second]).sum(1) for e in (emb, fp32)]
    rng = np.random.default_rng(seed)

    def diff(k: np.ndarray) -> float:
        return spearman(sims[0][k], pairs.scores[k]) - spearman(sims[1][k], pairs.scores[k])

    draws = [diff(rng.integers(0, len(first), len(first))) for _ in range(RESAMPLES)]
    return diff(np.arange(len(first))), (float(np.percentile(draws, 2.5)), float(np.percentile(draws, 97.5)))


# -- the run -----------------------------------------------------------------------------------------------------------

def fmt_diff(value: float, interval: tuple[float, float]) -> str:
    return f"{value:+.4f} [{interval[0]:+.4f}, {interval[1]:+.4f}]"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("BENCHMARKS.md"))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=50, help="timed calls per contender and round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--plan", type=Path, action="append", default=[],
                        help="a plan.json from `lowbit search zoo:minilm_l6` (its default smoothing): one more lowbit "
                             "contender, quantized with it as `lowbit quantize --plan` does (repeatable)")
    parser.add_argument("--no-latency", action="store_true", help="accuracy only (no quiet machine needed)")
    parser.add_argument("--latency-only", action="store_true",
                        help="latency only, of the default lowbit plan: section minilm_latency")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    encoder = minilm_l6(SEQ_LEN)
    tok = encoder.tokenizer

    def tokens(texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        t = tok.encode(list(texts))
        return t.input_ids, t.attention_mask

    calib_ids, calib_mask = tokens(minilm_calibration_text())
    lee = read_lee50()
    words = read_word_pairs(WORDSIM353).words()
    sets = {"heldout": tokens(minilm_heldout_text()), "lee50": tokens(lee.documents), "words": tokens(words)}
    log(f"{len(calib_ids)} calibration sentences; eval: " + ", ".join(f"{k} {len(v[0])}" for k, v in sets.items()))

    def torch_embed(ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return encoder.model(torch.from_numpy(ids), torch.from_numpy(mask)).numpy()

    contenders = [Contender("FP32 PyTorch", torch_embed)]
    folder = Path(tempfile.mkdtemp(prefix="bench_minilm."))
    fp32_path = folder / "fp32.onnx"
    export_fp32(encoder.model, encoder.example_inputs(batch=2), fp32_path)
    contenders.append(Contender("FP32 ONNX Runtime", _ort_embed(fp32_path, args.threads)))
    start = time.perf_counter()
    quantize_dynamic(str(fp32_path), str(folder / "dynamic.onnx"), weight_type=QuantType.QInt8)
    contenders.append(Contender("ORT quantize_dynamic (INT8 weights, dynamic activations)",
                                _ort_embed(folder / "dynamic.onnx", args.threads), time.perf_counter() - start))
    # reduce_range: 7-bit weights, on which ORT's u8 x s8 kernels cannot saturate (per tensor here; lowbit's
    # --bits 7 is per channel)
    start = time.perf_counter()
    quantize_dynamic(str(fp32_path), str(folder / "dynamic7.onnx"), weight_type=QuantType.QInt8, reduce_range=True)
    contenders.append(Contender("ORT quantize_dynamic reduce_range (7-bit weights, dynamic activations)",
                                _ort_embed(folder / "dynamic7.onnx", args.threads), time.perf_counter() - start))
    start = time.perf_counter()
    quantize_static(str(fp32_path), str(folder / "static.onnx"), _TokenReader(calib_ids, calib_mask),
                    quant_format=QuantFormat.QDQ, per_channel=True, activation_type=QuantType.QUInt8,
                    weight_type=QuantType.QInt8)
    contenders.append(Contender("ORT quantize_static QDQ (W8A8, MinMax)", _ort_embed(folder / "static.onnx",
                                                                                     args.threads),
                                time.perf_counter() - start))

    graph = capture(torch.export.export(encoder.model, encoder.example_inputs(batch=1)), "minilm_l6")
    calib = {"input_ids": calib_ids, "attention_mask": calib_mask}
    check = {"input_ids": sets["heldout"][0][:8], "attention_mask": sets["heldout"][1][:8]}
    # lowbit's default for a transformer smooths first (`--smooth default`: auto); the plain graph is the contrast.
    start = time.perf_counter()
    smoothed, _ = smooth(graph, {k: torch.from_numpy(v) for k, v in calib.items()}, "auto")
    smooth_s = time.perf_counter() - start
    # (graph, its smoothing seconds, bit plan, timed in TVM). --bits 7: int8 on the 7-bit grid, which lets an
    # AVX2 CPU without VNNI run the exact u8 x s8 byte-pair GEMM (7 bits, as ORT's reduce_range).
    graphs = {"lowbit W8A8 integer-only, SmoothQuant auto (the default)":
              (smoothed, smooth_s, BitPlan.uniform(smoothed, 8), True),
              "lowbit W7A8 integer-only (--bits 7), SmoothQuant auto":
              (smoothed, smooth_s, BitPlan.uniform(smoothed, 7), True),
              "lowbit W8A8 integer-only, --smooth none": (graph, 0.0, BitPlan.uniform(graph, 8), False)}
    for path in args.plan:  # searched plans: on the smoothed graph, as `lowbit search` measures them
        plan = BitPlan.load(path)
        widths = "/".join(f"W{b}" for b in sorted(set(plan.bits.values()), reverse=True))
        graphs[f"lowbit {widths}A8 plan {path.parent.name}/{path.name}, SmoothQuant auto"] = (smoothed, smooth_s, plan,
                                                                                              True)
    if args.latency_only:
        graphs = {name: g for name, g in graphs.items() if g[3]}
    executor = ""
    for name, (graph, smooth_s, plan, timed) in graphs.items():
        start = time.perf_counter() - smooth_s
        qgraph = quantize(graph, calib, QuantConfig(bits=max(plan.bits.values())), plan, log=lambda m: None)
        built = time.perf_counter() - start
        log(f"{name}: quantized in {built:.0f}s; {len(wide_tensors(graph)) + len(plan.activation_bits)} int16 tensors")
        embed, executor = lowbit_embed(graph, qgraph, check, args.threads, folder)
        contenders.append(Contender(name, embed, built, timed=False))
        if timed and not args.no_latency:
            contenders.append(Contender(f"{name}, TVM", tvm_embed(qgraph, check), timed=True, evaluate=False,
                                        batch=1))
            contenders.append(Contender(f"{name}, TVM batch 8", tvm_embed(qgraph, check, 8), timed=True,
                                        evaluate=False, batch=8))

    if args.latency_only:
        header = [f"- Command: `python benchmarks/{Path(__file__).name} {shlex.join(argv or sys.argv[1:])}`",
                  f"- Date: {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC; machine: {cpu_info()[0]}, "
                  f"{args.threads} threads; lowbit {lowbit_revision()}; seq {SEQ_LEN}; the sentences are held-out "
                  "ones, repeated to fill the batch"]
        lines = ["## MiniLM-L6 latency (issue #13)", "", *header, *latency_lines(contenders, sets["heldout"], args)]
        write_section(args.out, "minilm_latency", "\n".join(lines))
        print("\n".join(lines))
        return
    for c in contenders:
        if c.evaluate:
            log(f"embedding the eval sets: {c.name}")
            c.outputs = {k: embed_all(c.embed, *v) for k, v in sets.items()}
    fp32 = contenders[0]
    lines = [
        "## MiniLM-L6 sentence embeddings (issue #13)", "",
        f"- Command: `python benchmarks/{Path(__file__).name} {shlex.join(argv or sys.argv[1:])}`".rstrip() + "",
        f"- Date: {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC; machine: {cpu_info()[0]}, {args.threads} threads; "
        f"lowbit {lowbit_revision()}; seq {SEQ_LEN}",
        f"- Calibration: {len(calib_ids)} news sentences (gensim lee_background); held-out: "
        f"{len(sets['heldout'][0])} movie-review sentences; lowbit's outputs from the {executor}.",
        "- Cosine: with FP32 PyTorch's embedding, mean [95% bootstrap over sentences] and the worst 1%. Spearman: "
        "against human scores; the difference with FP32 [95% bootstrap over Lee-50 documents / word pairs].", "",
        "| contender | held-out cosine | worst 1% | Lee-50 ρ | − FP32 | WordSim-353 ρ | − FP32 | build s |",
        "|---|---|---|---|---|---|---|---|"]
    for c in (c for c in contenders if c.evaluate):
        cos = row_cosines(fp32.outputs["heldout"], c.outputs["heldout"])
        interval = bootstrap_interval(cos)
        cells = [f"{cos.mean():.4f} [{interval.low:.4f}, {interval.high:.4f}]", f"{np.percentile(cos, 1):.4f}"]
        lee_rho = spearman(*_lee_sims(lee, c.outputs["lee50"]))
        d, ci = lee50_difference(c.outputs["lee50"], fp32.outputs["lee50"])
        cells += [f"{lee_rho:.4f}", fmt_diff(d, ci)]
        for name in (WORDSIM353,):
            pairs = read_word_pairs(name)
            index = {w: k for k, w in enumerate(words)}
            u = _unit(c.outputs["words"])
            rho = spearman((u[[index[w] for w in pairs.first]] * u[[index[w] for w in pairs.second]]).sum(1),
                           pairs.scores)
            d, ci = word_difference(name, c.outputs["words"], fp32.outputs["words"], words)
            cells += [f"{rho:.4f}", fmt_diff(d, ci)]
        cells.append("" if c.build_s is None else f"{c.build_s:.0f}")
        lines.append(f"| {c.name} | " + " | ".join(cells) + " |")

    if args.no_latency:
        lines += ["", "Latency not measured in this run (--no-latency)."]
    else:
        lines += latency_lines(contenders, sets["heldout"], args)
    write_section(args.out, "minilm", "\n".join(lines))
    print("\n".join(lines))


def latency_lines(contenders: list[Contender], heldout: tuple[np.ndarray, np.ndarray],
                  args: argparse.Namespace) -> list[str]:
    """Batch 1 and 8 latency of the timed contenders, interleaved in one run, as table rows."""
    lines = ["", "Latency, ms per call (min over rounds of the median), ratio to FP32 ONNX Runtime:", "",
             "| contender | batch 1 | ratio | batch 8 | ratio |", "|---|---|---|---|---|"]
    timed = [c for c in contenders if c.timed]
    results: dict[str, dict[int, float]] = {c.name: {} for c in timed}
    for batch in (1, 8):
        ids, mask = (np.ascontiguousarray(np.resize(a, (batch, SEQ_LEN))) for a in heldout)
        now = [c for c in timed if c.batch in (None, batch)]  # TVM builds have a static batch
        for c in now:
            c.predict = lambda _x, c=c, ids=ids, mask=mask: c.embed(ids, mask)
        log(f"latency at batch {batch}")
        measure_latency(now, ids, args.runs, args.rounds)
        for c in now:
            results[c.name][batch] = c.latency_ms
    base = results["FP32 ONNX Runtime"]

    def cell(ms: dict[int, float], batch: int) -> str:
        return f"{ms[batch]:.2f} | {ms[batch] / base[batch]:.2f}×" if batch in ms else "— | "

    for c in timed:
        lines.append(f"| {c.name} | {cell(results[c.name], 1)} | {cell(results[c.name], 8)} |")
    ort_int8 = [c.name for c in timed if c.name.startswith("ORT quantize")]
    lines.append("")
    for batch in (1, 8):
        best = min(ort_int8, key=lambda n: results[n][batch])
        ratios = ", ".join(f"{name.removesuffix(', TVM').removesuffix(f', TVM batch {batch}')} "
                           f"{ms[batch] / results[best][batch]:.2f}x" for name, ms in results.items()
                           if name.startswith("lowbit") and batch in ms)
        lines.append(f"- Batch {batch}, against ORT's best INT8 ({best}, {results[best][batch]:.2f} ms): {ratios}.")
    lines.append(f"- {ort_u8s8_exactness()}")
    return lines


def ort_u8s8_exactness(m: int = 128, k: int = 384, n: int = 384) -> str:
    """Whether ORT's U8S8 MatMulInteger (quantize_dynamic's and QDQ's integer product) is exact on this CPU: on
    x86 without VNNI, MLAS may sum u8 x s8 pairs with the saturating vpmaddubsw."""
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (m, k)).astype(np.uint8)
    b = rng.integers(-128, 128, (k, n)).astype(np.int8)
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("MatMulInteger", ["a", "b"], ["y"])], "u8s8",
        [onnx.helper.make_tensor_value_info("a", onnx.TensorProto.UINT8, [m, k])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.INT32, [m, n])],
        [onnx.numpy_helper.from_array(b, "b")])
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 13)])
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    wrong = np.mean(session.run(None, {"a": a})[0] != a.astype(np.int64) @ b.astype(np.int64))
    return (f"ORT's U8S8 MatMulInteger on this CPU, uniform random u8 x s8 [{m}, {k}] x [{k}, {n}]: "
            f"{wrong:.1%} of the int32 outputs differ from the exact product" + (
                " (pair sums saturated at int16: its INT8 speed here is that of an inexact product; lowbit's "
                "int8 GEMMs are exact, and --bits 7 gives the grid on which the same instruction is)" if wrong else ""))


def _lee_sims(lee: Lee50, emb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    i, j, human = lee.pairs()
    u = _unit(emb)
    return (u[i] * u[j]).sum(1), human


if __name__ == "__main__":
    main(sys.argv[1:])
