"""Vector-quantized weights: the format (packing, size, serialization), k-means and GPTQ vector rounding, and the
decoder artifact written with --weights vq2."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from test_llama import write_gguf  # pytest puts tests/ on the path (no package there)

from lowbit.cli.main import lowbit
from lowbit.errors import LowbitError
from lowbit.ir.vq_weights import VQStage, VQWeights, index_bytes, pack_indices, unpack_indices
from lowbit.ir.weight_formats import weights_from_tensors
from lowbit.pipeline.decoder import EMBEDDING, load_decoder_artifact
from lowbit.quantizer.groupwise import gptq_groupwise, hessian_loss
from lowbit.quantizer.vq import VQSpec, assign, vq_quantize, weighted_kmeans
from lowbit.quantizer.weight_only import WeightOnlyConfig
from lowbit.runtime import load
from lowbit.runtime.decoder import WEIGHTS_FILE


def _inputs(tokens: int, k: int, seed: int = 0) -> torch.Tensor:
    """Correlated inputs with a few loud channels, as a decoder's linears see."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, k, generator=g) @ (torch.randn(k, k, generator=g) / k ** 0.5)
    return x * (0.2 + 3 * torch.rand(k, generator=g))


def _hessian(x: torch.Tensor) -> torch.Tensor:
    return (x.T.double() @ x.double()) / x.shape[0]


