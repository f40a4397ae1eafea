"""`quantize(model, calib, config) -> Artifact`, and `Artifact.save(dir)`: the whole `lowbit quantize`.

    artifact = lowbit.quantize("zoo:small_cnn", calib=None, config=QuantConfig(bits=8))
    artifact.save("out/", target=None)   # export, evaluate, check, report; atomically

`save` refuses an artifact whose checks fail (a float tensor in model.int.onnx, or
model.int.onnx in ONNX Runtime or the TVM build differing from the reference executor):
it raises LowbitError naming the first difference, and leaves nothing behind, unless
`allow_mismatch`, which keeps it with a warning at the top of report.md.
"""

from __future__ import annotations

import json
import platform
import shutil
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from .. import __version__
from ..errors import LowbitError
from ..io import atomic_directory, write_json
from ..ir import QuantizedGraph
from ..models.zoo import ZOO_PREFIX
from ..quantizer.config import BitPlan, QuantConfig
from ..quantizer.recipe import Recipe, choose_recipe
from ..quantizer.smooth import SmoothReport
from ..runtime.tokenizer import TOKENIZER_FILE
from . import checks
from . import report as reports
from .artifact import ARTIFACT_FORMAT, ARTIFACT_VERSION, MANIFEST, file_hashes, sha256_file
from .data import Inputs
from .evaluate import evaluate
from .prepare import Data, Prepared, Source, prepare, smooth_prepared
from .progress import Progress
from .search import SearchOptions, SearchResult, run_search, write_search


@dataclass
class Artifact:
    """A quantized model with everything its artifact directory is made from; `save` writes it."""

    prepared: Prepared
    qgraph: QuantizedGraph
    config: QuantConfig
    recipe: Recipe  # what the config's `auto` parts resolved to, and the measurements behind it
    plan_file: Path | None = None  # the plan.json it was quantized with, recorded in the manifest
    search: SearchResult | None = None  # the search that chose the plan (`max_drop`), written to search/
    smoothing: SmoothReport | None = None  # SmoothQuant's groups and outlier ratios (`config.smooth`)

    def save(self, directory: str | Path, *, target: str | None = None, tune_trials: int | None = None,
             tuning_cache: Path | None = None, onnx_weights: str = "auto", force: bool = False,
             allow_mismatch: bool = False, progress: Progress | None = None, rpc: Any = None) -> dict[str, Any]:
        """Export, evaluate, compile (with a TVM `target`) and check into `directory`, atomically; returns the report.

        With `rpc` (a `codegen.tvm.remote.RpcTarget`), the compiled model is checked and timed on a remote device
        (and tuning measures there); `target` then describes that device.

        Either the complete directory appears or nothing does (with `force`, an existing one is replaced
        only once the new one is complete). A failed check raises LowbitError unless `allow_mismatch`.
        """
        directory = Path(directory)
        progress = progress or Progress()
        options = _SaveOptions(target, tune_trials, tuning_cache, onnx_weights, allow_mismatch, rpc)
        try:
            with atomic_directory(directory, force) as tmp:
                report = _write_artifact(tmp, self, options, progress)
        except OSError as e:  # a full disk or a vanished folder: say which artifact, not a traceback
            raise LowbitError(f"{directory}: cannot write the artifact ({e}); nothing was written") from e
        size = report["size"]
        sizes = f"{reports.fmt_bytes(size['fp32_bytes'])} -> {reports.fmt_bytes(size['quantized_bytes'])}"
        progress.echo("done", f"wrote {directory} in {progress.elapsed():.1f}s; layer weights {sizes}")
        return report


@dataclass(frozen=True)
class _SaveOptions:
    target: str | None
    tune_trials: int | None
    tuning_cache: Path | None
    onnx_weights: str
    allow_mismatch: bool
    rpc: Any = None  # codegen.tvm.remote.RpcTarget: check, time (and tune) on a remote device


