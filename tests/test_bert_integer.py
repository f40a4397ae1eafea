"""The encoder's integer lowering: a tiny random BERT quantized to an integer-only IR, each new op's integers
against an independent float formula, and the calibration data checks for models with several inputs."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lowbit.errors import LowbitError
from lowbit.ir import QuantizedGraph
from lowbit.ir.ops.embedding import quantize_rows
from lowbit.models.bert import BertConfig, BertEncoder
from lowbit.quantizer.capture import capture
from lowbit.quantizer.config import QuantConfig
from lowbit.quantizer.graph import Graph, run_graph
from lowbit.quantizer.inputs import model_inputs
from lowbit.quantizer.quantize import quantize
from lowbit.quantizer.reference import run_reference

TINY = {"architectures": ["BertModel"], "model_type": "bert", "hidden_size": 32, "intermediate_size": 64,
        "num_attention_heads": 4, "num_hidden_layers": 2, "max_position_embeddings": 16, "vocab_size": 50,
        "type_vocab_size": 2}
SEQ = 12


def _tokens(rng: np.random.Generator, n: int) -> dict[str, np.ndarray]:
    """Random ids with a random amount of padding per row (at least one real token)."""
    lengths = rng.integers(1, SEQ + 1, n)
    mask = (np.arange(SEQ)[None, :] < lengths[:, None]).astype(np.int64)
    return {"input_ids": rng.integers(1, 50, (n, SEQ)) * mask, "attention_mask": mask}


@pytest.fixture(scope="module")
def tiny() -> tuple[Graph, QuantizedGraph]:
    torch.manual_seed(0)
    model = BertEncoder(BertConfig.from_dict(TINY, "tiny")).eval()
    example = _tokens(np.random.default_rng(0), 2)
    graph = capture(torch.export.export(model, tuple(torch.from_numpy(v) for v in example.values())), "tiny")
    config = QuantConfig(calib_method="minmax", rounding="nearest", bias_correction=False)
    return graph, quantize(graph, _tokens(np.random.default_rng(1), 32), config)


def _run(qgraph: QuantizedGraph, x: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Every intermediate integer tensor of the reference executor (its env)."""
    from lowbit.ir.ops import OPS

    env = dict(x)
    for op in qgraph.ops:
        env[op.output] = OPS[op.op].reference(op, [env[i] for i in op.inputs], qgraph)
    return env


def test_tiny_bert_lowers_to_an_integer_only_graph_close_to_float(tiny) -> None:
    graph, qgraph = tiny
    x = _tokens(np.random.default_rng(2), 16)
    ints = {n for n, v in qgraph.values.items() if v.dtype != "float32"}
    assert set(qgraph.values) - ints == set(graph.outputs)  # only the pooled embedding is float
    assert {qgraph.values[i].dtype for i in graph.inputs} == {"int64"}
    kinds = {o.op for o in qgraph.ops}
    assert {"embedding", "add_constant", "layer_norm", "matmul", "softmax", "masked_mean", "permute"} <= kinds
    for op in qgraph.ops:  # LayerNorm reads int16, softmax the raw int32 scores
        if op.op == "layer_norm":
            assert qgraph.values[op.inputs[0]].dtype == "int16"
        if op.op == "softmax":
            assert qgraph.values[op.inputs[0]].dtype == "int32" and qgraph.values[op.output].dtype == "uint8"
    got = run_reference(qgraph, x)[graph.outputs[0]]
    want = run_graph(graph, {k: torch.from_numpy(v) for k, v in x.items()})[graph.outputs[0]].numpy()
    cos = (got * want).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(want, axis=1)
    assert cos.min() > 0.98, cos


def test_each_encoder_op_matches_its_float_formula(tiny) -> None:
    graph, qgraph = tiny
    x = _tokens(np.random.default_rng(3), 8)
    env = _run(qgraph, x)
    deq = {n: env[n].astype(np.float64) * np.float64(v.scale) for n, v in qgraph.values.items()
           if n in env and v.dtype != "float32" and v.dtype != "int64" and v.axis is None}
    for op in qgraph.ops:
        out = qgraph.values[op.output]
        if op.op == "embedding":  # the int8 row's rounding plus the int16 output's
            table = graph.params[f"{op.name}.table"].double().numpy()
            _, row_scale, _ = quantize_rows(table)
            ids = x[op.inputs[0]]
            bound = row_scale[ids][..., None] / 2 + out.scale / 2 + 1e-9
            assert (np.abs(deq[op.output] - table[ids]) <= bound).all()
        elif op.op == "add_constant":  # one rounding of the exact sum
            c = graph.params[f"{op.name}.constant"].double().numpy()
            assert np.abs(deq[op.output] - (deq[op.inputs[0]] + c)).max() <= out.scale * 0.5 + 1e-9
        elif op.op == "matmul" and out.dtype == "int32":  # the exact product of the integers
            a, b = (env[i].astype(np.int64) for i in op.inputs)
            assert np.array_equal(env[op.output], np.einsum("...mk,...kn->...mn", a, b))
        elif op.op == "masked_mean":
            keep = x["attention_mask"][:, :, None]
            mean = (deq[op.inputs[0]] * keep).sum(1) / np.maximum(keep.sum(1), 1)
            assert np.abs(env[op.output] * np.float64(out.scale) - mean).max() <= out.scale * 0.5 + 1e-12
        elif op.op == "permute":
            assert np.array_equal(env[op.output], np.transpose(env[op.inputs[0]], op.attrs["dims"]))


def test_masked_mean_of_an_all_padding_row_is_zero(tiny) -> None:
    graph, qgraph = tiny
    x = _tokens(np.random.default_rng(4), 3)
    x["attention_mask"][1] = 0
    got = run_reference(qgraph, x)[graph.outputs[0]]
    assert np.all(got[1] == 0) and np.abs(got[0]).max() > 0


def test_token_ids_out_of_the_vocabulary_are_refused(tiny) -> None:
    _, qgraph = tiny
    x = _tokens(np.random.default_rng(5), 2)
    x["input_ids"][0, 0] = 50
    with pytest.raises(LowbitError, match=r"token ids must lie in \[0, 50\)"):
        run_reference(qgraph, x)


def test_calibration_data_for_several_inputs_is_checked(tiny) -> None:
    graph, _ = tiny
    good = _tokens(np.random.default_rng(6), 4)
    assert model_inputs(graph, good, "calib").arrays["input_ids"].dtype == np.int64
    with pytest.raises(LowbitError, match="takes 2 inputs"):
        model_inputs(graph, good["input_ids"], "calib")
    with pytest.raises(LowbitError, match="the data has input_ids"):
        model_inputs(graph, {"input_ids": good["input_ids"]}, "calib")
    with pytest.raises(LowbitError, match="different sample counts"):
        model_inputs(graph, {**good, "attention_mask": good["attention_mask"][:3]}, "calib")
    with pytest.raises(LowbitError, match="input input_ids: integer data"):
        model_inputs(graph, {**good, "input_ids": good["input_ids"].astype(np.float32)}, "calib")
    with pytest.raises(LowbitError, match=r"input attention_mask: calibration data has shape \(4, 5\)"):
        model_inputs(graph, {**good, "attention_mask": good["attention_mask"][:, :5]}, "calib")
    with pytest.raises(LowbitError, match="empty"):
        model_inputs(graph, {k: v[:0] for k, v in good.items()}, "calib")
