"""Unit tests of capture, calibration, dyadic arithmetic, the integer IR and its executors (small CNN)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lowbit.errors import LowbitError
from lowbit.ir import QuantizedGraph
from lowbit.ir.dyadic import dyadic, requantize
from lowbit.ir.ops import _layer
from lowbit.ir.ops.linear import LINEAR
from lowbit.models import get_zoo_entry, small_cnn
from lowbit.models.loading import load_program
from lowbit.quantizer.calibrate import HIST_BINS, TensorStats, clip_threshold, weight_scales
from lowbit.quantizer.capture import UnsupportedOpsError, capture
from lowbit.quantizer.config import BitPlan, QuantConfig
from lowbit.quantizer.graph import Graph, run_graph
from lowbit.quantizer.quantize import quantize
from lowbit.quantizer.reference import run_reference
from lowbit.quantizer.rounding import HessianAccumulator, gptq_round
from lowbit.quantizer.simulate import simulate


@pytest.fixture(scope="module")
def graph() -> Graph:
    return capture(load_program("zoo:small_cnn", None), "small_cnn")


@pytest.fixture(scope="module")
def data() -> tuple[np.ndarray, np.ndarray]:
    entry = get_zoo_entry("small_cnn")
    return entry.calibration(0), entry.heldout(0)


@pytest.fixture(scope="module")
def qgraph(graph: Graph, data) -> QuantizedGraph:
    return quantize(graph, data[0])


# -- capture ---------------------------------------------------------------------------


def test_capture_matches_torch_and_folds_batch_norm(graph: Graph, data) -> None:
    x = torch.from_numpy(data[1])
    with torch.no_grad():
        expected = small_cnn()(x)
    got = run_graph(graph, x)[graph.outputs[0]]
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    ops = {n.op for n in graph.nodes}
    assert {"conv", "linear", "add", "concat", "clamp", "pad", "maxpool", "avgpool", "reshape"} <= ops
    assert len(graph.layers) == len(graph.params) // 2  # weight + bias per layer, no BN params left


def test_capture_lists_layers_neighbours_groups_and_macs(graph: Graph) -> None:
    table = {row["name"]: row for row in graph.layer_table()}
    assert any(row["groups"] > 1 and row["groups"] == row["weight_shape"][0] for row in table.values())  # depthwise
    assert any(1 < row["groups"] < row["weight_shape"][0] for row in table.values())  # grouped
    assert all(row["macs"] > 0 for row in table.values())
    first = graph.layers[0].name
    assert table[first]["producers"] == [] and table[first]["consumers"]
    groups = graph.scale_groups()
    assert any(len(g) == 2 for g in groups)  # the add
    assert graph.total_macs == sum(n.macs for n in graph.nodes)


def test_unsupported_ops_are_all_listed_at_once() -> None:
    class Odd(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)
            self.up = nn.ConvTranspose2d(4, 4, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = torch.exp(self.conv(x))
            return self.up(y * y).tanh()

    ep = torch.export.export(Odd().eval(), (torch.zeros(1, 3, 8, 8),))
    with pytest.raises(UnsupportedOpsError) as info:
        capture(ep)
    message = str(info.value)
    for op in ("exp", "mul", "tanh", "conv_transpose2d"):
        assert op in message
    assert "up (ConvTranspose2d)" in message


def test_an_op_that_reads_an_unsupported_one_is_not_run_on_nothing() -> None:
    class AddsAConstant(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(8, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.relu(self.fc(x) + 1.0)  # a tensor plus a number: not an activation add

    ep = torch.export.export(AddsAConstant().eval(), (torch.zeros(1, 8),))
    with pytest.raises(UnsupportedOpsError, match="argument 'other' must be an activation tensor"):
        capture(ep)


def test_graph_round_trips(graph: Graph, tmp_path) -> None:
    graph.save(tmp_path)
    loaded = Graph.load(tmp_path)
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(run_graph(loaded, x), run_graph(graph, x))
    meta = json.loads((tmp_path / "graph.json").read_text())
    conv = next(n for n in meta["nodes"] if n["op"] == "conv")
    del conv["attrs"]["groups"]
    (tmp_path / "graph.json").write_text(json.dumps(meta))
    with pytest.raises(LowbitError, match=f"node {conv['name']} .conv.: bad attributes"):
        Graph.load(tmp_path)


# -- dyadic arithmetic --------------------------------------------------------------------


def test_dyadic_multipliers_are_accurate_and_in_range() -> None:
    m = np.array([1e-9, 3.7e-5, 0.0123, 0.5, 1.0, 3.14159, 1000.0])
    b, c = dyadic(m)
    assert np.all(b < 2**30) and np.all(b >= 2**29) and np.all((c >= 0) & (c <= 62))
    np.testing.assert_allclose(b / np.exp2(c.astype(float)), m, rtol=2.0**-29)
    assert dyadic(0.0)[0][0] == 0


def test_requantize_rounds_half_up_and_saturates() -> None:
    b, c = dyadic(0.5)
    acc = np.array([-3, -1, 1, 3, 1000, -1000])
    # x * 0.5: -1.5 -> -1, -0.5 -> 0, 0.5 -> 1, 1.5 -> 2 (ties towards +inf), then saturation.
    np.testing.assert_array_equal(requantize(acc, b, c, -128, 127), [-1, 0, 1, 2, 127, -128])
    np.testing.assert_array_equal(requantize(acc, b, c, 0, 255, zero_point=10), [9, 10, 11, 12, 255, 0])


# -- calibration --------------------------------------------------------------------------


def _stats(x: np.ndarray) -> TensorStats:
    top = np.abs(x).max()
    hist = np.histogram(np.abs(x), HIST_BINS, (0, top))[0]
    return TensorStats(float(x.min()), float(x.max()), hist)


def test_range_methods_clip_outliers() -> None:
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.standard_normal(100_000), [40.0]])
    st = _stats(x)
    assert clip_threshold(st, "minmax", True) == pytest.approx(40.0)
    assert 3.0 < clip_threshold(st, "percentile", True, 99.99) < 6.0
    # MSE trades clipping error against rounding error: it clips a heavy tail, but keeps a far
    # outlier alone (one (40 - T)^2 outweighs the rounding noise it would save).
    heavy = rng.laplace(size=200_000)
    assert clip_threshold(_stats(heavy), "mse", True) < 0.9 * np.abs(heavy).max()
    assert clip_threshold(st, "mse", True) > 20.0


def test_mse_weight_scales_never_worse_than_minmax() -> None:
    w = torch.randn(16, 64) * torch.linspace(0.1, 3, 16)[:, None]
    w[0, 0] = 30.0
    for bits in (4, 8):
        q = 2 ** (bits - 1) - 1
        errs = []
        for method in ("minmax", "mse"):
            s = weight_scales(w, bits, method)[:, None]
            errs.append(((torch.clamp(torch.round(w / s), -q, q) * s - w) ** 2).sum().item())
        assert errs[1] <= errs[0]


# -- GPTQ ---------------------------------------------------------------------------------


def test_gptq_beats_round_to_nearest_on_correlated_inputs() -> None:
    torch.manual_seed(0)
    mix = torch.randn(32, 32)
    x = torch.randn(4096, 32) @ mix  # strongly correlated input features
    w = torch.randn(16, 32)
    acc = HessianAccumulator()
    acc.add(LINEAR.input_columns({}, tuple(w.shape), x))
    scale = w.abs().amax(1) / 7
    q_gptq = gptq_round(w.unsqueeze(0), acc.result(), scale.unsqueeze(0).double(), -7, 7)[0].float()
    q_rtn = torch.clamp(torch.round(w / scale[:, None]), -7, 7)
    err = [((x @ (q * scale[:, None]).T - x @ w.T) ** 2).mean().item() for q in (q_gptq, q_rtn)]
    assert err[0] < 0.7 * err[1]
    assert q_gptq.abs().max() <= 7


def _gptq_column_by_column(w: torch.Tensor, h: torch.Tensor, scale: torch.Tensor, qmin: int, qmax: int) -> torch.Tensor:
    """GPTQ as the paper states it, one column at a time (no blocks), for `gptq_round` to match."""
    w, h = w.double().clone(), h.double().clone()
    diag = torch.diagonal(h, dim1=1, dim2=2)
    dead = diag == 0
    diag[dead] = 1.0
    w[dead.unsqueeze(1).expand_as(w)] = 0.0
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(
        h + 0.01 * diag.mean(1)[:, None, None] * torch.eye(h.shape[-1], dtype=h.dtype))), upper=True)
    q = torch.empty_like(w)
    for i in range(w.shape[-1]):
        q[:, :, i] = torch.clamp(torch.round(w[:, :, i] / scale), qmin, qmax)
        err = (w[:, :, i] - q[:, :, i] * scale) / hinv[:, i, i].unsqueeze(1)
        w[:, :, i + 1:] -= err.unsqueeze(2) * hinv[:, i, i + 1:].unsqueeze(1)
    return q


def test_gptq_blocks_give_the_column_by_column_result() -> None:
    torch.manual_seed(1)
    k = 300  # over two blocks of 128 and a partial one
    x = torch.randn(k, k).double().div(k ** 0.5) @ torch.randn(2, k, 2000).double()  # correlated inputs
    x[:, 5] = 0  # a dead input
    h = x @ x.transpose(1, 2) / x.shape[-1]
    w = torch.randn(2, 24, k) * 0.05
    scale = w.abs().amax(-1).double() / 127
    blocked = gptq_round(w, h, scale, -127, 127)
    assert torch.equal(blocked, _gptq_column_by_column(w, h, scale, -127, 127))
    assert not torch.equal(blocked, torch.clamp(torch.round(w / scale[..., None]), -127, 127))  # GPTQ did move


# -- IR, reference executor, simulation ---------------------------------------------------


def test_ir_is_integer_and_round_trips(qgraph: QuantizedGraph, data, tmp_path) -> None:
    for op in qgraph.layers:
        assert op.arrays["weight"].dtype == np.int8 and op.arrays["bias"].dtype == np.int32
        assert np.abs(op.arrays["weight"]).max() <= 127
    qgraph.save(tmp_path)
    loaded = QuantizedGraph.load(tmp_path)
    x = data[1][:8]
    for k, v in run_reference(qgraph, x, integer_outputs=True).items():
        np.testing.assert_array_equal(run_reference(loaded, x, integer_outputs=True)[k], v)


def test_reference_fast_path_is_exact(qgraph: QuantizedGraph, data, monkeypatch) -> None:
    x = data[1][:16] * 4  # large inputs: saturation everywhere
    fast = run_reference(qgraph, x, integer_outputs=True)
    monkeypatch.setattr(_layer, "exact_float", lambda *_: np.float64)
    slow = run_reference(qgraph, x, integer_outputs=True)
    for k in fast:
        np.testing.assert_array_equal(fast[k], slow[k])


def test_int8_fidelity_and_simulation_agree_with_reference(graph: Graph, qgraph: QuantizedGraph, data) -> None:
    x = data[1]
    fp32 = run_graph(graph, torch.from_numpy(x))[graph.outputs[0]].numpy()
    ref = run_reference(qgraph, x)[graph.outputs[0]]
    sim = simulate(graph, qgraph, torch.from_numpy(x))[graph.outputs[0]].numpy()
    assert (ref.argmax(1) == fp32.argmax(1)).mean() >= 0.9
    sqnr = 10 * np.log10((fp32**2).sum() / ((ref - fp32) ** 2).sum())
    assert sqnr > 20
    assert (sim.argmax(1) == ref.argmax(1)).mean() >= 0.95
    np.testing.assert_allclose(sim, ref, atol=0.05 * np.abs(fp32).max())


def test_int4_plan_gives_int4_weights(graph: Graph, data) -> None:
    plan = BitPlan.uniform(graph, 8)
    first = graph.layers[1].name
    plan.bits[first] = 4
    qg = quantize(graph, data[0][:16], QuantConfig(), plan)
    assert np.abs(qg.op(first).arrays["weight"]).max() <= 7
    assert qg.bit_plan()[first] == 4
    assert qg.weight_bytes() < quantize(graph, data[0][:16]).weight_bytes()


def test_7_bit_weights_are_int8_on_the_narrow_grid(graph: Graph, data) -> None:
    # --bits 7: int8 values in [-63, 63] (the u8 x s8 byte pairs' exact grid), each stored in a byte
    qg = quantize(graph, data[0][:16], QuantConfig(bits=7), BitPlan.uniform(graph, 7))
    weights = [op.arrays["weight"] for op in qg.layers]
    assert all(w.dtype == np.int8 and np.abs(w).max() == 63 for w in weights)
    assert qg.weight_bytes() == quantize(graph, data[0][:16]).weight_bytes()
    with pytest.raises(LowbitError, match="--bits 6"):
        QuantConfig(bits=6)


def test_quantize_is_deterministic(graph: Graph, data) -> None:
    a = quantize(graph, data[0][:16])
    b = quantize(graph, data[0][:16])
    for op_a, op_b in zip(a.ops, b.ops, strict=True):
        for k in op_a.arrays:
            np.testing.assert_array_equal(op_a.arrays[k], op_b.arrays[k])


def test_avgpool_and_maxpool_integer_semantics() -> None:
    class Pools(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return F.avg_pool2d(F.max_pool2d(x, 2), 2, padding=1).flatten(1)

    g = capture(torch.export.export(Pools(), (torch.zeros(1, 2, 8, 8),)))
    calib = np.random.default_rng(0).standard_normal((8, 2, 8, 8)).astype(np.float32)
    qg = quantize(g, calib, QuantConfig(calib_method="minmax"))
    x = calib[:4]
    expected = run_graph(g, torch.from_numpy(x))[g.outputs[0]].numpy()
    got = run_reference(qg, x)[g.outputs[0]]
    scale = qg.values[qg.int_outputs[0]].scale
    assert np.abs(got - expected).max() <= 2 * scale