def quantize(model: str | Path, calib: Data | None = None, config: QuantConfig | None = None, *,
             heldout: Data | None = None, factory: str | None = None, plan: BitPlan | Path | None = None,
             max_drop: float | None = None, progress: Progress | None = None, seq_len: int | None = None) -> Artifact:
    """Quantize MODEL (zoo:NAME, a .pt2, TorchScript, a state dict with `factory`, or a Hugging Face-style
    directory of a BERT-family text encoder) to integers.

    `calib`/`heldout`: an image folder, a .npy/.npz, or an (N, C, H, W) float array; for a text model a text
    file with one sentence per line, or a list of sentences; None for a zoo model's own sets (held-out data
    defaults to the last 20% of `calib` otherwise). `seq_len`: a text model's static sequence length (default
    128, or the model's maximum if smaller; longer sentences are truncated with a warning). `plan`: weight
    bits per layer (a BitPlan, or a plan.json from `lowbit search`); default `config.bits` everywhere.
    `max_drop` (a fraction, e.g. 0.005) instead keeps activation tensors at 16 bits where they pay: a search
    (`lowbit search --bits B --wide-activations --max-drop`) finds the plan with the fewest extra BOPs whose
    measured top-1 agreement is at most `max_drop` below the plan with every such tensor at 16 bits.
    """
    from ..quantizer.quantize import check_lowerable
    from ..quantizer.quantize import quantize as quantize_graph

    config = config or QuantConfig()
    progress = progress or Progress()
    if max_drop is not None and plan is not None:
        raise LowbitError("--max-drop searches for the plan itself: give --plan or --max-drop, not both")
    plan_file = Path(plan) if isinstance(plan, str | Path) else None
    bit_plan = BitPlan.load(plan_file) if plan_file else plan  # a bad plan fails before the slow part
    prepared = prepare(Source(str(model), calib, heldout, factory, config.seed, seq_len), progress)
    check_lowerable(prepared.graph)  # before the recipe's calibration passes, not after them
    if bit_plan is not None:
        try:
            bit_plan.validate(prepared.graph)
        except LowbitError as e:
            raise LowbitError(f"{plan_file or 'plan'}: {e}") from None
    prepared, smoothing = smooth_prepared(prepared, config.smooth, progress)
    config = replace(config, smooth=prepared.smooth)  # the report names what ran
    searched_with = json.loads(plan_file.read_text()).get("smooth") if plan_file else None  # read by BitPlan.load
    if searched_with is not None and searched_with != prepared.smooth:
        progress.echo("plan", f"warning: {plan_file} was searched with --smooth {searched_with}, this model is "
                              f"smoothed with {prepared.smooth}: its measured fidelity does not apply here")
    graph, calib = prepared.graph, prepared.calib.data  # one array, or a text model's arrays by input name
    found = None
    if max_drop is not None:
        options = SearchOptions(bits=(config.bits,), max_drop=max_drop, wide_activations=True, frontier_points=0)
        found = run_search(prepared, options, progress, config)
        bit_plan = found.plan
    bit_plan = bit_plan or BitPlan.uniform(graph, config.bits)
    with progress.stage("recipe"), progress.steps_of("recipe") as log:
        recipe = choose_recipe(graph, calib, config, bit_plan, log)
    progress.echo("recipe", f"{recipe.describe(len(graph.layers))} ({_why(recipe)}, "
                            f"{progress.timings['recipe']:.1f}s)")
    before = dict(progress.steps)  # the recipe's steps (its calibration passes too) are not this stage's
    with progress.stage("quantize"), progress.steps_of("quantize") as log:
        qgraph = quantize_graph(graph, calib, config, bit_plan, log=log, recipe=recipe)
    steps = ", ".join(f"{kind} {seconds - before.get(kind, 0.0):.1f}s" for kind, seconds in progress.steps.items()
                      if seconds > before.get(kind, 0.0))
    weights = reports.bits_summary(qgraph.bit_plan()) if plan is not None else f"{config.bits}-bit weights"
    progress.echo("quantize", f"{weights} ({progress.timings['quantize']:.1f}s: {steps})")
    return Artifact(prepared, qgraph, config, recipe, plan_file, found, smoothing)


def _why(recipe: Recipe) -> str:
    evidence = recipe.evidence
    if evidence["chosen_by"] != "validation":
        return f"chosen by {evidence['chosen_by']}"
    return (f"chosen by {evidence['metric']} on {evidence['validation_samples']} validation samples, "
            f"fitted on {evidence['fit_samples']}")


def _refuse_or_note(problem: str, mismatches: list[str], options: _SaveOptions) -> None:
    """A failed check: an error (the atomic directory then leaves nothing), or with --allow-mismatch a warning."""
    if not options.allow_mismatch:
        raise LowbitError(f"{problem}; nothing was written (pass --allow-mismatch to keep the artifact for "
                          "debugging, and please report this model)")
    mismatches.append(problem)


