"""A tiny random BERT quantized end to end: `model.int.onnx` in ONNX Runtime and the TVM build give the reference
executor's integers bit for bit on padded inputs (every encoder op on real activations, not only the conformance
suite's random ones), `model.int.onnx` holds no float tensor, and `model.onnx` (QDQ) stays close to the reference.
Each runs plain and SmoothQuant-ed (`smooth`, alpha 0.8: per-channel gelu tables and residual adds)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from test_bert_capture import TINY  # pytest puts tests/ on the path (no package there)

from lowbit.codegen.onnx import export_integer, export_qdq
from lowbit.codegen.onnx.check import float_tensors_between
from lowbit.errors import LowbitError
from lowbit.ir import QuantizedGraph
from lowbit.models.bert import BertConfig, BertEncoder
from lowbit.quantizer.capture import capture
from lowbit.quantizer.config import QuantConfig
from lowbit.quantizer.quantize import quantize
from lowbit.quantizer.reference import run_reference
from lowbit.quantizer.smooth import smooth

SEQ = 8
BATCH = 2  # the graph's static batch (TVM); ONNX Runtime takes any


def _tokens(rng: np.random.Generator, samples: int) -> dict[str, np.ndarray]:
    """Random ids with padding of every length: rows of 1 to SEQ tokens, then one row of none at all."""
    ids = rng.integers(0, TINY["vocab_size"], (samples, SEQ)).astype(np.int64)
    lengths = rng.integers(1, SEQ + 1, samples)
    lengths[:2] = 1, SEQ
    lengths[-1] = 0
    mask = (np.arange(SEQ)[None, :] < lengths[:, None]).astype(np.int64)
    return {"input_ids": ids, "attention_mask": mask}


@pytest.fixture(scope="module", params=["plain", "smoothed"])
def tiny_ir(request: pytest.FixtureRequest) -> QuantizedGraph:
    torch.manual_seed(0)
    model = BertEncoder(BertConfig.from_dict(TINY, "tiny")).eval()
    example = (torch.randint(0, TINY["vocab_size"], (BATCH, SEQ)), torch.ones(BATCH, SEQ, dtype=torch.int64))
    graph = capture(torch.export.export(model, example), "tiny")
    calib = _tokens(np.random.default_rng(0), 32)
    calib["attention_mask"][-1] = 1  # calibration sentences have tokens
    if request.param == "smoothed":
        graph, _ = smooth(graph, {k: torch.from_numpy(v) for k, v in calib.items()}, 0.8)
    qgraph = quantize(graph, calib)
    assert {"embedding", "add_constant", "layer_norm", "matmul", "softmax", "masked_mean", "permute", "linear",
            "lut", "add"} <= {o.op for o in qgraph.ops}
    per_channel = [o.op for o in qgraph.ops if o.arrays.get("table", np.zeros(1)).ndim == 2
                   or "channel_multiplier" in o.arrays]
    # Each layer: one gelu table per channel, two residual adds rescaling a LayerNorm's output.
    assert per_channel == ([] if request.param == "plain" else ["add", "lut", "add"] * TINY["num_hidden_layers"])
    return qgraph


def _in_batches(fn: Callable[[dict[str, np.ndarray]], np.ndarray], x: dict[str, np.ndarray]) -> np.ndarray:
    return np.concatenate([fn({k: v[i:i + BATCH] for k, v in x.items()}) for i in range(0, len(x["input_ids"]),
                                                                                         BATCH)])


def test_int_onnx_and_tvm_match_the_reference_bit_for_bit_on_padded_inputs(tiny_ir: QuantizedGraph,
                                                                         tmp_path: Path) -> None:
    x = _tokens(np.random.default_rng(1), 8)
    name = tiny_ir.int_outputs[0]
    want = run_reference(tiny_ir, x, integer_outputs=True)[name]
    assert want.dtype == np.int32 and np.all(want[-1] == 0)  # the all-padding row pools nothing

    path = tmp_path / "model.int.onnx"
    export_integer(tiny_ir, path)
    assert float_tensors_between(onnx.load(str(path))) == []
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run([name], x)[0]
    assert got.dtype == want.dtype
    np.testing.assert_array_equal(got, want, err_msg="model.int.onnx in ONNX Runtime")

    pytest.importorskip("tvm")
    from lowbit.codegen.tvm.compile import compile_to
    from lowbit.codegen.tvm.target import DEFAULT_TARGET
    from lowbit.runtime import load

    compile_to(tiny_ir, tmp_path, DEFAULT_TARGET)
    model = load(tmp_path, verify=False)
    got = model.run_integers(**x)[name]
    assert got.dtype == want.dtype
    np.testing.assert_array_equal(got, want, err_msg="TVM")

    # The kernel clamps an id past the table to a real row; the runtime refuses it first, as the reference does.
    ids, mask = x["input_ids"][:BATCH], x["attention_mask"][:BATCH]
    vocab = TINY["vocab_size"]
    assert model.inputs[0]["range"] == [0, vocab - 1]
    for bad in (vocab, -1):
        with pytest.raises(LowbitError, match=rf"input 'input_ids': values .* outside \[0, {vocab - 1}\]"):
            model.run(input_ids=np.where(mask > 0, ids, bad), attention_mask=mask)
    with pytest.raises(LowbitError, match="token ids must lie in"):
        run_reference(tiny_ir, {"input_ids": np.full_like(ids, vocab), "attention_mask": mask})


def test_x86_lowering_fuses_gelu_luts_residual_adds_and_head_permutes(tiny_ir: QuantizedGraph) -> None:
    """On x86 (AVX2) every gelu lut and residual add is computed in the epilogue of the linear before it and every
    head permute is folded into the attention matmuls: none has a kernel of its own (the build above checks the
    integers)."""
    pytest.importorskip("tvm")
    from lowbit.codegen.tvm.compile import layer_kernels
    from lowbit.codegen.tvm.lower import _symbol, lower
    from lowbit.codegen.tvm.target import parse_target

    conv2d, dense, kernel_set = layer_kernels(parse_target("llvm -mcpu=native -num-cores=2"))
    if kernel_set == "portable":
        pytest.skip("the x86 kernels need AVX2")
    lowered = lower(tiny_ir, conv2d, dense, fuse_residuals=True, encoder_threads=2)
    kernels = {gv.name_hint for gv in lowered.mod.functions}
    folded = {_symbol(o.name) for o in tiny_ir.ops if o.op in ("lut", "add", "permute")}
    assert len(folded) == 7 * TINY["num_hidden_layers"] and not kernels & folded
    # layers of one shape share one kernel, named after the first of them
    for kind in ("linear", "matmul"):
        assert kernels & {_symbol(o.name) for o in tiny_ir.ops if o.op == kind}


def test_qdq_model_is_close_to_the_reference(tiny_ir: QuantizedGraph, tmp_path: Path) -> None:
    x = _tokens(np.random.default_rng(2), 8)
    x["attention_mask"][-1] = 1  # a row of no tokens has no direction to compare
    path = tmp_path / "model.onnx"
    export_qdq(tiny_ir, path)
    got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, x)[0]
    want = run_reference(tiny_ir, x)[tiny_ir.outputs[0]]
    cosine = (got * want).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(want, axis=1)
    assert cosine.min() > 0.99, cosine


def test_quantization_ignores_what_padded_positions_hold() -> None:
    """Padded positions never reach the embedding, so calibration ranges, histograms and GPTQ's Hessians leave
    them out: two calibration sets that differ only in their padded token ids give the same integer model."""
    torch.manual_seed(0)
    model = BertEncoder(BertConfig.from_dict(TINY, "tiny")).eval()
    example = (torch.randint(0, TINY["vocab_size"], (BATCH, SEQ)), torch.ones(BATCH, SEQ, dtype=torch.int64))
    graph = capture(torch.export.export(model, example), "tiny")
    calib = _tokens(np.random.default_rng(0), 32)
    calib["attention_mask"][-1] = 1
    padded = calib["attention_mask"] == 0
    other = {**calib, "input_ids": np.where(padded, (calib["input_ids"] + 7) % TINY["vocab_size"], calib["input_ids"])}
    assert padded.any() and not np.array_equal(other["input_ids"], calib["input_ids"])
    for config in (QuantConfig(), QuantConfig(calib_method="minmax", rounding="gptq")):
        a, b = quantize(graph, calib, config), quantize(graph, other, config)
        for op_a, op_b in zip(a.ops, b.ops, strict=True):
            assert op_a.attrs == op_b.attrs, op_a.name
            for key, array in op_a.arrays.items():
                np.testing.assert_array_equal(array, op_b.arrays[key], err_msg=f"{op_a.name}.{key}")
