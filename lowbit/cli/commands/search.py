"""`lowbit search MODEL --size 0.75x -o DIR`: per-layer bit-widths (plan.json, frontier.json/.png, report.md);
apply the plan with `lowbit quantize MODEL --plan DIR/plan.json -o OUT`."""

from __future__ import annotations

from pathlib import Path

import click
from click.core import ParameterSource

from ...errors import LowbitError
from ...io import check_output_dir
from ...ir.groupwise_weights import GroupWiseWeights
from ...pipeline.checks import tvm_available
from ...pipeline.decoder import is_decoder
from ...pipeline.decoder_search import search_decoder_model
from ...pipeline.prepare import Source
from ...pipeline.progress import Progress
from ...pipeline.search import LATENCY_SOURCES, SearchOptions, search, text_model_defaults
from ...quantizer.config import SUPPORTED_WEIGHT_BITS
from ...quantizer.smooth import parse_smooth
from ...search.decoder_search import DECODER_BITS
from ...search.ilp import DEFAULT_OBJECTIVE, OBJECTIVES
from ..options import (
    bit_list,
    fraction,
    model_and_data_options,
    rpc_options,
    rpc_target,
    seq_len_option,
    smooth_option,
    user_errors,
)

DECODER_SEARCH_OPTIONS = ("model", "output", "calib", "force", "size_budget", "latency_budget", "target", "bit_set")


@click.command("search")
@model_and_data_options
@click.option("--size", "size_budget", help="Weight-size budget: 0.75x (of all layers at the highest bit-width) "
                                            "or absolute, e.g. 2.5MB.")
@click.option("--bops", "bops_budget", help="BOPs budget: 0.6x or absolute, e.g. 150G.")
@click.option("--latency", "latency_budget", help="Latency budget: 0.8x or absolute, e.g. 3ms. For a text model, "
                                                  "0.8x is of the plan with every activation that may be 16-bit at "
                                                  "16 bits (else of uniform highest-bit weights, 8-bit activations).")
@click.option("--latency-table", type=click.Path(path_type=Path),
              help="Per-layer latency table (JSON) measured on the target; default: measure (--latency-source).")
@click.option("--latency-source", type=click.Choice(LATENCY_SOURCES), default="auto", show_default=True,
              help="Where to measure per-layer latency: TVM's kernels on this CPU (auto, when TVM is installed; it "
                   "times 4-bit layers for real), on the devices under --rpc-key (tvm-rpc; auto with "
                   "--rpc-tracker), or ONNX Runtime.")
@click.option("--target", help='TVM target the latency table is measured for (default "llvm -mcpu=native"; with '
                               '--rpc-tracker, describe the remote devices, e.g. "llvm -mcpu=cascadelake '
                               '-num-cores=4").')
@rpc_options
@click.option("--max-drop", help="Find the cheapest plan whose measured fidelity (top-1 agreement, or a text model's "
                                 "mean embedding cosine) is at most this much below the highest-precision plan's, "
                                 "e.g. 1%.")
@click.option("--bisect", type=click.Choice(["size", "bops", "latency"]),
              help="The cost --max-drop minimises. Default: the budget's, else latency for a text model, BOPs with "
                   "--wide-activations, else size.")
@click.option("--bits", "bit_set", help="Bit-widths a layer may take. Default 4,8; for a text model 8 (a 4-bit "
                                        "weight makes no GEMM faster on a CPU; its activations' width does).")
@seq_len_option(" `--sensitivity` must have been measured at the same length.")
@click.option("--sensitivity", "sensitivity_dir", type=click.Path(path_type=Path),
              help="Reuse a `lowbit sensitivity` output instead of measuring again.")
@click.option("--objective", type=click.Choice(list(OBJECTIVES)), default=DEFAULT_OBJECTIVE, show_default=True,
              help="What the ILP minimises: " + "; ".join(f"{k}: {v}" for k, v in OBJECTIVES.items())
                   + ". The default is the one that predicted held-out loss best (BENCHMARKS.md, cross_terms).")
@click.option("--wide-activations/--narrow-activations", default=None,
              help="Let the search keep activation tensors at 16 bits where the accuracy they buy is worth the time "
                   "(needs a --latency or --bops budget, or --max-drop; each such tensor runs its readers as two "
                   "8-bit passes). Default: on for a text model, off otherwise.")
