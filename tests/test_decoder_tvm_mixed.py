"""The TVM decoder on a mixed-precision plan: a tiny random Llama (test_llama.py's GGUF) whose block linears are
int2, int3, int4 and int8, with q/k/v and gate/up of different formats in one layer (split into per-format calls
writing column slices) and of one kernel format in the other (fused, int8 q|k|v and int3|int4 gate|up on the int4
kernel). Its logits against the numpy runtime's, prefill (one 32-row chunk and single rows) then decode steps.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
from test_llama import write_gguf  # pytest puts tests/ on the path (no package there)

pytest.importorskip("tvm", reason="the TVM decode kernels need apache-tvm")

from lowbit.codegen.tvm.decoder import supports  # noqa: E402
from lowbit.codegen.tvm.decoder_linears import kernel_of  # noqa: E402
from lowbit.models.llama import load_llama_gguf  # noqa: E402
from lowbit.pipeline.decoder import TVM_TOLERANCE, quantize_decoder  # noqa: E402
from lowbit.quantizer.weight_only import WeightOnlyConfig  # noqa: E402
from lowbit.runtime import DecoderModel  # noqa: E402
from lowbit.runtime.decoder_tvm import META, TvmDecoder  # noqa: E402

TEXT = "The quick brown fox jumps over the lazy dog. " * 40
PLAN = (("layers.0.self_attn.q_proj", 3), ("layers.0.self_attn.k_proj", 4), ("layers.0.self_attn.v_proj", 8),
        ("layers.0.self_attn.o_proj", 8), ("layers.0.mlp.gate_proj", 8), ("layers.0.mlp.up_proj", 2),
        ("layers.0.mlp.down_proj", 4),
        ("layers.1.self_attn.q_proj", 8), ("layers.1.self_attn.k_proj", 8), ("layers.1.self_attn.v_proj", 8),
        ("layers.1.self_attn.o_proj", 2), ("layers.1.mlp.gate_proj", 3), ("layers.1.mlp.up_proj", 4),
        ("layers.1.mlp.down_proj", 8))


@pytest.fixture(scope="module")
def mixed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    gguf = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    write_gguf(gguf)
    artifact = quantize_decoder(load_llama_gguf(gguf), WeightOnlyConfig(group=16, rounding="rtn", plan=PLAN), TEXT,
                                {"text": TEXT}, model_name="tiny", report_windows=1)
    assert supports(dataclasses.asdict(artifact.config), artifact.weights) is None  # else saved without
    out = tmp_path_factory.mktemp("out") / "mixed"
    artifact.save(out, target="llvm -mcpu=native", onnx=False)  # the build checks its logits too
    return out, artifact.weights


def test_meta_lists_the_calls_of_each_format(mixed: tuple[Path, dict]) -> None:
    out, weights = mixed
    meta = json.loads((out / META).read_text())
    first, second = meta["layers"]
    assert [c["function"] for c in first["qkv"]] == ["int4_k32_n32_g16_of64", "int4_k32_n16_g16_of64",
                                                     "int8_k32_n16_g16_of64"]
    assert [c["col"] for c in first["qkv"]] == [0, 32, 48]
    assert [c["function"] for c in first["gate_up"]] == ["int8_k32_n64_g16_of128", "int4_k32_n64_g16_of128"]
    assert first["o"] == [{"function": "int8_k32_n32_g16_acc", "operands": "layers.0.o", "col": None,
                           "members": ["self_attn.o_proj"], "operand_names": ["w", "scale", "neg_zs"]}]
    assert [(c["function"], c["col"]) for c in second["qkv"]] == [("int8_k32_n64_g16", None)]
    assert [(c["function"], c["col"]) for c in second["gate_up"]] == [("int4_k32_n128_g16", None)]
    assert second["down"][0]["function"] == "int8_k64_n32_g16_acc"
    # every listed function is compiled at both row counts, and nothing else of the linears
    assert set(meta["functions"]) == {c["function"] for layer in meta["layers"] for slot in layer.values()
                                      for c in slot}
    assert {kernel_of(w) for k, w in weights.items() if k.startswith("layers.")} == {"int4", "int8"}


def test_mixed_plan_logits_match_the_numpy_runtime(mixed: tuple[Path, dict]) -> None:
    out, _ = mixed
    report = json.loads((out / "report.json").read_text())
    assert report["tvm"]["check"]["relative"] <= TVM_TOLERANCE
    runner = TvmDecoder(out)
    assert runner.calls_per_token == (5 + 3 + 1 + 2 + 1) + (5 + 1 + 1 + 1 + 1) + 2
    numpy_runtime = DecoderModel(out, backend="numpy")
    ids = np.random.default_rng(2).integers(0, numpy_runtime.config["vocab_size"], 50)
    expected = numpy_runtime.logits(ids)
    got = [runner.prefill(ids[:38])] + [runner.step(int(t)) for t in ids[38:]]
    np.testing.assert_allclose(np.stack(got), expected[37:], rtol=0, atol=TVM_TOLERANCE * np.abs(expected).max())
    again = runner.prefill(ids[:5])  # single rows only, over the cache of the sequence before
    np.testing.assert_allclose(again, expected[4], rtol=0, atol=TVM_TOLERANCE * np.abs(expected).max())


def test_supports_refuses_linears_without_a_kernel(mixed: tuple[Path, dict]) -> None:
    from lowbit.quantizer.vq import VQ_PRESETS, VQSpec, vq_quantize

    _, weights = mixed
    config = {"num_layers": 2, "hidden_size": 32, "intermediate_size": 64, "num_heads": 4, "num_kv_heads": 2,
              "tie_embeddings": True, "context_length": 64}
    assert supports(config, weights) is None
    broken = dict(weights)  # a VQ linear beside an int one: the VQ kernel writes no column slices
    up = np.random.default_rng(0).standard_normal((64, 32))
    broken["layers.1.mlp.up_proj.weight"] = vq_quantize(up, VQ_PRESETS["vq2"])
    assert kernel_of(broken["layers.1.mlp.up_proj.weight"]) == "vq"
    assert "cannot write a column slice" in supports(config, broken)
    # 3-bit indices: no kernel packs them
    broken["layers.1.mlp.up_proj.weight"] = vq_quantize(up, VQSpec(vector=4, index_bits=3, kmeans_points=64))
    assert "1 block linears have no TVM kernel" in supports(config, broken)
    assert kernel_of(broken["layers.1.mlp.up_proj.weight"]) is None
    del broken["layers.1.mlp.up_proj.weight"]
    assert "not quantized (layers.1.mlp.up_proj.weight" in supports(config, broken)


@pytest.mark.parametrize("preset", ["vq2", "vq3"])
def test_vq_artifact_runs_on_the_vq_kernel(preset: str, tmp_path: Path) -> None:
    """Every block linear vector-quantized: q|k|v and gate|up each one call (a codebook per member), logits
    against the numpy runtime."""
    from lowbit.quantizer.vq import VQ_PRESETS

    gguf = tmp_path / "tiny.gguf"
    write_gguf(gguf)
    artifact = quantize_decoder(load_llama_gguf(gguf), WeightOnlyConfig(vq=VQ_PRESETS[preset], rounding="rtn"),
                                TEXT, {"text": TEXT}, model_name="tiny", report_windows=1)
    out = tmp_path / preset
    artifact.save(out, target="llvm -mcpu=native", onnx=False)  # refused unless it matches the numpy runtime
    meta = json.loads((out / META).read_text())
    qkv = meta["layers"][0]["qkv"]
    assert len(qkv) == 1 and qkv[0]["function"].startswith("vq_k32_n64_v4") and qkv[0]["function"].endswith(
        "_s32-16-16")
    assert qkv[0]["operand_names"][:2] == ["row_scale", "codebook0"]
    runner, numpy_runtime = TvmDecoder(out), DecoderModel(out, backend="numpy")
    ids = np.random.default_rng(3).integers(0, numpy_runtime.config["vocab_size"], 40)
    expected = numpy_runtime.logits(ids)
    got = [runner.prefill(ids[:34])] + [runner.step(int(t)) for t in ids[34:]]
    np.testing.assert_allclose(np.stack(got), expected[33:], rtol=0, atol=TVM_TOLERANCE * np.abs(expected).max())