def _random_vq(out: int = 6, k: int = 24, residual: bool = True, seed: int = 0) -> VQWeights:
    rng = np.random.default_rng(seed)
    stages = [VQStage(rng.integers(-127, 128, (256, 4)).astype(np.int8), np.float32(0.01),
                      rng.integers(0, 256, (out, k // 4)).astype(np.uint16))]
    if residual:
        stages.append(VQStage(rng.integers(-127, 128, (4096, 8)).astype(np.int8), np.float32(0.002),
                              rng.integers(0, 4096, (out, k // 8)).astype(np.uint16)))
    return VQWeights(rng.uniform(0.5, 2, out).astype(np.float32), tuple(stages), k)


# -- the format ---------------------------------------------------------------------------


@pytest.mark.parametrize("bits", [1, 4, 8, 12, 16])
def test_indices_pack_round_trip(bits: int) -> None:
    values = np.random.default_rng(bits).integers(0, 1 << bits, (3, 37)).astype(np.uint16)
    packed = pack_indices(values, bits)
    assert packed.dtype == np.uint8 and packed.shape == (3, index_bytes(37, bits))
    assert np.array_equal(unpack_indices(packed, 37, bits), values)


def test_nbytes_counts_exactly_the_stored_tensors() -> None:
    w = _random_vq()
    stored = {k: v for k, v in w.to_tensors("p.").items() if not k.endswith("layout")}
    assert w.nbytes == sum(a.nbytes for a in stored.values())
    # 6 row scales, 6 rows of 6 one-byte indices + 256 x 4 codebook + scale, 6 rows of 3 12-bit indices
    # (low bytes, then 3 high nibbles in 2 bytes) + 4096 x 8 codebook + scale.
    assert w.nbytes == 4 * 6 + (6 * 6 + 1024 + 4) + (6 * (3 + 2) + 4096 * 8 + 4)


def test_dequantize_is_the_sum_of_the_stages_codewords() -> None:
    w = _random_vq(residual=True)
    main, residual = w.stages
    r, j = 4, 13  # column 13: vector 3 of the main stage (position 1), vector 1 of the residual one (position 5)
    expected = w.row_scale[r] * (main.codebook[main.indices[r, 3], 1] * main.scale
                                 + residual.codebook[residual.indices[r, 1], 5] * residual.scale)
    assert w.dequantize()[r, j] == pytest.approx(float(expected), rel=1e-6)


def test_tensors_round_trip_and_are_told_from_group_wise() -> None:
    w = _random_vq()
    back = weights_from_tensors(w.to_tensors("layer.weight."), "layer.weight.", "f.safetensors")
    assert isinstance(back, VQWeights)
    assert np.array_equal(back.dequantize(), w.dequantize()) and back.nbytes == w.nbytes
    assert np.array_equal(w.take_rows(2, 5).dequantize(), w.dequantize()[2:5])


@pytest.mark.parametrize(("key", "change", "message"), [
    ("codebook0", lambda a: a[:-1], "codebook0' is int8 \\[255, 4\\]"),
    ("indices1", lambda a: a.astype(np.int16), "indices1' is int16"),
    ("row_scales", lambda a: np.full_like(a, np.nan), "row scales must be finite"),
    ("codebook_scale1", lambda a: -a, "codebook 1 scale"),
    ("layout", lambda a: a[:-1], "layout"),
    ("layout", lambda a: np.array([6, 24, 1, 5, 8], np.int64), "stage 0 has vectors of 5"),
    ("codebook1", None, "lack the tensor 'w.codebook1'"),
])
def test_a_corrupt_tensor_is_refused_by_name(key: str, change, message: str) -> None:
    tensors = _random_vq().to_tensors("w.")
    if change is None:
        del tensors[f"w.{key}"]
    else:
        tensors[f"w.{key}"] = change(tensors[f"w.{key}"])
    with pytest.raises(LowbitError, match=message) as info:
        VQWeights.from_tensors(tensors, "w.", "weights.safetensors")
    assert "weights.safetensors" in str(info.value)


def test_bad_specs_are_refused() -> None:
    with pytest.raises(ValueError, match="index bits"):
        VQSpec(index_bits=17)
    with pytest.raises(ValueError, match="do not tile"):
        vq_quantize(torch.randn(4, 10), VQSpec(vector=4))
    with pytest.raises(LowbitError, match="give a VQSpec"):
        WeightOnlyConfig(vq="vq2")  # type: ignore[arg-type]


# -- the algorithm ------------------------------------------------------------------------


def test_weighted_kmeans_beats_unweighted_on_the_weighted_loss() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4000, 4, generator=g)
    weights = torch.tensor([100.0, 1.0, 1.0, 0.01]).expand(4000, 4)

    def loss(c: torch.Tensor) -> float:
        return float((weights * (x - c[assign(x, weights, c)]) ** 2).sum())

    assert loss(weighted_kmeans(x, 16, weights)) < 0.7 * loss(weighted_kmeans(x, 16))


def test_error_feedback_lowers_the_hessian_loss() -> None:
    k = 64
    h = _hessian(_inputs(2048, k))
    w = torch.randn(48, k, generator=torch.Generator().manual_seed(1))
    spec = VQSpec(vector=4, index_bits=6)
    plain = hessian_loss(w, vq_quantize(w, spec).dequantize(), h)
    weighted = hessian_loss(w, vq_quantize(w, spec, h, feedback=False).dequantize(), h)
    feedback = hessian_loss(w, vq_quantize(w, spec, h).dequantize(), h)
    act_order = hessian_loss(w, vq_quantize(w, spec, h, act_order=True).dequantize(), h)
    assert feedback < 0.9 * weighted and weighted < 0.8 * plain
    assert act_order < 0.9 * weighted  # the vectors' order is undone in storage
    residual = vq_quantize(w, VQSpec(vector=4, index_bits=6, residual_bits=4), h)
    assert hessian_loss(w, residual.dequantize(), h) < 0.6 * feedback
    # Same index bits per weight as int2 (1.5 + 0.5 here), a lower loss than GPTQ's int2 in groups of 32.
    assert hessian_loss(w, vq_quantize(w, VQSpec(vector=4, index_bits=8), h).dequantize(), h) < \
        hessian_loss(w, gptq_groupwise(w, h, 2, 32, act_order=True).dequantize(), h)


# -- the decoder artifact -----------------------------------------------------------------


try:
    import tvm  # noqa: F401

    TVM = True
except ImportError:
    TVM = False


def test_vq2_artifact_round_trips(tmp_path: Path) -> None:
    gguf = tmp_path / "tiny.gguf"
    write_gguf(gguf)
    calib = tmp_path / "calib.txt"
    calib.write_text("The quick brown fox jumps over the lazy dog. " * 40)
    out = tmp_path / "vq2"
    runner = CliRunner()
    result = runner.invoke(lowbit, ["quantize", str(gguf), "-o", str(out), "--weights", "vq2", "--calib", str(calib)])
    assert result.exit_code == 0, result.output
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["weights"]["vq"]["index_bits"] == 8 and manifest["weights"]["rounding"] == "gptq"
    report = json.loads((out / "report.json").read_text())
    assert report["weights"].startswith("vq v4 k256 gptq")
    from safetensors.numpy import load_file

    arrays = load_file(str(out / WEIGHTS_FILE))
    assert "layers.0.mlp.down_proj.weight.codebook0" in arrays and f"{EMBEDDING}.qweight" in arrays
    # The numpy runtime (no torch) and the torch model read the same weights.
    model, tokenizer = load_decoder_artifact(out)
    ids = tokenizer.encode("the theme of the thin thing")
    with torch.inference_mode():
        expected = model(torch.from_numpy(ids[None, :]))[0].numpy()
    got = load(out, backend="numpy").logits(ids)
    assert np.abs(got - expected).max() <= 1e-4 * np.abs(expected).max()
    assert "tvm" in report or not TVM  # with TVM, the VQ GEMV's build is checked against this runtime at save
    result = runner.invoke(lowbit, ["quantize", str(gguf), "-o", str(tmp_path / "b"), "--weights", "vq3",
                                    "--group", "32"])
    assert result.exit_code != 0 and "are for group-wise integer weights" in result.output
