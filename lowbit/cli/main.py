"""The `lowbit` command line (and its `quantize` shortcut).

`lowbit quantize MODEL -o DIR` runs load -> capture -> quantize -> export -> evaluate
and writes one artifact directory, atomically: either the complete DIR appears or
nothing does.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import platform
import random
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any, TypeVar

import click
import numpy as np
import torch

from .. import __version__
from ..codegen.onnx import ONNX_WEIGHTS
from ..errors import LowbitError
from ..ir import QuantizedGraph
from ..models.zoo import ZOO_PREFIX, ZooEntry, get_zoo_entry
from ..quantizer.calibrate import METHODS
from ..quantizer.config import BitPlan, QuantConfig
from ..quantizer.graph import Graph
from . import report as reports
from .artifact import (
    ARTIFACT_FORMAT,
    ARTIFACT_VERSION,
    MANIFEST,
    atomic_directory,
    check_output_dir,
    file_hashes,
    sha256_file,
    write_json,
)
from .data import (
    Inputs,
    check_disjoint,
    check_input_shape,
    imagenet_preprocess_for,
    is_array_file,
    load_inputs,
    split_heldout,
)
from .options import tuning_options
from .progress import Progress

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as shells report it

F = TypeVar("F", bound=Callable[..., Any])
# Option defaults follow the quantizer's own, so the CLI never silently overrides them.
DEFAULTS = QuantConfig()


def user_errors(fn: F) -> F:
    """Report `LowbitError` as `error: ...` (exit 2) and Ctrl-C as exit 130, without a traceback."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        ctx = click.get_current_context()
        try:
            return fn(*args, **kwargs)
        except LowbitError as e:
            click.echo(f"error: {e}", err=True)
            ctx.exit(EXIT_USER_ERROR)
        except KeyboardInterrupt:
            click.echo("\ninterrupted; nothing was written", err=True)
            ctx.exit(EXIT_INTERRUPTED)

    return wrapper  # type: ignore[return-value]


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="lowbit")
def lowbit() -> None:
    """lowbit: post-training quantization compiler (integer-only graphs, ONNX export)."""


@dataclass(frozen=True)
class QuantizeRequest:
    """Everything `lowbit quantize` was asked to do."""

    model: str
    output: Path
    calib: Path | None
    eval: Path | None
    factory: str | None
    config: QuantConfig
    force: bool = False
    plan: Path | None = None  # a plan.json from `lowbit search`
    target: str | None = None  # TVM target; None: no compiled model
    tune_trials: int | None = None  # MetaSchedule trials for the compiled model
    tuning_cache: Path | None = None
    onnx_weights: str = "auto"  # how model.onnx stores weights: onnx_export.ONNX_WEIGHTS


@click.command("quantize")
@click.argument("model")
@click.option("-o", "--output", "output", required=True, type=click.Path(path_type=Path),
              help="Artifact directory to create (must not exist unless --force).")
@click.option("--calib", type=click.Path(path_type=Path),
              help="Calibration data: an image folder, or a preprocessed (N, C, H, W) float .npy/.npz. "
                   "Default for zoo models: the zoo's calibration set.")
@click.option("--eval", "eval_path", type=click.Path(path_type=Path),
              help="Held-out data for the report (same formats). Default: the zoo's held-out set, "
                   "else the last 20% of the calibration data.")
@click.option("--factory", metavar="MODULE:FUNCTION",
              help="Builds the model for a state-dict MODEL (.safetensors/.pt).")
@click.option("--bits", type=int, default=DEFAULTS.bits, show_default=True,
              help="Weight bit-width of every layer (4 or 8), unless --plan gives one per layer.")
@click.option("--plan", "plan_path", type=click.Path(path_type=Path),
              help="A bit plan (plan.json from `lowbit search`): weight bits per layer.")
@click.option("--calib-method", type=click.Choice(METHODS), default=DEFAULTS.calib_method, show_default=True,
              help="How activation ranges are chosen.")
@click.option("--seed", type=int, default=0, show_default=True,
              help="Seeds numpy/torch and the zoo data; the same seed gives the same model.int.onnx.")
@click.option("--target", help='Compile with TVM for this target, e.g. "llvm -mcpu=native" (the default when TVM is '
                               'installed); "none" skips compiling.')
@tuning_options
@click.option("--onnx-weights", type=click.Choice(ONNX_WEIGHTS), default="auto", show_default=True,
              help="How model.onnx stores weights for ONNX Runtime. int8: its fast u8 x s8 kernels, exact on x86 "
                   "CPUs with VNNI and on ARM, but they may saturate on older x86 CPUs; safe: weights above 64 in "
                   "magnitude as uint8, exact everywhere and about half as fast; auto: int8 if this CPU is exact "
                   "with it. Pick safe when model.onnx will run on x86 CPUs without VNNI.")