@smooth_option(" The plans are measured on the smoothed graph, as `lowbit quantize --plan` will build it: give "
               "both the same --smooth.")
@click.option("--no-ties", is_flag=True, help="Let the layers feeding one residual add take different bit-widths.")
@click.option("--frontier-points", type=int, default=3, show_default=True,
              help="Budgets measured for the frontier, evenly spaced from the cheapest plan (plus the uniform plan).")
@click.option("--bisect-steps", type=int, default=5, show_default=True, help="Bisection steps for --max-drop.")
@user_errors
def search_command(model: str, output: Path, calib: Path | None, eval_path: Path | None, factory: str | None,
                   seed: int, force: bool, size_budget: str | None, bops_budget: str | None,
                   latency_budget: str | None, latency_table: Path | None, latency_source: str,
                   target: str | None, rpc_tracker: str | None, rpc_key: str | None,
                   max_drop: str | None, bisect: str | None, bit_set: str | None, seq_len: int | None,
                   sensitivity_dir: Path | None, objective: str, wide_activations: bool | None, smooth: str,
                   no_ties: bool, frontier_points: int, bisect_steps: int) -> None:
    """Search per-layer bit-widths for MODEL under size/BOPs/latency budgets, or within an accuracy band.

    A decoder LLM (zoo:smollm2_135m, a Llama .gguf) takes --size (the whole model, e.g. 80MB or 0.6x of
    every block linear at the widest of --bits, default 3,4,8) and/or --latency (the block linears' decode
    GEMVs per token as TVM runs them on --target, e.g. 0.8x or 2ms; also writes a measured frontier) and writes
    DIR/plan.json for `lowbit quantize MODEL --plan DIR/plan.json`."""
    if is_decoder(model):
        ctx = click.get_current_context()
        given = [f"--{n.replace('_', '-')}" for n in ctx.params if n not in DECODER_SEARCH_OPTIONS
                 and ctx.get_parameter_source(n) not in (ParameterSource.DEFAULT, None)]
        if given or (size_budget is None and latency_budget is None):
            raise LowbitError("a decoder LLM is searched under --size and/or --latency (with --bits, --calib, "
                              "--target); " + ("drop " + ", ".join(given) if given else
                                               "give --size (e.g. 80MB or 0.6x) or --latency (e.g. 0.8x or 2ms)"))
        if latency_budget is not None and not tvm_available():
            raise LowbitError("--latency for a decoder times its TVM decode kernels: install TVM (pip install "
                              "'lowbit[tvm]'), or search under --size")
        check_output_dir(output, force)
        bits = bit_list(bit_set, "--bits", GroupWiseWeights.SUPPORTED_BITS) if bit_set else DECODER_BITS
        search_decoder_model(model, size_budget, bits, calib=calib, progress=Progress(), latency=latency_budget,
                             target=target or "llvm -mcpu=native").save(output, force)
        return
    defaults = text_model_defaults(model)
    bits = bit_list(bit_set, "--bits", SUPPORTED_WEIGHT_BITS) if bit_set else defaults.get("bits", (4, 8))
    wide = defaults.get("wide_activations", False) if wide_activations is None else wide_activations

    budgets = {m: t for m, t in (("size", size_budget), ("bops", bops_budget), ("latency", latency_budget)) if t}
    drop = fraction(max_drop, "--max-drop") if max_drop is not None else None
    if not budgets and drop is None:
        raise LowbitError("give a budget (--size, --bops or --latency) and/or --max-drop")
    if bisect is None and drop is not None and not budgets:
        bisect = defaults.get("bisect")
    options = SearchOptions(bits, budgets, drop, latency_table, latency_source, sensitivity_dir, objective,
                            not no_ties, frontier_points, bisect_steps, target, rpc_target(rpc_tracker, rpc_key),
                            wide, bisect, defaults.get("budgets_of_widest", False) and wide)
    parse_smooth(smooth)
    check_output_dir(output, force)  # fail before the slow part, not after it
    search(Source(model, calib, eval_path, factory, seed, seq_len), options, output, force, Progress(), smooth)
