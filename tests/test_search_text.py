"""The search on a text encoder: the cosine loss's curvature, sensitivity on named inputs, and `lowbit search` on a
tiny random BERT returning a plan within the cosine band."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from lowbit.cli.main import lowbit
from lowbit.pipeline.prepare import Prepared, Source, prepare
from lowbit.pipeline.progress import Progress
from lowbit.pipeline.search import text_model_defaults
from lowbit.pipeline.sensitivity import activation_grids
from lowbit.quantizer.config import QuantConfig
from lowbit.quantizer.quantize import calibrate
from lowbit.search.fidelity import COSINE, TOP1, fidelity_of
from lowbit.sensitivity.analyze import LossProbe, SensitivityConfig, WeightErrors, compute_sensitivity, first_samples
from lowbit.sensitivity.hessian import CosineCurvature, float_activations

pytest.importorskip("tokenizers", reason="text models need the tokenizers package")
from test_text_pipeline import CALIB, HELDOUT, SEQ_LEN, write_bert_dir, write_lines  # noqa: E402


@pytest.fixture(scope="module")
def tiny_text(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    root = tmp_path_factory.mktemp("text-search")
    return (write_bert_dir(root / "tiny-bert"), write_lines(root / "calib.txt", CALIB * 2),
            write_lines(root / "heldout.txt", HELDOUT * 4))


@pytest.fixture(scope="module")
def outlier_text(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """The tiny BERT with one LayerNorm channel 40x the others (as BERTs have): at 8 bits the other channels of
    that tensor lose most of their resolution, so the width of the LayerNorm outputs matters to the cosine."""
    root = tmp_path_factory.mktemp("text-search-outlier")
    model = write_bert_dir(root / "tiny-bert")
    state = load_file(str(model / "model.safetensors"))
    for name in ("embeddings.LayerNorm.weight", "encoder.layer.0.attention.output.LayerNorm.weight"):
        state[name][0] *= 40
    save_file(state, str(model / "model.safetensors"))
    return model, write_lines(root / "calib.txt", CALIB * 2), write_lines(root / "heldout.txt", HELDOUT * 4)


@pytest.fixture(scope="module")
def prepared(tiny_text: tuple[Path, Path, Path]) -> Prepared:
    model, calib, heldout = tiny_text
    return prepare(Source(str(model), str(calib), str(heldout), seq_len=SEQ_LEN), Progress(write=lambda _: None))


def test_cosine_curvature_is_the_hessian_of_one_minus_cosine() -> None:
    """A Aᵀ with A the factor `CosineCurvature` applies equals torch's Hessian of 1 - cos(e, r) at e = r."""
    torch.manual_seed(0)
    r = torch.randn(3, 5, dtype=torch.float64) * 4
    curvature = CosineCurvature(r)
    for i in range(len(r)):
        exact = torch.autograd.functional.hessian(lambda e, i=i: 1 - F.cosine_similarity(e, r[i], dim=0), r[i])
        factor = torch.stack([curvature.factor(torch.eye(5, dtype=torch.float64)[k].expand(3, 5))[i]
                              for k in range(5)], dim=1)
        torch.testing.assert_close(factor @ factor.T, exact)


def test_fidelity_follows_the_output() -> None:
    ref = np.array([[1.0, 0.0], [0.0, 2.0]])
    out = np.array([[1.0, 1.0], [0.0, 3.0]])
    assert fidelity_of(True) is COSINE and fidelity_of(False) is TOP1
    np.testing.assert_allclose(COSINE.per_sample(ref, out), [np.sqrt(0.5), 1.0])
    np.testing.assert_array_equal(TOP1.per_sample(ref, out), [1.0, 1.0])
    measured = COSINE.measure(ref, out, None)
    assert measured["metric"] == "cosine" and measured["score"] == pytest.approx((np.sqrt(0.5) + 1) / 2)
    assert measured["cosine"]["min"] == pytest.approx(np.sqrt(0.5))