def _write_artifact(directory: Path, artifact: Artifact, options: _SaveOptions, progress: Progress) -> dict[str, Any]:
    """Export, evaluate, check and describe the quantized model in `directory`; returns the report."""
    import onnx

    from ..codegen.onnx import export_integer, export_qdq
    from ..codegen.onnx.check import float_tensors_between

    prepared, qgraph = artifact.prepared, artifact.qgraph
    mismatches: list[str] = []
    with progress.stage("export"):
        saturation_safe = export_qdq(qgraph, directory / "model.onnx", weights=options.onnx_weights)
        export_integer(qgraph, directory / "model.int.onnx")
        qgraph.save(directory / "ir")
        if prepared.text is not None:  # the runtime's `encode` tokenizes with it
            shutil.copyfile(prepared.text.tokenizer, directory / TOKENIZER_FILE)
        integer_leaks = float_tensors_between(onnx.load(str(directory / "model.int.onnx")))
    qdq_weights = "saturation-safe" if saturation_safe else "int8"
    progress.echo("export", f"model.onnx (QDQ, {qdq_weights} weights), model.int.onnx (integer-only), ir/ "
                            f"({progress.timings['export']:.1f}s)")
    if integer_leaks:
        _refuse_or_note(f"model.int.onnx has float tensors inside: {', '.join(integer_leaks)}", mismatches, options)

    report, reference, reference_ints = evaluate(prepared, qgraph, artifact.config, progress)
    recipe = artifact.recipe
    report["recipe"] = recipe.to_json()
    if artifact.smoothing is not None:
        report["smoothing"] = artifact.smoothing.to_json()
    report["calibration"]["method"] = recipe.calib_method
    for row in report["layers"]:
        row["rounding"] = "gptq" if row["name"] in recipe.gptq_layers else "nearest"
    if prepared.text is not None:
        inputs = checks.text_check_inputs(prepared.heldout.feed(list(qgraph.inputs)), prepared.text.vocab_size,
                                          prepared.text.seq_len, artifact.config.seed)
    else:
        inputs = checks.check_inputs(tuple(qgraph.values[qgraph.inputs[0]].shape), prepared.heldout.x,
                                     artifact.config.seed)
    with progress.stage("check: reference"):
        # the check's held-out inputs come first, and the evaluation ran the reference on them already
        want = checks.reference_integers(qgraph, inputs.data,
                                         first={k: v[:inputs.heldout] for k, v in reference_ints.items()})
    with progress.stage("onnxruntime"):
        got = checks.onnx_integers(directory / "model.int.onnx", qgraph, inputs.data)
        int_check = checks.compare("ONNX Runtime", got, want, inputs)
        report["onnxruntime"] = {"model.int.onnx": int_check,
                                 "model.onnx": reports.qdq_check(directory, qgraph, prepared.heldout.data,
                                                                 reference, photos=prepared.heldout.photos,
                                                                 embedding=prepared.graph.is_embedding(
                                                                     prepared.graph.outputs[0]))}
    exact = int_check["bit_exact"]
    progress.echo("onnxruntime", f"model.int.onnx {'is' if exact else 'is NOT'} bit-exact with the reference on "
                                 f"{inputs.describe()} ({progress.timings['onnxruntime']:.1f}s)")
    if not exact:
        problem = checks.failure_message("model.int.onnx in ONNX Runtime", int_check, inputs)
        _refuse_or_note(problem, mismatches, options)

    if options.target is not None:
        progress.echo("compile", f"TVM, target {options.target}")
        with progress.stage("compile"):
            report["tvm"] = checks.compile_and_check(qgraph, directory, options.target, inputs,
                                                     lambda m: progress.echo("compile", m), want,
                                                     options.tune_trials, options.tuning_cache, options.rpc)
        t = report["tvm"]
        progress.echo("compile", f"{t['target']}: {'bit-exact' if t['bit_exact'] else 'NOT bit-exact'} with the "
                                 f"reference on {inputs.describe()}, {t['latency_ms']:.2f} ms at batch 1 "
                                 f"({progress.timings['compile']:.1f}s)")
        if not t["bit_exact"]:
            _refuse_or_note(checks.failure_message("the TVM-compiled model", t, inputs), mismatches, options)
    found = artifact.search
    if found is not None:
        (directory / "search").mkdir()
        write_search(directory / "search", found)
        report["search"] = {"max_drop": found.summary["max_drop"], "directory": "search",
                            "chosen": {"costs": found.chosen.costs, "measured": found.chosen.measured}}
        report["activation_costs"] = found.activation_costs
    report["mismatches"] = mismatches
    report["onnx_weights"] = {"requested": options.onnx_weights, "stored": qdq_weights}
    report["integer_only"] = not integer_leaks
    report["float_tensors_in_int_model"] = integer_leaks
    report["timings"] = {"stages": dict(progress.timings), "steps": dict(progress.steps),
                         "total_s": progress.elapsed()}
    reports.write_reports(directory, report)
    # Written last, so that it can list the hash of every other file.
    write_json(directory / MANIFEST, _manifest(directory, artifact, report))
    return report