@click.option("--force", is_flag=True, help="Replace an existing output directory (once the new one is done).")
@user_errors
def quantize_command(model: str, output: Path, calib: Path | None, eval_path: Path | None, factory: str | None,
                     bits: int, plan_path: Path | None, calib_method: str, seed: int, target: str | None,
                     tune_trials: int | None, tuning_cache: Path | None, onnx_weights: str, force: bool) -> None:
    """Quantize MODEL to integers and write an artifact directory.

    MODEL is zoo:NAME, a torch.export program (.pt2), a TorchScript file, or a
    state dict (.safetensors or .pt) with --factory.
    """
    config = QuantConfig(bits=bits, calib_method=calib_method, seed=seed)
    request = QuantizeRequest(model, output, calib, eval_path, factory, config, force, plan_path,
                              resolve_target(target), tune_trials, tuning_cache, onnx_weights)
    if tune_trials is not None and request.target is None:
        raise LowbitError("--tune-trials needs a compile target (TVM installed, and not --target none)")
    run_quantize(request, Progress())


def resolve_target(target: str | None) -> str | None:
    """The TVM target to compile for: the native CPU by default when TVM is installed, none with "none"."""
    from .compile import tvm_available

    if target is not None and target.strip().lower() == "none":
        return None
    if not tvm_available():
        if target is not None:
            raise LowbitError(f"--target {target!r}: TVM is not installed (pip install 'lowbit[tvm]'), or pass "
                              "--target none")
        return None
    from ..codegen.tvm.target import DEFAULT_TARGET, parse_target

    parse_target(target or DEFAULT_TARGET)  # a bad target fails before the slow part
    return target or DEFAULT_TARGET


lowbit.add_command(quantize_command)


def main() -> None:
    """Console script `lowbit`."""
    lowbit(prog_name="lowbit")


def quantize_main() -> None:
    """Console script `quantize`: the same as `lowbit quantize`."""
    quantize_command(prog_name="quantize")


# -- the pipeline ----------------------------------------------------------------------------------------------------

def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def program_input_shape(program: torch.export.ExportedProgram) -> tuple[int, ...] | None:
    """The static shape of the program's first user input, if it has one."""
    user_inputs = set(program.graph_signature.user_inputs)
    for node in program.graph.nodes:
        if node.op == "placeholder" and node.name in user_inputs:
            try:
                return tuple(int(s) for s in node.meta["val"].shape)
            except (KeyError, TypeError, ValueError):  # dynamic dimensions
                return None
    return None


def _read_data(path: Path, what: str, entry: ZooEntry | None, shape: tuple[int, ...] | None) -> Inputs:
    preprocess = None
    if path.is_dir():
        if entry is not None and entry.preprocess is not None:
            preprocess = entry.preprocess
        elif shape is not None:
            preprocess = imagenet_preprocess_for(shape, str(path))
    return load_inputs(path, preprocess, what)


def load_data(request: QuantizeRequest, entry: ZooEntry | None,
              shape: tuple[int, ...] | None) -> tuple[Inputs, Inputs]:
    """Calibration and held-out inputs, disjoint; `shape` (when known) sizes images from folders."""
    if entry is not None:
        shape = shape or entry.input_shape
    user = {what: path for what, path in (("calibration", request.calib), ("held-out", request.eval)) if path}
    loaded: dict[str, Inputs] = {}
    # Arrays first: a folder of images for a non-zoo model takes its size from them.
    for what, path in sorted(user.items(), key=lambda item: not is_array_file(item[1])):
        loaded[what] = _read_data(path, what, entry, shape)
        shape = shape or (1, *loaded[what].x.shape[1:])

    seed = request.config.seed
    if "calibration" in loaded:
        calib = loaded["calibration"]
    elif entry is not None:
        calib = Inputs(entry.calibration(seed), f"{ZOO_PREFIX}{entry.name} calibration set, seed {seed}")
    else:
        raise LowbitError(f"{request.model}: calibration data is needed for a model outside the zoo: "
                          "pass --calib (an image folder, .npy or .npz)")
    if "held-out" in loaded:
        heldout = loaded["held-out"]
    elif entry is not None:
        heldout = Inputs(entry.heldout(seed), f"{ZOO_PREFIX}{entry.name} held-out set, seed {seed}")
    else:
        return split_heldout(calib)
    if request.calib is not None and request.eval is not None and request.calib.resolve() == request.eval.resolve():
        raise LowbitError(f"--calib and --eval are the same ({request.eval}); held-out data must be disjoint "
                          "from calibration")
    check_disjoint(calib, heldout)
    return calib, heldout


