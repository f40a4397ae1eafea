"""`decoder.onnx`: the ONNX export of a decoder artifact (MatMulNBits), run in ONNX Runtime against the numpy runtime.

A tiny random-weight Llama whose hidden size (40) and MLP width (48) are not multiples of the group (16), so every
linear and the int8 g32 embedding / LM head have a tail group, the case MatMulNBits pads.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from test_llama import TINY, write_gguf  # pytest puts tests/ on the path (no package there)

import lowbit.codegen.onnx.decoder as onnx_decoder
from lowbit.codegen.onnx.decoder import (
    EMBEDDING,
    OrtDecoder,
    check_decoder_onnx,
    decoder_onnx,
    fits_matmul_nbits,
    matmul_nbits_tensors,
    save_decoder_onnx,
)
from lowbit.errors import LowbitError
from lowbit.ir.groupwise_weights import GroupWiseWeights
from lowbit.models.llama import load_llama_gguf
from lowbit.models.llama_config import LlamaConfig
from lowbit.pipeline.decoder import MANIFEST, DecoderArtifact, round_decoder
from lowbit.pipeline.decoder_onnx import ONNX_FILE, artifact_weights
from lowbit.quantizer.weight_only import WeightOnlyConfig
from lowbit.runtime.decoder import DecoderModel

TAIL = LlamaConfig(**{**dataclasses.asdict(TINY), "hidden_size": 40, "intermediate_size": 48})


def make_artifact(gguf: Path, out: Path, bits: int = 4, group: int = 16) -> Path:
    model, tokenizer = load_llama_gguf(gguf)
    quant = WeightOnlyConfig(bits=bits, group=group, rounding="rtn")
    weights = round_decoder(model, tokenizer, quant, "")
    tensors = {n: p.detach().numpy().copy() for n, p in model.named_parameters() if n not in weights}
    report = {"model": "tiny", "weights": quant.describe(), "linear_bits_per_weight": float(bits),
              "embedding": "int8 g32", "model_bytes": 0, "float_bytes": 0, "perplexity": {}, "timings_s": {}}
    return DecoderArtifact(model.config, tokenizer.vocab, weights, tensors, quant, report).save(out)


@pytest.fixture(scope="module")
def tail_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("gguf") / "tail.gguf"
    write_gguf(path, TAIL, quantize=False)  # Q8_0 needs rows of whole 32-blocks
    return path


@pytest.fixture(scope="module")
def artifact(tail_gguf: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_artifact(tail_gguf, tmp_path_factory.mktemp("out") / "int4")


def test_export_runs_in_ort_and_matches_the_numpy_runtime(artifact: Path) -> None:
    manifest = json.loads((artifact / MANIFEST).read_text())
    assert ONNX_FILE in manifest["files"]
    linears = manifest["onnx"]["linears"]
    assert linears.pop("MatMulNBits bits 4 block_size 16") == 2 * 7
    assert list(linears) == [next(k for k in linears if k.startswith("float MatMul (dequantized int8 g32"))]
    check = manifest["onnx"]["check_against_numpy_runtime"]
    assert check["max_abs_diff"] <= check["tolerance"] * check["max_abs_logit"]
    ops = [n.op_type for n in onnx.load(str(artifact / ONNX_FILE)).graph.node]
    assert ops.count("MatMulNBits") == 2 * 7  # the float MatMuls: attention's and the int8 LM head
    runtime, ort = DecoderModel(artifact), OrtDecoder(artifact / ONNX_FILE, threads=1)
    ids = runtime.tokenizer.encode("the theme of the thin thing in the thick")
    expected = runtime.logits(ids)
    # A prefill, then one token at a time through the ORT cache (its present tensors fed back as past).
    cache = ort.new_cache()
    got = np.concatenate([ort.logits(ids[:4], cache)] + [ort.logits(ids[j:j + 1], cache) for j in range(4, len(ids))])
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5 * np.abs(expected).max())
    assert cache[0][0].shape == (1, TAIL.num_kv_heads, len(ids), TAIL.head_dim)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_matmul_nbits_packing_is_groupwise_weights_own(bits: int) -> None:
    import onnxruntime as ort

    rng = np.random.default_rng(bits)
    out, k, group = 24, 40, 16  # 2.5 groups: a tail group of 8 columns
    w = GroupWiseWeights(rng.integers(0, 1 << bits, (out, k), dtype=np.uint8),
                         rng.uniform(0.01, 0.1, (out, 3)).astype(np.float32),
                         rng.integers(0, 1 << bits, (out, 3), dtype=np.uint8), bits, group)
    b, scales, zeros = matmul_nbits_tensors(w)
    stored = w.to_tensors()
    row_bytes = stored["qweight"].shape[1]
    # The artifact's bytes, each row padded with zeros to whole blocks; zero points and scales as stored.
    assert b.shape == (out, 3, group * bits // 8)
    np.testing.assert_array_equal(b.reshape(out, -1)[:, :row_bytes], stored["qweight"])
    assert not b.reshape(out, -1)[:, row_bytes:].any()
    np.testing.assert_array_equal(zeros, stored["qzeros"].reshape(-1))
    np.testing.assert_array_equal(scales, stored["scales"].reshape(-1))
    node = helper.make_node("MatMulNBits", ["x", "b", "s", "z"], ["y"], domain="com.microsoft", K=k, N=out,
                            bits=bits, block_size=group)
    graph = helper.make_graph([node], "one", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, out])],
                              [numpy_helper.from_array(a, n) for a, n in ((b, "b"), (scales, "s"), (zeros, "z"))])
    opsets = [helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)]
    model = helper.make_model(graph, opset_imports=opsets, ir_version=10)
    x = rng.standard_normal((3, k)).astype(np.float32)
    y = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    expected = x @ w.dequantize().T
    np.testing.assert_allclose(y, expected, rtol=0, atol=1e-5 * np.abs(expected).max())


def test_three_bits_export_as_float_matmuls(tail_gguf: Path, tmp_path: Path) -> None:
    artifact = make_artifact(tail_gguf, tmp_path / "int3", bits=3)
    manifest = json.loads((artifact / MANIFEST).read_text())
    linears = manifest["onnx"]["linears"]
    assert sum(v for key, v in linears.items() if key.startswith("float MatMul (dequantized int3 g16")) == 14
    _, weights = artifact_weights(artifact)
    assert not any(fits_matmul_nbits(w) for w in weights.values() if isinstance(w, GroupWiseWeights) and w.bits == 3)


def test_a_mismatch_is_refused_and_nothing_written(tail_gguf: Path, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    real = onnx_decoder.matmul_nbits_tensors

    def wrong_zero_points(w: GroupWiseWeights) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        b, scales, zeros = real(w)
        return b, scales, zeros ^ np.uint8(1)  # every first zero point off by one

    monkeypatch.setattr(onnx_decoder, "matmul_nbits_tensors", wrong_zero_points)
    with pytest.raises(LowbitError, match="differ from the numpy runtime"):
        make_artifact(tail_gguf, tmp_path / "bad")
    assert not any(tmp_path.iterdir())


def test_check_compares_with_the_reference(artifact: Path) -> None:
    runtime = DecoderModel(artifact)
    ids = runtime.tokenizer.encode("the thin thing")
    result = check_decoder_onnx(artifact / ONNX_FILE, runtime.logits, ids)
    assert result["tokens"] == len(ids) and result["max_abs_diff"] <= 1e-4 * result["max_abs_logit"]
    with pytest.raises(LowbitError, match="differ from the numpy runtime"):
        check_decoder_onnx(artifact / ONNX_FILE, lambda i: runtime.logits(i) * 1.01, ids)


@pytest.mark.parametrize(("bits", "accuracy_level"), [(2, 0), (4, 0), (8, 4)])
def test_packed_embedding_gather(artifact: Path, tmp_path: Path, bits: int, accuracy_level: int) -> None:
    """A packed tied embedding: its rows unpacked in the graph equal the dequantized table's (the LM head reads
    the same packed bytes through MatMulNBits)."""
    import torch

    config, weights = artifact_weights(artifact)
    table = weights[EMBEDDING]
    packed = WeightOnlyConfig(bits=bits, group=16, rounding="rtn").round(torch.from_numpy(
        table.dequantize() if isinstance(table, GroupWiseWeights) else table), None)
    assert fits_matmul_nbits(packed, accuracy_level)
    float_weights = {k: w.dequantize() if isinstance(w, GroupWiseWeights) else w for k, w in weights.items()}
    save_decoder_onnx(decoder_onnx(config, {**weights, EMBEDDING: packed}, accuracy_level), tmp_path / "packed.onnx")
    save_decoder_onnx(decoder_onnx(config, {**float_weights, EMBEDDING: packed.dequantize()}), tmp_path / "float.onnx")
    ids = np.arange(3, 40, 5)
    got = OrtDecoder(tmp_path / "packed.onnx", threads=1).logits(ids)
    expected = OrtDecoder(tmp_path / "float.onnx", threads=1).logits(ids)
    # int8 activations (accuracy_level 4) move the logits; float arithmetic only rounds differently.
    tolerance = 0.1 if accuracy_level else 1e-5
    np.testing.assert_allclose(got, expected, rtol=0, atol=tolerance * np.abs(expected).max())


@pytest.mark.parametrize("preset", ["vq2", "vq3"])
def test_vq_exports_its_indices_not_a_float_table(tail_gguf: Path, tmp_path: Path, preset: str) -> None:
    """VQ linears (and the int8 LM head) go to ONNX as their indices / integers, dequantized in the graph; the
    artifact's check (ORT against the numpy runtime) passes and the file holds no float table of a linear."""
    from lowbit.quantizer.vq import VQ_PRESETS

    model, tokenizer = load_llama_gguf(tail_gguf)
    quant = WeightOnlyConfig(vq=VQ_PRESETS[preset], rounding="rtn")
    weights = round_decoder(model, tokenizer, quant, "")
    tensors = {n: p.detach().numpy().copy() for n, p in model.named_parameters() if n not in weights}
    report = {"model": "tiny", "weights": quant.describe(), "linear_bits_per_weight": 2.0, "embedding": "int8 g32",
              "model_bytes": 0, "float_bytes": 0, "perplexity": {}, "timings_s": {}}
    out = DecoderArtifact(model.config, tokenizer.vocab, weights, tensors, quant, report).save(tmp_path / preset)
    check = json.loads((out / MANIFEST).read_text())["onnx"]["check_against_numpy_runtime"]
    assert check["max_abs_diff"] <= check["tolerance"] * check["max_abs_logit"]
    graph = onnx.load(str(out / ONNX_FILE)).graph
    floats = {i.name: i for i in graph.initializer if i.data_type == TensorProto.FLOAT}
    smallest_linear = TAIL.hidden_size * TAIL.kv_dim
    big = [n for n, i in floats.items() if int(np.prod(i.dims)) >= smallest_linear]
    assert all("rope" in n or "codewords" in n for n in big), big  # rotary tables and 256 x 4 codebooks only
    assert any(n.endswith("/indices0") for n in (i.name for i in graph.initializer))