def _manifest(directory: Path, artifact: Artifact, report: dict[str, Any]) -> dict[str, Any]:
    prepared, qgraph = artifact.prepared, artifact.qgraph
    return {
        "format": ARTIFACT_FORMAT,
        "format_version": ARTIFACT_VERSION,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "versions": _versions(),
        "model": _model_description(prepared),
        "config": artifact.config.to_json(),
        "calibration": _data_summary(prepared.calib),
        "heldout": _data_summary(prepared.heldout),
        "text": None if prepared.text is None else prepared.text.to_json(),
        **_interface(qgraph),
        "bit_plan": qgraph.bit_plan(),
        "activation_bits": qgraph.wide_activations(),
        "tvm": report.get("tvm"),
        "plan_file": None if artifact.plan_file is None else {"path": str(artifact.plan_file.resolve()),
                                                              "sha256": sha256_file(artifact.plan_file)},
        "files": file_hashes(directory),
    }


def _versions() -> dict[str, str]:
    found = {"lowbit": __version__, "python": platform.python_version()}
    for package in ("torch", "onnx", "onnxruntime", "numpy"):
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            found[package] = "not installed"
    return found


def _model_description(prepared: Prepared) -> dict[str, Any]:
    source = prepared.source
    described: dict[str, Any] = {"spec": source.model, "factory": source.factory, "name": prepared.graph.name}
    path = Path(source.model)
    if not source.model.startswith(ZOO_PREFIX) and path.is_file():
        described.update(file=str(path.resolve()), sha256=sha256_file(path), bytes=path.stat().st_size)
    if prepared.text is not None:
        files = sorted(p for p in prepared.text.directory.iterdir() if p.is_file() and p.suffix in (".json",
                                                                                                    ".safetensors"))
        described.update(directory=str(prepared.text.directory.resolve()),
                         files={p.name: {"sha256": sha256_file(p), "bytes": p.stat().st_size} for p in files})
    return described


def _symbolic(shape: tuple[int, ...]) -> list[Any]:
    return ["N", *shape[1:]]


def _interface(qgraph: QuantizedGraph) -> dict[str, Any]:
    """Inputs and outputs of the exported models, with a symbolic batch dimension "N". A float input is quantized
    on entry (its grid is listed); an integer one (a text model's token ids and mask) is read as it is."""
    inputs = []
    for name in qgraph.inputs:
        value = qgraph.values[name]
        described = {"name": name, "dtype": value.dtype, "shape": _symbolic(value.shape)}
        quantize_op = next((o for o in qgraph.ops if o.op == "quantize" and o.inputs[0] == name), None)
        if quantize_op is not None:
            q = qgraph.values[quantize_op.output]
            described["quantization"] = {"dtype": q.dtype, "scale": q.scale, "zero_point": q.zero_point}
        inputs.append(described)
    outputs = [{"name": name, "dtype": "float32", "shape": _symbolic(qgraph.values[name].shape)}
               for name in qgraph.outputs]
    integer_outputs = []
    for name in qgraph.int_outputs:
        v = qgraph.values[name]
        # Per-channel scales (one per class for logits) would swamp the manifest; ir/ir.json has them.
        scale = {"scale": v.scale} if v.axis is None else {"scale": None, "per_channel_axis": v.axis,
                                                            "scales_in": "ir/ir.json"}
        integer_outputs.append({"name": name, "dtype": v.dtype, "shape": _symbolic(v.shape),
                                "zero_point": v.zero_point, **scale})
    return {"inputs": inputs, "outputs": outputs, "integer_outputs": integer_outputs}


def _data_summary(inputs: Inputs) -> dict[str, Any]:
    return {"samples": len(inputs), "source": inputs.source, "sha256": inputs.digest()}