def _versions() -> dict[str, str]:
    found = {"lowbit": __version__, "python": platform.python_version()}
    for package in ("torch", "onnx", "onnxruntime", "numpy"):
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            found[package] = "not installed"
    return found


def _model_description(request: QuantizeRequest, graph: Graph) -> dict[str, Any]:
    described: dict[str, Any] = {"spec": request.model, "factory": request.factory, "name": graph.name}
    path = Path(request.model)
    if not request.model.startswith(ZOO_PREFIX) and path.is_file():
        described.update(file=str(path.resolve()), sha256=sha256_file(path), bytes=path.stat().st_size)
    return described


def _symbolic(shape: tuple[int, ...]) -> list[Any]:
    return ["N", *shape[1:]]


def _interface(qgraph: QuantizedGraph) -> dict[str, Any]:
    """Inputs and outputs of the exported models: float32, symbolic batch dimension "N"."""
    inputs = []
    for name in qgraph.inputs:
        quantize_op = next(o for o in qgraph.ops if o.op == "quantize" and o.inputs[0] == name)
        q = qgraph.values[quantize_op.output]
        inputs.append({"name": name, "dtype": "float32", "shape": _symbolic(qgraph.values[name].shape),
                       "quantization": {"dtype": q.dtype, "scale": q.scale, "zero_point": q.zero_point}})
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


def _samples(n: int, noun: str = "sample") -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def _data_summary(inputs: Inputs) -> dict[str, Any]:
    return {"samples": len(inputs), "source": inputs.source,
            "sha256": hashlib.sha256(np.ascontiguousarray(inputs.x).tobytes()).hexdigest()}


@dataclass
class Prepared:
    """A captured model with its calibration and held-out data: what every command starts from."""

    graph: Graph
    calib: Inputs
    heldout: Inputs
    entry: ZooEntry | None


def prepare(request: QuantizeRequest, progress: Progress) -> Prepared:
    """Load data and model, and capture the float graph (shared by quantize, sensitivity and search)."""
    from ..quantizer.capture import capture
    from ..quantizer.quantize import check_calibration_data

    check_output_dir(request.output, request.force)  # fail before the slow part, not after it
    seed_everything(request.config.seed)
    spec = request.model
    entry = get_zoo_entry(spec) if spec.startswith(ZOO_PREFIX) else None
    if entry is None and request.calib is None:
        raise LowbitError(f"{spec}: calibration data is needed for a model outside the zoo: pass --calib "
                          "(an image folder, or a preprocessed .npy/.npz of shape (N, C, H, W))")

    # Data first, so bad data fails fast. A .pt2 program is loaded first only when an image folder must
    # be resized to its input; other non-zoo models are traced with an input shaped like the data.
    program = None
    if entry is None and Path(spec).suffix == ".pt2" and any(p and p.is_dir() for p in (request.calib, request.eval)):
        program = _load(spec, None, request.factory, progress)

    with progress.stage("data"):
        calib, heldout = load_data(request, entry, program_input_shape(program) if program else None)
    progress.echo("data", f"calibration: {_samples(len(calib))}, {calib.source}")
    progress.echo("data", f"held-out: {_samples(len(heldout))}, {heldout.source}")

    if program is None:
        example = None if entry is not None else torch.zeros((1, *calib.x.shape[1:]))
        program = _load(spec, example, request.factory, progress)

    with progress.stage("capture"):
        graph = capture(program, entry.name if entry else Path(spec).stem)
        check_calibration_data(graph, calib.x, calib.source)
        check_input_shape(heldout.x, graph.node(graph.inputs[0]).shape, heldout.source)
    s = graph.summary()
    progress.echo("capture", f"{s['nodes']} nodes, {s['layers']} quantizable layers, "
                             f"{reports.fmt_count(s['macs'])} MACs, {reports.fmt_count(s['params'])} parameters "
                             f"({progress.timings['capture']:.1f}s)")
    return Prepared(graph, calib, heldout, entry)


