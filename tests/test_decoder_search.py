"""Mixed precision for a weight-only decoder: sensitivity, the size-constrained ILP, plans through quantize."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.numpy import load_file
from test_llama import tiny_model, write_gguf  # pytest puts tests/ on the path

from lowbit.cli.main import lowbit
from lowbit.errors import LowbitError
from lowbit.ir.groupwise_weights import GroupWiseWeights
from lowbit.quantizer.weight_only import WeightOnlyConfig, quantize_weights
from lowbit.search.decoder_search import decoder_options, measure_sensitivity, plan_totals, solve_plan

CALIBRATION = "The quick brown fox jumps over the lazy dog. " * 40


def _linears(model: torch.nn.Module) -> dict[str, torch.nn.Linear]:
    return {n: m for n, m in model.layers.named_modules(prefix="layers") if isinstance(m, torch.nn.Linear)}


@pytest.fixture(scope="module")
def options():
    model = tiny_model(torch.float32)
    samples = [torch.randint(0, model.config.vocab_size, (1, 40), generator=torch.Generator().manual_seed(s))
               for s in range(3)]
    linears = _linears(model)
    sensitivity = measure_sensitivity(model, linears, samples)
    assert sensitivity.tokens == 3 * 39
    for name, lin in linears.items():
        assert sensitivity.fisher[name].shape == (lin.out_features,) and bool((sensitivity.fisher[name] > 0).any())
        assert sensitivity.hessian[name].shape == (lin.in_features, lin.in_features)
    assert all(p.grad is None for p in model.parameters())  # the search leaves no gradients behind
    return decoder_options(linears, sensitivity, group=16, bits=(3, 4, 8))


def test_fewer_bits_predict_more_loss_and_fewer_bytes(options) -> None:
    assert (options.loss[:, 0] > options.loss[:, 1]).all() and (options.loss[:, 1] > options.loss[:, 2]).all()
    assert (options.nbytes[:, 0] < options.nbytes[:, 1]).all() and (options.nbytes[:, 1] < options.nbytes[:, 2]).all()


def test_the_plan_meets_the_budget_and_spends_it_where_the_loss_is(options) -> None:
    low, high = options.nbytes[:, 0].sum(), options.nbytes[:, 2].sum()
    assert set(solve_plan(options, low).values()) == {3}
    assert set(solve_plan(options, high).values()) == {8}
    budget = low + 0.3 * (high - low)
    plan = solve_plan(options, budget)
    index = {n: i for i, n in enumerate(options.names)}
    used = sum(options.nbytes[index[n], options.bits.index(b)] for n, b in plan.items())
    assert used <= budget and len(set(plan.values())) > 1
    predicted = sum(options.loss[index[n], options.bits.index(b)] for n, b in plan.items())
    assert options.nbytes[:, 1].sum() <= budget  # the budget also fits every linear at 4 bits ...
    assert predicted <= options.loss[:, 1].sum()  # ... so the plan predicts no more loss than that
    with pytest.raises(LowbitError, match="below the smallest plan"):
        solve_plan(options, low - 1)


def test_a_plan_sets_each_linears_bits() -> None:
    model = tiny_model(torch.float32)
    plan = (("layers.0.mlp.down_proj", 8), ("layers.1.self_attn.q_proj", 3))
    weights = quantize_weights(model, list(model.layers), WeightOnlyConfig(group=16, rounding="rtn", plan=plan))
    assert weights["layers.0.mlp.down_proj"].bits == 8 and weights["layers.1.self_attn.q_proj"].bits == 3
    assert weights["layers.1.self_attn.k_proj"].bits == 4
    assert "mixed" in WeightOnlyConfig(plan=plan).describe()
    with pytest.raises(LowbitError, match="not block linears"):
        quantize_weights(model, list(model.layers), WeightOnlyConfig(rounding="rtn", plan=(("layers.9.x", 4),)))
    with pytest.raises(LowbitError, match="unsupported bit-widths"):
        WeightOnlyConfig(plan=(("layers.0.mlp.down_proj", 5),))


def test_search_then_quantize_with_the_plan(tmp_path: Path) -> None:
    gguf = tmp_path / "tiny.gguf"
    write_gguf(gguf)
    calib = tmp_path / "calib.txt"
    calib.write_text(CALIBRATION)
    runner = CliRunner()
    result = runner.invoke(lowbit, ["search", str(gguf), "-o", str(tmp_path / "s"), "--size", "0.9x",
                                    "--calib", str(calib)])
    assert result.exit_code == 0, result.output
    plan = json.loads((tmp_path / "s" / "plan.json").read_text())
    assert plan["model_bytes"] <= plan["budget_bytes"] and set(plan["bits"].values()) <= {3, 4, 8}
    result = runner.invoke(lowbit, ["search", str(gguf), "-o", str(tmp_path / "t"), "--size", "1B"])
    assert result.exit_code != 0 and "below the smallest plan" in result.output
    assert not (tmp_path / "t").exists()
    result = runner.invoke(lowbit, ["search", str(gguf), "-o", str(tmp_path / "u"), "--size", "1MB", "--bops", "1G"])
    assert result.exit_code != 0 and "--bops" in result.output
    out = tmp_path / "q"
    result = runner.invoke(lowbit, ["quantize", str(gguf), "-o", str(out), "--plan", str(tmp_path / "s" / "plan.json"),
                                    "--rounding", "nearest"])
    assert result.exit_code == 0, result.output
    arrays = load_file(str(out / "weights.safetensors"))
    for name, bits in plan["bits"].items():
        assert GroupWiseWeights.from_tensors(arrays, f"{name}.weight.", "test").bits == bits


def test_a_latency_budget_trades_int8_for_int4_where_the_loss_is_least(options) -> None:
    """Latency per option (int3 runs on the int4 kernel: the same time), budgets of latency alone and of both."""
    k = options.nbytes[:, 1:2]
    latency = np.hstack([k, k, 1.6 * k]) * 1e-9  # int8 reads twice the bytes of int4; int3 unpacks as int4
    timed = options.with_latency(latency)
    fast, slow = latency[:, 1].sum(), latency[:, 2].sum()
    plan = solve_plan(timed, {"latency": fast + 0.5 * (slow - fast)})
    totals = plan_totals(timed, plan)
    assert totals["latency_s"] <= fast + 0.5 * (slow - fast) + 1e-15
    assert 3 not in plan.values()  # int3 saves no time over int4 and predicts more loss
    assert {4, 8} <= set(plan.values())
    both = solve_plan(timed, {"latency": slow, "size": options.nbytes[:, 1].sum()})
    assert plan_totals(timed, both)["bytes"] <= options.nbytes[:, 1].sum()
    with pytest.raises(LowbitError, match="latency budget .* below the smallest plan"):
        solve_plan(timed, {"latency": 0.5 * fast})
    with pytest.raises(LowbitError, match="no latency"):
        solve_plan(options, {"latency": slow})
    with pytest.raises(LowbitError, match="latency table"):
        options.with_latency(latency[:, :2])


def test_latency_search_writes_a_measured_frontier(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The CLI's --latency path with a stand-in latency table (the real one times TVM kernels: test_linear_latency)."""
    import lowbit.pipeline.decoder_search as pipeline

    def fake_table(linears, bits, group, target, log):
        per_weight = {3: 1.0, 4: 1.0, 8: 1.7}
        return np.array([[lin.weight.numel() * per_weight[b] * 1e-10 for b in bits] for lin in linears.values()])

    monkeypatch.setattr(pipeline, "linear_latency_table", fake_table)
    monkeypatch.setattr(pipeline, "tvm_available", lambda: True, raising=False)
    gguf = tmp_path / "tiny.gguf"
    write_gguf(gguf)
    calib = tmp_path / "calib.txt"
    calib.write_text(CALIBRATION)
    out = tmp_path / "s"
    result = CliRunner().invoke(lowbit, ["search", str(gguf), "-o", str(out), "--latency", "0.8x",
                                         "--calib", str(calib)])
    assert result.exit_code == 0, result.output
    plan = json.loads((out / "plan.json").read_text())
    assert plan["latency_s"] <= plan["budget_latency_s"] * (1 + 1e-9)
    frontier = json.loads((out / "frontier.json").read_text())["points"]
    assert len(frontier) >= 2 and sum(p["chosen"] for p in frontier) == 1
    latencies = [p["latency_s"] for p in frontier]
    assert latencies == sorted(latencies) and all(p["perplexity"] for p in frontier)
    assert (out / "frontier.png").stat().st_size > 0 and "Frontier" in (out / "report.md").read_text()