def test_text_sensitivity_predicts_the_cosine_drop(prepared: Prepared) -> None:
    """On the tiny BERT, ½ δᵀHδ with every cross term predicts the measured increase of 1 - cos of random 4/8-bit
    weight plans (the loss a --max-drop on the cosine bounds), and ranks them as measured."""
    graph, data = prepared.graph, prepared.calib.data
    stats = calibrate(graph, data)
    narrow, wide = activation_grids(graph, data, stats, QuantConfig())
    config = SensitivityConfig(bits=(4, 8), pair_bits=(4, 8), samples=16, max_draws=8, rounding="nearest")
    sens = compute_sensitivity(graph, data, narrow, config, wide_quantizers=wide)
    assert sens.loss == "cosine" and sens.head_classes == 0 and sens.activation_tensors
    x = first_samples(graph, data, 16)
    probe = LossProbe(graph, data, WeightErrors(graph, float_activations(graph, x), "mse", "nearest"))
    rng = np.random.default_rng(0)
    names = [n.name for n in graph.layers]
    plans = [{n: 4 if rng.random() < share else 8 for n in names} for share in np.linspace(0.1, 0.9, 8)]
    measured = np.array([probe.loss_increase(p) for p in plans])
    predicted = np.array([sens.predict(p, "cross") for p in plans])
    assert np.all(measured > 0)
    np.testing.assert_allclose(predicted, measured, rtol=0.35)
    assert np.corrcoef(np.argsort(np.argsort(predicted)), np.argsort(np.argsort(measured)))[0, 1] > 0.8


def test_text_models_default_to_wide_activations(tiny_text: tuple[Path, Path, Path]) -> None:
    defaults = text_model_defaults(str(tiny_text[0]))
    assert defaults["bits"] == (8,) and defaults["wide_activations"] and defaults["bisect"] in ("latency", "bops")
    assert defaults["budgets_of_widest"]  # --latency 0.8x is of the all-16-bit plan, as in Schaefer et al.
    assert text_model_defaults("zoo:small_cnn") == {}


def test_search_a_text_model_within_the_cosine_band(outlier_text: tuple[Path, Path, Path], tmp_path: Path) -> None:
    """`lowbit search` on a BERT directory: 8-bit weights, each activation tensor 8 or 16 bits, bisection on BOPs for
    the cheapest plan whose mean embedding cosine is within the band of the all-16-bit plan's."""
    model, calib, heldout = outlier_text
    out = tmp_path / "search"
    # All activations at 8 bits (but the free ones) drop the cosine by about 2.5e-4 here: this band binds.
    max_drop = 1e-4
    result = CliRunner().invoke(lowbit, ["search", str(model), "--calib", str(calib), "--eval", str(heldout),
                                         "--seq-len", str(SEQ_LEN), "--max-drop", f"{100 * max_drop:g}%",
                                         "--bisect", "bops", "--frontier-points", "2", "--bisect-steps", "3",
                                         "--smooth", "none", "-o", str(out)])  # the outliers stay, on purpose
    assert result.exit_code == 0, result.output
    frontier = json.loads((out / "frontier.json").read_text())
    plan = json.loads((out / "plan.json").read_text())
    assert frontier["fidelity"] == "cosine" and frontier["bits"] == [8] and frontier["metric"] == "bops"
    assert frontier["activation_choices"] and frontier["heldout"]["samples"] == len(HELDOUT) * 4
    baseline = frontier["baseline"]
    assert len(baseline["activation_bits"]) == len(frontier["activation_choices"])  # all 16-bit
    assert baseline["measured"]["score"] - plan["measured"]["score"] <= max_drop
    assert plan["costs"]["bops"] <= baseline["costs"]["bops"]
    cosine = plan["measured"]["cosine"]
    assert cosine["min"] <= cosine["worst_1pct"] <= plan["measured"]["score"] <= 1.0
    for p in frontier["points"]:
        drop = p["drop_vs_baseline"]
        assert drop["value"] == pytest.approx(baseline["measured"]["score"] - p["measured"]["score"])
        assert drop["low"] <= drop["value"] + 1e-12 and drop["value"] <= drop["high"] + 1e-12
        assert p["measured"]["score_interval"][0] <= p["measured"]["score"] <= p["measured"]["score_interval"][1]
    # The band is what decides: some plan measured is outside it, and so is every one cheaper than the chosen.
    assert any(baseline["measured"]["score"] - p["measured"]["score"] > max_drop for p in frontier["points"])
    for p in frontier["points"]:
        if p["costs"]["bops"] < plan["costs"]["bops"]:
            assert baseline["measured"]["score"] - p["measured"]["score"] > max_drop
    report = (out / "report.md").read_text()
    assert "| embedding cosine | worst 1% / min cosine | drop vs baseline |" in report
    assert (out / "frontier.png").read_bytes()[:4] == b"\x89PNG"