def run_quantize(request: QuantizeRequest, progress: Progress) -> Path:
    """The whole `lowbit quantize` pipeline; returns the artifact directory."""
    from ..quantizer.quantize import quantize

    plan = BitPlan.load(request.plan) if request.plan else None  # a bad plan fails before the slow part
    prepared = prepare(request, progress)
    graph, calib, heldout, entry = prepared.graph, prepared.calib, prepared.heldout, prepared.entry
    config = request.config
    if plan is not None:
        try:
            plan.validate(graph)
        except LowbitError as e:
            raise LowbitError(f"{request.plan}: {e}") from None
    with progress.stage("quantize"), progress.steps_of("quantize") as log:
        qgraph = quantize(graph, calib.x, config, plan, log=log)
    steps = ", ".join(f"{kind} {seconds:.1f}s" for kind, seconds in progress.steps.items())
    weights = reports.bits_summary(qgraph.bit_plan()) if plan else f"{config.bits}-bit weights"
    progress.echo("quantize", f"{weights}, {config.calib_method} activation ranges "
                              f"({progress.timings['quantize']:.1f}s: {steps})")

    with atomic_directory(request.output, request.force) as tmp:
        report = write_artifact(tmp, request, graph, qgraph, calib, heldout, entry, progress)
    size = report["size"]
    progress.echo("done", f"wrote {request.output} in {progress.elapsed():.1f}s; layer weights "
                          f"{reports.fmt_bytes(size['fp32_bytes'])} -> {reports.fmt_bytes(size['quantized_bytes'])}")
    return request.output


def write_artifact(directory: Path, request: QuantizeRequest, graph: Graph, qgraph: QuantizedGraph, calib: Inputs,
                   heldout: Inputs, entry: ZooEntry | None, progress: Progress) -> dict[str, Any]:
    """Export, evaluate and describe the quantized model in `directory`; returns the report."""
    from ..codegen.onnx import export_integer, export_qdq

    with progress.stage("export"):
        saturation_safe = export_qdq(qgraph, directory / "model.onnx", weights=request.onnx_weights)
        export_integer(qgraph, directory / "model.int.onnx")
        qgraph.save(directory / "ir")
        integer_leaks = _float_tensors_in(directory / "model.int.onnx")
    qdq_weights = "saturation-safe" if saturation_safe else "int8"
    progress.echo("export", f"model.onnx (QDQ, {qdq_weights} weights), model.int.onnx (integer-only), ir/ "
                            f"({progress.timings['export']:.1f}s)")
    if integer_leaks:
        progress.echo("export", f"warning: model.int.onnx has float tensors inside: {', '.join(integer_leaks)}")

    report, reference = evaluate(request, graph, qgraph, calib, heldout, entry, directory, progress)
    if request.target is not None:
        from .compile import compile_and_check

        progress.echo("compile", f"TVM, target {request.target}")
        with progress.stage("compile"):
            report["tvm"] = compile_and_check(qgraph, directory, request.target, heldout.x,
                                              lambda m: progress.echo("compile", m), reference,
                                              request.tune_trials, request.tuning_cache)
        t = report["tvm"]
        latency = f", {t['latency_ms']:.2f} ms at batch 1"
        progress.echo("compile", f"{t['target']}: {'bit-exact' if t['bit_exact'] else 'NOT bit-exact'} with the "
                                 f"reference on {_samples(t['samples'])}{latency} ({progress.timings['compile']:.1f}s)")
        if not t["bit_exact"]:
            report["notes"].append("the TVM-compiled model does not match the reference executor bit for bit")
    report["onnx_weights"] = {"requested": request.onnx_weights, "stored": qdq_weights}
    report["integer_only"] = not integer_leaks
    report["float_tensors_in_int_model"] = integer_leaks
    report["timings"] = {"stages": dict(progress.timings), "steps": dict(progress.steps),
                         "total_s": progress.elapsed()}
    reports.write_reports(directory, report)
    # Written last, so that it can list the hash of every other file.
    write_json(directory / MANIFEST, {
        "format": ARTIFACT_FORMAT,
        "format_version": ARTIFACT_VERSION,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "versions": _versions(),
        "model": _model_description(request, graph),
        "config": request.config.to_json(),
        "calibration": _data_summary(calib),
        "heldout": _data_summary(heldout),
        **_interface(qgraph),
        "bit_plan": qgraph.bit_plan(),
        "tvm": report.get("tvm"),
        "plan_file": None if request.plan is None else {"path": str(request.plan.resolve()),
                                                        "sha256": sha256_file(request.plan)},
        "files": file_hashes(directory),
    })
    return report


@contextmanager
def _quiet_torch() -> Iterator[None]:
    """Hide torch's tracing chatter (warnings and log lines about specialized dims) from the progress log."""
    loggers = [logging.getLogger(name) for name in ("torch._export", "torch.export", "torch._dynamo")]
    levels = [lg.level for lg in loggers]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        try:
            yield
        finally:
            for lg, level in zip(loggers, levels, strict=True):
                lg.setLevel(level)


