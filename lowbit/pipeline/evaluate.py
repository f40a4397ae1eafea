"""What report.json says about a quantized model's fidelity, size and layers, measured on held-out data."""

from __future__ import annotations

from typing import Any

from .. import __version__
from ..ir import QuantizedGraph
from ..metrics import output_fidelity
from ..models.zoo import ZOO_PREFIX
from ..quantizer.config import QuantConfig
from ..quantizer.reference import run_reference_batches
from . import report as reports
from .prepare import Prepared, samples
from .progress import Progress


def evaluate(prepared: Prepared, qgraph: QuantizedGraph, config: QuantConfig,
             progress: Progress) -> tuple[dict[str, Any], reports.Outputs, reports.Outputs]:
    """The report's fidelity, size and layer sections (the backends' checks and timings are added by the caller).

    Also returns the reference executor's float outputs on the held-out inputs, and its integer outputs (under the
    final dequantize) that the backends' checks compare with.
    """
    graph, calib, heldout, entry = prepared.graph, prepared.calib, prepared.heldout, prepared.entry
    progress.echo("evaluate", f"FP32 and per-layer fake-quant on {samples(len(heldout), 'held-out sample')}")
    with progress.stage("evaluate: fp32 + per-layer"):
        fp32, layer_sqnr = reports.float_outputs_and_layer_sqnr(graph, qgraph, heldout.data)
    progress.echo("evaluate",
                  f"the quantized model in the reference executor on {samples(len(heldout), 'held-out sample')}")
    with progress.stage("evaluate: reference"):
        int8, int8_integers = run_reference_batches(qgraph, heldout.data)
    per_output = {o: output_fidelity(fp32[o], int8[o], heldout.photos, graph.is_embedding(o)) for o in graph.outputs}
    fidelity = {"output": graph.outputs[0], **per_output[graph.outputs[0]], "per_output": per_output}
    t = progress.timings
    agreement = reports.fmt_agreement(fidelity)
    if fidelity.get("cosine"):
        agreement = None
        progress.echo("evaluate", f"embedding cosine FP32 vs quantized {reports.fmt_cosine(fidelity['cosine'])}")
    progress.echo("evaluate", f"{'top-1 agreement ' + agreement + ', ' if agreement else ''}output SQNR "
                              f"{reports.fmt_db(fidelity['sqnr_db'])} (FP32 {t['evaluate: fp32 + per-layer']:.1f}s, "
                              f"reference {t['evaluate: reference']:.1f}s)")

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
            progress.echo("evaluate", f"labelled top-1: FP32 {reports.fmt_pct(labelled['top1_fp32'])}, quantized "
                                      f"{reports.fmt_pct(labelled['top1_int8'])} ({labelled['samples']} images)")

    report = {
        "lowbit_version": __version__,
        "model": {"spec": prepared.source.model, **graph.summary()},
        "config": config.to_json(),
        "bit_plan": qgraph.bit_plan(),
        "activation_bits": qgraph.wide_activations(),
        "calibration": {"method": config.calib_method, **reports.data_summary(calib)},
        "heldout": reports.data_summary(heldout),
        "fidelity": fidelity,
        "labelled": labelled,
        "size": reports.model_sizes(graph, qgraph),
        "per_layer_samples": min(len(heldout), reports.PER_LAYER_SAMPLES),
        "layers": reports.layer_rows(graph, qgraph, layer_sqnr),
        "notes": notes,
    }
    return report, int8, int8_integers