def test_search_and_sensitivity_smooth_as_quantize_does(tiny_text: tuple[Path, Path, Path], tmp_path: Path) -> None:
    """A text model's search measures its plans on the SmoothQuant-smoothed graph, as `quantize --plan` builds it
    (--smooth default: auto for a transformer), and refuses a sensitivity measured with another --smooth or at
    another sequence length."""
    model, calib, heldout = tiny_text
    data = ["--calib", str(calib), "--eval", str(heldout), "--seq-len", str(SEQ_LEN)]
    sens = tmp_path / "sens"
    result = CliRunner().invoke(lowbit, ["sensitivity", str(model), *data, "--samples", "4", "--check-configs", "0",
                                         "--max-trace-seconds", "1", "--smooth", "none", "-o", str(sens)])
    assert result.exit_code == 0, result.output
    assert json.loads((sens / "sensitivity.json").read_text())["smooth"] == "none"
    assert json.loads((sens / "sensitivity.json").read_text())["seq_len"] == SEQ_LEN
    search = ["search", str(model), *data, "--bops", "0.9x", "--frontier-points", "0"]
    result = CliRunner().invoke(lowbit, [*search, "--sensitivity", str(sens), "-o", str(tmp_path / "refused")])
    assert result.exit_code == 2 and "measured with --smooth none, but this search smooths with auto" in result.output
    assert not (tmp_path / "refused").exists()
    at_another_length = [a if a != str(SEQ_LEN) else str(SEQ_LEN // 2) for a in search]
    result = CliRunner().invoke(lowbit, [*at_another_length, "--smooth", "none", "--sensitivity", str(sens),
                                         "-o", str(tmp_path / "refused")])
    assert result.exit_code == 2 and f"measured at sequence length {SEQ_LEN}, but this search runs at" in result.output
    result = CliRunner().invoke(lowbit, [*search, "-o", str(tmp_path / "s")])
    assert result.exit_code == 0, result.output
    assert "SmoothQuant (alpha auto)" in result.output
    assert json.loads((tmp_path / "s" / "frontier.json").read_text())["smooth"] == "auto"
    assert json.loads((tmp_path / "s" / "sensitivity" / "sensitivity.json").read_text())["smooth"] == "auto"
    assert json.loads((tmp_path / "s" / "plan.json").read_text())["smooth"] == "auto"
    result = CliRunner().invoke(lowbit, ["quantize", str(model), *data, "--plan", str(tmp_path / "s" / "plan.json"),
                                         "--smooth", "none", "--target", "none", "-o", str(tmp_path / "q")])
    assert result.exit_code == 0, result.output
    assert "was searched with --smooth auto, this model is smoothed with none" in result.output


def test_layers_of_one_signature_share_one_timed_kernel(prepared: Prepared) -> None:
    """The latency table times each kernel signature once: Q, K and V (one shape, one dtype) share one, the FFN's
    two linears (other shapes) have their own, and every layer maps to a layer of its own signature."""
    pytest.importorskip("tvm")
    from lowbit.codegen.tvm.latency import kernel_signature, representatives
    from lowbit.quantizer.quantize import quantize

    qgraph = quantize(prepared.graph, prepared.calib.data, QuantConfig(calib_method="minmax", rounding="nearest"))
    same = representatives([qgraph])
    block = "encoder.layer.0."
    q, k, v = (f"{block}attention.self.{n}" for n in ("query", "key", "value"))
    assert same[q] == same[k] == same[v] == q
    up, down = f"{block}intermediate.dense", f"{block}output.dense"
    assert same[up] == up and same[down] == down
    assert all(kernel_signature(qgraph, layer) == kernel_signature(qgraph, first) for layer, first in same.items())