def _load(spec: str, example: torch.Tensor | None, factory: str | None,
          progress: Progress) -> torch.export.ExportedProgram:
    from ..models.loading import load_program

    progress.echo("load", f"{spec}{f' (--factory {factory})' if factory else ''}")
    with progress.stage("load"), _quiet_torch():
        program = load_program(spec, example, factory)
    progress.echo("load", f"exported program ready ({progress.timings['load']:.1f}s)")
    return program


def _float_tensors_in(path: Path) -> list[str]:
    import onnx

    from ..codegen.onnx.check import float_tensors_between

    return float_tensors_between(onnx.load(str(path)))


def evaluate(request: QuantizeRequest, graph: Graph, qgraph: QuantizedGraph, calib: Inputs, heldout: Inputs,
             entry: ZooEntry | None, directory: Path, progress: Progress) -> tuple[dict[str, Any], reports.Outputs]:
    """Everything report.json says about fidelity, size and the layers (timings are added by the caller).

    Also returns the reference executor's outputs on the held-out inputs, for the backends' checks.
    """
    progress.echo("evaluate", f"FP32 and per-layer fake-quant on {_samples(len(heldout), 'held-out sample')}")
    with progress.stage("evaluate: fp32 + per-layer"):
        fp32, layer_sqnr = reports.float_outputs_and_layer_sqnr(graph, qgraph, heldout.x)
    progress.echo("evaluate", f"INT8 reference executor on {_samples(len(heldout), 'held-out sample')}")
    with progress.stage("evaluate: int8 reference"):
        int8 = reports.reference_outputs(qgraph, heldout.x)
    per_output = {o: reports.output_fidelity(fp32[o], int8[o]) for o in graph.outputs}
    fidelity = {"output": graph.outputs[0], **per_output[graph.outputs[0]], "per_output": per_output}
    t = progress.timings
    progress.echo("evaluate", f"top-1 agreement {reports.fmt_pct(fidelity['top1_agreement'])}, output SQNR "
                              f"{reports.fmt_db(fidelity['sqnr_db'])} (FP32 {t['evaluate: fp32 + per-layer']:.1f}s, "
                              f"reference {t['evaluate: int8 reference']:.1f}s)")

    notes = []
    labelled = None
    if entry is not None and entry.labelled is not None:
        with progress.stage("evaluate: labelled"):
            try:
                x, labels = entry.labelled()
            except (ImportError, OSError) as e:  # optional data package missing
                notes.append(f"labelled evaluation skipped: {e}")
            else:
                labelled = reports.labelled_scores(graph, qgraph, x, labels, f"{ZOO_PREFIX}{entry.name} labelled set")
        if labelled:
            progress.echo("evaluate", f"labelled top-1: FP32 {reports.fmt_pct(labelled['top1_fp32'])}, "
                                      f"INT8 {reports.fmt_pct(labelled['top1_int8'])} ({labelled['samples']} images)")

    with progress.stage("onnxruntime"):
        ort_checks = reports.onnxruntime_checks(directory, qgraph, heldout.x, int8)
    exact = ort_checks["model.int.onnx"]["bit_exact"]
    samples = _samples(ort_checks["model.int.onnx"]["samples"])
    progress.echo("onnxruntime", f"model.int.onnx {'is' if exact else 'is NOT'} bit-exact with the reference on "
                                 f"{samples} ({progress.timings['onnxruntime']:.1f}s)")
    if not exact:
        notes.append("model.int.onnx does not match the reference executor bit for bit in ONNX Runtime")

    report = {
        "lowbit_version": __version__,
        "model": {"spec": request.model, **graph.summary()},
        "config": request.config.to_json(),
        "bit_plan": qgraph.bit_plan(),
        "calibration": {"method": request.config.calib_method, "samples": len(calib), "source": calib.source},
        "heldout": {"samples": len(heldout), "source": heldout.source},
        "fidelity": fidelity,
        "labelled": labelled,
        "onnxruntime": ort_checks,
        "size": reports.model_sizes(graph, qgraph),
        "per_layer_samples": min(len(heldout), reports.PER_LAYER_SAMPLES),
        "layers": reports.layer_rows(graph, qgraph, layer_sqnr),
        "notes": notes,
    }
    return report, int8


# The other commands register themselves on the group; imported last, as they use the above.
from . import compile as _compile_commands  # noqa: E402, F401
from . import search as _search_commands  # noqa: E402, F401
