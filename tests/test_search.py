"""Mixed-precision search: the ILP, budgets, plans, int4 storage, and the commands end to end."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from lowbit.cli.main import lowbit
from lowbit.errors import LowbitError
from lowbit.ir import QuantizedGraph
from lowbit.ir.weights import pack_int4, unpack_int4
from lowbit.models import get_zoo_entry
from lowbit.models.loading import load_program
from lowbit.pipeline.sensitivity import activation_grids
from lowbit.quantizer.capture import capture
from lowbit.quantizer.config import BitPlan, QuantConfig
from lowbit.quantizer.quantize import calibrate
from lowbit.quantizer.reference import run_reference
from lowbit.search.costs import LatencyTable, layer_costs
from lowbit.search.ilp import Problem, solve, tie_groups
from lowbit.search.search import build_problem, parse_budget, residual_ties
from lowbit.sensitivity.analyze import SensitivityConfig, compute_sensitivity


def problem(budget: float) -> Problem:
    # Three layers, bits [4, 8]: sensitivity at 4 bits 5, 1, 3 (0 at 8); sizes 4 vs 8 each, 10 vs 20 for the last.
    cost = np.array([[5.0, 0.0], [1.0, 0.0], [3.0, 0.0]])
    size = np.array([[4.0, 8.0], [4.0, 8.0], [10.0, 20.0]])
    return Problem([["a"], ["b"], ["c"]], [4, 8], cost, {"size": size}, {"size": budget})


def brute_force(p: Problem) -> list[int]:
    feasible = [c for c in itertools.product(range(2), repeat=3) if p.feasible(c)]
    return list(min(feasible, key=lambda c: p.cost[np.arange(3), list(c)].sum()))


@pytest.mark.parametrize("budget", [18.0, 22.0, 26.0, 30.0, 36.0])
def test_ilp_is_optimal_and_within_budget(budget: float) -> None:
    p = problem(budget)
    choice = solve(p)
    assert p.feasible(choice)
    assert choice == brute_force(p)


def test_ilp_hand_checked_instance() -> None:
    # Budget 26: all-4 costs 18; raising c to 8 costs +10 (too much with anything else), a +4, b +4.
    # Best: a and b at 8 (size 26, loss 3) beats c at 8 (size 28: infeasible).
    assert problem(26.0).plan(solve(problem(26.0))) == {"a": 8, "b": 8, "c": 4}


def test_infeasible_budget_names_the_smallest_feasible_one() -> None:
    with pytest.raises(LowbitError, match=r"smallest size any plan reaches is 18"):
        solve(problem(17.0))


def knapsack_optimum(cost: np.ndarray, size: np.ndarray, budget: float) -> float:
    """The least total cost of a two-bit-width problem, by dynamic programming over integer sizes.

    Every layer starts at its cheaper bit-width (index 0); raising layer i takes size[i, 1] - size[i, 0]
    more bytes and saves cost[i, 0] - cost[i, 1]: a 0/1 knapsack.
    """
    capacity = int(budget - size[:, 0].sum())
    saved = np.zeros(capacity + 1)  # saved[w]: the most cost saved within w extra bytes
    for extra, gain in zip((size[:, 1] - size[:, 0]).astype(int), cost[:, 0] - cost[:, 1], strict=True):
        if extra <= capacity:
            saved[extra:] = np.maximum(saved[extra:], saved[:capacity + 1 - extra] + gain)
    return float(cost[:, 0].sum() - saved[capacity])


def test_ilp_is_optimal_on_a_mobilenet_sized_instance() -> None:
    # 53 layers, as MobileNetV2: too many for brute force, so a knapsack DP gives the optimum.
    rng = np.random.default_rng(0)
    n = 53
    cost = np.stack([rng.exponential(1.0, n), np.zeros(n)], 1)
    size = np.stack([rng.integers(1, 100, n), np.zeros(n)], 1).astype(float)
    size[:, 1] = 2 * size[:, 0]
    p = Problem([[f"l{i}"] for i in range(n)], [4, 8], cost, {"size": size}, {"size": 0.75 * size[:, 1].sum()})
    choice = solve(p)
    assert p.feasible(choice)
    assert 0 < sum(choice) < n  # the budget binds: neither uniform plan is the answer
    assert cost[np.arange(n), choice].sum() == pytest.approx(knapsack_optimum(cost, size, p.budgets["size"]))


def test_cross_terms_change_the_optimum_the_linear_ilp_picks() -> None:
    # Budget 26 admits all-4 (size 18, cost 9), a at 8 (22, 4), b at 8 (22, 8) and a, b at 8 (26, 3); c at 8 never
    # fits. Alone, the per-group costs pick a, b at 8. A cross term of -7 between a and b at 4 bits (their errors
    # cancel) makes all-4 cost 2, the optimum; only a solver that sees the cross terms finds it.
    pairs = np.zeros((3, 2, 3, 2))
    pairs[0, 0, 1, 0] = pairs[1, 0, 0, 0] = -7.0
    linear = problem(26.0)
    quadratic = Problem(linear.groups, linear.bits, linear.cost, linear.metrics, linear.budgets, pairs)
    assert solve(linear) == [1, 1, 0] and quadratic.objective([1, 1, 0]) == 3.0
    assert solve(quadratic) == [0, 0, 0] and quadratic.objective([0, 0, 0]) == 2.0
    # Everything at 8 bits costs 0, less still, but is over budget.
    assert quadratic.objective([1, 1, 1]) == 0.0 and not quadratic.feasible([1, 1, 1])


@pytest.mark.parametrize("seed", range(6))
def test_quadratic_ilp_is_the_brute_force_optimum(seed: int) -> None:
    # Six groups, three bit-widths, cross terms of either sign (729 plans: brute force is the check).
    rng = np.random.default_rng(seed)
    n, bits = 6, [2, 4, 8]
    cost = rng.exponential(1.0, (n, 3))
    size = np.sort(rng.integers(1, 20, (n, 3)), 1).astype(float)
    pairs = rng.normal(0.0, 1.0, (n, 3, n, 3))
    pairs = (pairs + pairs.transpose(2, 3, 0, 1)) / 2
    p = Problem([[f"l{i}"] for i in range(n)], bits, cost, {"size": size}, {"size": 0.6 * size[:, 2].sum()}, pairs)
    choice = solve(p)
    feasible = [c for c in itertools.product(range(3), repeat=n) if p.feasible(c)]
    assert p.feasible(choice)
    assert p.objective(choice) == pytest.approx(min(p.objective(c) for c in feasible), abs=1e-9)


def test_activation_rows_alone_with_one_weight_bit_width() -> None:
    # Weights fixed at 8 bits (one option, padded), two tensors: t2's 16 bits save more loss but only one fits.
    cost = np.array([[0.0, 0.0], [3.0, 0.0], [5.0, 0.0]])  # rows: layer a; t1 at 8, 16; t2 at 8, 16
    cost[0, 1] = -50.0  # the padded column: cheaper than anything, and forbidden
    bops = np.array([[10.0, 0.0], [0.0, 4.0], [0.0, 4.0]])
    p = Problem([["a"]], [8], cost, {"bops": bops}, {"bops": 14.0}, None, ["t1", "t2"])
    choice = solve(p)
    assert choice == [0, 0, 1] and p.plan(choice) == {"a": 8} and p.activation_plan(choice) == {"t1": 8, "t2": 16}
    assert p.metric_range("bops") == (10.0, 18.0)


def test_tie_groups_merge_overlapping_ties() -> None:
    groups = tie_groups(["a", "b", "c", "d", "e"], [["b", "c"], ["c", "d"]])
    assert groups == [["a"], ["b", "c", "d"], ["e"]]


def test_budgets_parse_fractions_and_units() -> None:
    assert parse_budget("size", "0.5x", 1000.0) == 500.0
    assert parse_budget("size", "2.5MB", 0) == 2.5e6
    assert parse_budget("bops", "150G", 0) == 150e9
    assert parse_budget("latency", "3ms", 0) == 3.0
    with pytest.raises(LowbitError, match="--size"):
        parse_budget("size", "lots", 1.0)


def test_plan_round_trips_and_bad_plans_are_refused(tmp_path: Path) -> None:
    plan = BitPlan({"a": 4, "b": 8})
    plan.save(tmp_path / "plan.json", note="x")
    assert BitPlan.load(tmp_path / "plan.json") == plan
    (tmp_path / "bad.json").write_text(json.dumps({"bits": {"a": 4}}))
    with pytest.raises(LowbitError, match="not a lowbit bit plan"):
        BitPlan.load(tmp_path / "bad.json")
    (tmp_path / "trunc.json").write_text('{"format": ')
    with pytest.raises(LowbitError, match="cannot read"):
        BitPlan.load(tmp_path / "trunc.json")


def test_latency_table_round_trips(tmp_path: Path) -> None:
    table = LatencyTable("cpu", "test", {"a": {4: 0.5, 8: 1.0}})
    (tmp_path / "t.json").write_text(json.dumps(table.to_json()))
    assert LatencyTable.load(tmp_path / "t.json").get("a", 4) == 0.5
    with pytest.raises(LowbitError, match="no entry for layer 'b'"):
        table.get("b", 4)


def test_int4_packs_two_per_byte() -> None:
    values = np.random.default_rng(0).integers(-8, 8, (5, 3, 3)).astype(np.int8)  # odd count
    packed = pack_int4(values)
    assert packed.dtype == np.uint8 and packed.size == (values.size + 1) // 2
    np.testing.assert_array_equal(unpack_int4(packed, values.shape), values)


def test_small_cnn_residual_ties() -> None:
    graph = capture(load_program("zoo:small_cnn", None), "small_cnn")
    ties = residual_ties(graph)
    assert ties and all(len(t) > 1 for t in ties)
    costs = layer_costs(graph, [4, 8])
    for node in graph.layers:
        w = graph.weight(node.name).numel()
        assert costs.size_bytes[node.name][8] - costs.size_bytes[node.name][4] == w / 2


def test_each_objective_is_its_sensitivity_model() -> None:
    # The ILP's objective at any choice equals the prediction it stands for: cross terms, ties and the
    # activation tensors' rows (8 or 16 bits) included.
    graph = capture(load_program("zoo:small_cnn", None), "small_cnn")
    calib = get_zoo_entry("small_cnn").calibration(0)
    stats = calibrate(graph, calib)
    narrow, wide = activation_grids(graph, calib, stats, QuantConfig())
    sens = compute_sensitivity(graph, calib, narrow, SensitivityConfig(samples=4, max_draws=4, rounding="nearest"),
                               wide_quantizers=wide)
    costs = layer_costs(graph, [4, 8])
    rng = np.random.default_rng(0)
    for objective, model, tie in (("cross", "cross", True), ("trace", "trace", True), ("diagonal", "diagonal", False)):
        problem = build_problem(graph, sens, costs, [4, 8], {"bops": np.inf}, tie, objective, activations=True)
        assert problem.tensors == sens.activation_tensors and len(problem.tensors) >= 3
        for _ in range(5):
            choice = rng.integers(0, 2, len(problem.groups) + len(problem.tensors))
            predicted = sens.predict(problem.plan(choice), model, problem.activation_plan(choice))
            assert problem.objective(choice) == pytest.approx(predicted, rel=1e-9)
            # A tensor at 16 bits adds one 8-bit pass of its readers' MACs.
            wide_tensors = [t for t, b in problem.activation_plan(choice).items() if b == 16]
            extra = sum(costs.macs[layer] * 64 for t in wide_tensors for layer in costs.readers[t])
            assert problem.usage(choice)["bops"] == pytest.approx(costs.total("bops", problem.plan(choice)) + extra)
    # The cross terms are not negligible here, so an objective that dropped them would fail above.
    plan = {n.name: 4 for n in graph.layers}
    assert abs(sens.predict(plan, "cross") - sens.predict(plan, "diagonal")) > 0.01 * sens.predict(plan, "diagonal")


@pytest.mark.parametrize("seed", range(4))
def test_weight_and_activation_rows_solve_to_the_brute_force_optimum(seed: int) -> None:
    # Three weight groups with three bit-widths, two activation rows with two (the third column is forbidden).
    rng = np.random.default_rng(seed)
    cost = rng.exponential(1.0, (5, 3))
    bops = np.sort(rng.integers(1, 20, (5, 3)), 1).astype(float)
    bops[3:, 2] = 0.0  # forbidden columns cost nothing: only `allowed` keeps the solver off them
    cost[3:, 2] = -100.0
    pairs = rng.normal(0.0, 0.5, (5, 3, 5, 3))
    pairs = (pairs + pairs.transpose(2, 3, 0, 1)) / 2
    p = Problem([["a"], ["b"], ["c"]], [2, 4, 8], cost, {"bops": bops}, {"bops": 0.6 * bops.max(1).sum()}, pairs,
                ["t1", "t2"])
    choice = solve(p)
    feasible = [c for c in itertools.product(range(3), range(3), range(3), range(2), range(2)) if p.feasible(c)]
    assert p.feasible(choice) and max(choice[3:]) <= 1
    assert p.objective(choice) == pytest.approx(min(p.objective(c) for c in feasible), abs=1e-9)
    assert set(p.activation_plan(choice).values()) <= {8, 16} and set(p.plan(choice)) == {"a", "b", "c"}


def _invoke(*args: object):
    return CliRunner().invoke(lowbit, [str(a) for a in args], catch_exceptions=False)


def test_sensitivity_search_and_plan_end_to_end(tmp_path: Path) -> None:
    sens_dir, search_dir, out = tmp_path / "sens", tmp_path / "search", tmp_path / "q"
    r = _invoke("sensitivity", "zoo:small_cnn", "-o", sens_dir, "--samples", 8, "--max-trace-seconds", 2,
                "--check-configs", 6)
    assert r.exit_code == 0, r.output
    sens = json.loads((sens_dir / "sensitivity.json").read_text())
    assert set(sens["check"]["spearman"]) == {"cross", "diagonal", "trace"}
    for png in ("sensitivity_layers.png", "cross_terms_w4.png"):
        assert (sens_dir / png).read_bytes()[:4] == b"\x89PNG"

    # On small_cnn's 64 held-out inputs, all-INT4 drops about 14% below uniform INT8 and the plans bisection tries
    # between it and the 0.8x cap drop about 2-11%: a 9% band rules out the cheapest plan and keeps some others.
    max_drop = 0.09
    r = _invoke("search", "zoo:small_cnn", "--size", "0.8x", "--max-drop", f"{100 * max_drop:g}%",
                "--sensitivity", sens_dir, "--frontier-points", 2, "--bisect-steps", 2, "-o", search_dir)
    assert r.exit_code == 0, r.output
    plan = json.loads((search_dir / "plan.json").read_text())
    frontier = json.loads((search_dir / "frontier.json").read_text())
    budget = frontier["budgets"]["size"]
    assert plan["costs"]["size"] <= budget + 1e-6
    baseline = frontier["baseline"]["measured"]["top1_agreement"]
    assert baseline - plan["measured"]["top1_agreement"] <= max_drop
    assert sum(p["chosen"] for p in frontier["points"]) == 1
    # The band binds: the cheapest plan (what bisection returns when the band is loose) is outside it, and the
    # chosen plan lies strictly between it and the largest plan measured within the cap.
    cheapest = min(frontier["points"], key=lambda p: p["costs"]["size"])
    assert set(cheapest["plan"].values()) == {4} and not cheapest["chosen"]
    assert baseline - cheapest["measured"]["top1_agreement"] > max_drop
    largest_within_cap = max(p["costs"]["size"] for p in frontier["points"] if p["costs"]["size"] <= budget + 1e-6)
    assert cheapest["costs"]["size"] < plan["costs"]["size"] < largest_within_cap
    assert (search_dir / "frontier.png").exists()
    # Every plan's agreement carries its interval; drops are paired with the uniform plan, whose own drop is 0.
    for p in frontier["points"]:
        top1 = p["measured"]["agreement"]["top1"]
        assert top1["low"] <= p["measured"]["top1_agreement"] <= top1["high"] and top1["samples"] == 64
        drop = p["drop_vs_baseline"]
        assert drop["value"] == pytest.approx(baseline - p["measured"]["top1_agreement"])
        assert drop["low"] <= drop["value"] <= drop["high"]
        if set(p["plan"].values()) == {8}:
            assert (drop["value"], drop["low"], drop["high"]) == (0.0, 0.0, 0.0)
    assert frontier["heldout"]["samples"] == 64
    report_md = (search_dir / "report.md").read_text()
    assert "| top-1 agreement | confident inputs | drop vs baseline |" in report_md

    r = _invoke("quantize", "zoo:small_cnn", "--plan", search_dir / "plan.json", "-o", out)
    assert r.exit_code == 0, r.output
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["bit_plan"] == plan["bits"]
    report = json.loads((out / "report.json").read_text())
    assert report["onnxruntime"]["model.int.onnx"]["bit_exact"]  # mixed INT4/INT8, ORT == reference
    qgraph = QuantizedGraph.load(out / "ir")
    low = [name for name, b in plan["bits"].items() if b == 4]
    for name in low:
        assert np.abs(qgraph.op(name).arrays["weight"]).max() <= 7
    x = np.zeros((1, 3, 32, 32), np.float32)
    assert run_reference(qgraph, x)[qgraph.outputs[0]].shape[0] == 1


def test_search_trades_7_against_8_bits_by_bops_not_by_size(tmp_path: Path) -> None:
    """--bits 7,8: int8 storage on the 7-bit grid (AVX2's exact byte-pair GEMM). A BOPs budget below uniform 8-bit
    mixes the two widths and the plan quantizes to 7-bit weights within [-63, 63], bit-exact in ORT; a size budget
    cannot trade them (both a byte per weight) and says so, writing nothing."""
    search_dir, out = tmp_path / "s", tmp_path / "q"
    r = _invoke("search", "zoo:small_cnn", "--bits", "7,8", "--bops", "0.95x", "--frontier-points", 0,
                "-o", search_dir)
    assert r.exit_code == 0, r.output
    plan = json.loads((search_dir / "plan.json").read_text())
    assert set(plan["bits"].values()) == {7, 8}
    assert plan["costs"]["bops"] <= plan["budgets"]["bops"] * (1 + 1e-9)
    r = _invoke("quantize", "zoo:small_cnn", "--plan", search_dir / "plan.json", "--target", "none", "-o", out)
    assert r.exit_code == 0, r.output
    qgraph = QuantizedGraph.load(out / "ir")
    for name, bits in plan["bits"].items():
        weight = np.abs(qgraph.op(name).arrays["weight"].astype(np.int64))
        assert weight.max() <= (63 if bits == 7 else 127) and (bits == 7 or weight.max() > 63)
    assert json.loads((out / "report.json").read_text())["onnxruntime"]["model.int.onnx"]["bit_exact"]
    r = _invoke("search", "zoo:small_cnn", "--bits", "7,8", "--size", "0.95x", "-o", tmp_path / "size")
    assert r.exit_code == 2 and "7-bit weights are stored a byte each" in r.output
    assert not (tmp_path / "size").exists()


def test_search_refuses_bad_requests(tmp_path: Path) -> None:
    r = _invoke("search", "zoo:small_cnn", "-o", tmp_path / "s")
    assert r.exit_code == 2 and "give a budget" in r.output
    r = _invoke("search", "zoo:small_cnn", "--size", "0.1x", "--bits", "4,8", "-o", tmp_path / "s",
                "--sensitivity", tmp_path / "missing")
    assert r.exit_code == 2 and "cannot read a sensitivity artifact" in r.output
    (tmp_path / "plan.json").write_text(json.dumps({"format": "lowbit-bitplan-v1", "bits": {"nope": 4}}))
    r = _invoke("quantize", "zoo:small_cnn", "--plan", tmp_path / "plan.json", "-o", tmp_path / "q")
    assert r.exit_code == 2 and "unknown layers ['nope']" in r.output
    assert not (tmp_path / "q").exists() and not (tmp_path / "s").exists()


def test_search_keeps_activations_at_16_bits_within_a_bops_budget(tmp_path: Path) -> None:
    # Weights stay 8-bit; the search may widen activation tensors, each adding an 8-bit pass of its readers' MACs,
    # within 5% more BOPs than uniform INT8. The plan applies, and stays bit-exact in ONNX Runtime.
    search_dir, out = tmp_path / "search", tmp_path / "q"
    r = _invoke("search", "zoo:small_cnn", "--bits", "8", "--wide-activations", "--bops", "1.05x",
                "--frontier-points", 1, "-o", search_dir)
    assert r.exit_code == 0, r.output
    plan = json.loads((search_dir / "plan.json").read_text())
    frontier = json.loads((search_dir / "frontier.json").read_text())
    wide = plan["activation_bits"]
    assert wide and set(wide.values()) == {16} and set(wide) <= set(frontier["activation_choices"])
    assert len(wide) < len(frontier["activation_choices"])  # the budget binds: not every tensor fits
    assert plan["costs"]["bops"] <= frontier["budgets"]["bops"] * (1 + 1e-9)
    assert set(plan["activation_costs"]) == set(wide)
    # Each saves loss; those read by a conv or linear add its MACs (those only an add reads add none).
    assert all(c["loss_saved"] > 0 and c["bops"] >= 0 for c in plan["activation_costs"].values())
    assert any(c["bops"] > 0 for c in plan["activation_costs"].values())
    assert "## 16-bit activations" in (search_dir / "report.md").read_text()
    r = _invoke("quantize", "zoo:small_cnn", "--plan", search_dir / "plan.json", "--target", "none", "-o", out)
    assert r.exit_code == 0, r.output
    report = json.loads((out / "report.json").read_text())
    assert report["onnxruntime"]["model.int.onnx"]["bit_exact"]
    assert {t for t, b in report["activation_bits"].items() if b == 16} == set(wide)
    # Without a time or BOPs budget, 16-bit activations would be free: refused, and nothing written.
    r = _invoke("search", "zoo:small_cnn", "--wide-activations", "--size", "0.8x", "-o", tmp_path / "s")
    assert r.exit_code == 2 and "needs a --latency or --bops budget" in r.output
    assert not (tmp_path / "s").exists()


def test_quantize_max_drop_keeps_the_activations_a_search_chooses(tmp_path: Path) -> None:
    # `quantize --max-drop` runs the search itself (weights at --bits, activations 8 or 16) and ships its plan,
    # with the search's outputs inside the artifact; a drop of 0% must measure no worse than all 16-bit.
    out = tmp_path / "q"
    r = _invoke("quantize", "zoo:small_cnn", "--max-drop", "0%", "--target", "none", "-o", out)
    assert r.exit_code == 0, r.output
    report = json.loads((out / "report.json").read_text())
    frontier = json.loads((out / "search" / "frontier.json").read_text())
    plan = json.loads((out / "search" / "plan.json").read_text())
    assert report["onnxruntime"]["model.int.onnx"]["bit_exact"]
    assert report["search"]["max_drop"] == 0.0 and frontier["metric"] == "bops"
    assert frontier["baseline"]["activation_bits"] and set(frontier["baseline"]["activation_bits"].values()) == {16}
    assert plan["measured"]["top1_agreement"] >= frontier["baseline"]["measured"]["top1_agreement"]
    wide = {t for t, b in report["activation_bits"].items() if b == 16}
    assert wide == set(plan["activation_bits"]) == set(report["activation_costs"])
    assert "## 16-bit activations" in (out / "report.md").read_text()
    r = _invoke("quantize", "zoo:small_cnn", "--max-drop", "1%", "--plan", out / "search" / "plan.json",
                "-o", tmp_path / "both")
    assert r.exit_code == 2 and "--plan or --max-drop, not both" in r.output
    assert not (tmp_path / "both").exists()


def test_latency_budget_from_a_table(tmp_path: Path) -> None:
    graph = capture(load_program("zoo:small_cnn", None), "small_cnn")
    table = LatencyTable("test-cpu", "hand-made", {n.name: {4: 0.5, 8: 1.0} for n in graph.layers})
    (tmp_path / "table.json").write_text(json.dumps(table.to_json()))
    r = _invoke("sensitivity", "zoo:small_cnn", "-o", tmp_path / "sens", "--samples", 4, "--max-trace-seconds", 1,
                "--check-configs", 0)
    assert r.exit_code == 0, r.output
    r = _invoke("search", "zoo:small_cnn", "--latency", "0.75x", "--latency-table", tmp_path / "table.json",
                "--sensitivity", tmp_path / "sens", "--frontier-points", 0, "-o", tmp_path / "search")
    assert r.exit_code == 0, r.output
    plan = json.loads((tmp_path / "search" / "plan.json").read_text())
    assert plan["costs"]["latency"] <= 0.75 * len(graph.layers)
    assert sum(b == 4 for b in plan["bits"].values()) >= 3
    r = _invoke("search", "zoo:small_cnn", "--latency", "0.4x", "--latency-table", tmp_path / "table.json",
                "--sensitivity", tmp_path / "sens", "-o", tmp_path / "s2")
    assert r.exit_code == 2 and "smallest latency any plan reaches is 4.500 ms" in r.output
    assert not (tmp_path / "s2").exists()
