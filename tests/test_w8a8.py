"""W8A8 decoders: per-token int8 activations (`ir.token_int8`), its torch twin, SmoothQuant's migration, and
`lowbit quantize --weights w8a8` on the tiny GGUF of test_llama.py."""

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
from lowbit.ir.groupwise_weights import GroupWiseWeights
from lowbit.ir.token_int8 import EXACT_COLUMNS, QMAX, Int8TokenLinear, quantize_tokens
from lowbit.pipeline.decoder import load_decoder_artifact
from lowbit.quantizer.activation_quant import fake_quantize_tokens
from lowbit.quantizer.weight_only import WeightOnlyConfig
from lowbit.quantizer.weight_smoothing import SmoothFold, choose_smoothquant_scale
from lowbit.runtime import load

CALIBRATION = "The quick brown fox jumps over the lazy dog. " * 40


def _weights(rng: np.random.Generator, out: int, k: int, group: int) -> GroupWiseWeights:
    groups = -(-k // group)
    return GroupWiseWeights(rng.integers(0, 256, (out, k), dtype=np.uint8),
                            rng.uniform(0.001, 0.01, (out, groups)).astype(np.float32),
                            rng.integers(0, 256, (out, groups), dtype=np.uint8), 8, group)


def test_quantize_tokens() -> None:
    x = np.random.default_rng(0).normal(size=(6, 40)).astype(np.float32)
    x[3] = 0
    q, s = quantize_tokens(x)
    assert q.dtype == np.int8 and np.abs(q).max() <= QMAX
    assert s[3] == 1 and not q[3].any()
    live = [0, 1, 2, 4, 5]
    assert (np.abs(q[live]).max(1) == QMAX).all()  # each row's largest entry lands on the grid's end
    assert np.abs(q * s[:, None] - x).max() <= s.max() / 2 * (1 + 1e-6)


def test_torch_twin_rounds_the_same() -> None:
    x = np.random.default_rng(1).normal(size=(64, 96)).astype(np.float32) * 3
    x[5, 7] = 40.0  # an outlier row
    q, s = quantize_tokens(x)
    np.testing.assert_array_equal(fake_quantize_tokens(torch.from_numpy(x)).numpy(), q * s[:, None])


@pytest.mark.parametrize("k,group", [(96, 32), (1536, 1536), (100, 128)])
def test_int8_linear_is_the_integer_product(k: int, group: int) -> None:
    rng = np.random.default_rng(k)
    w = _weights(rng, 24, k, group)
    x = rng.normal(size=(5, k)).astype(np.float32)
    q, s = quantize_tokens(x)
    zero = np.repeat(w.zero.astype(np.int64), group, axis=1)[:, :k]
    y = np.zeros((5, 24))
    for g, start in enumerate(range(0, k, group)):
        cols = slice(start, start + group)
        acc = q[:, cols].astype(np.int64) @ (w.values[:, cols].astype(np.int64) - zero[:, cols]).T  # exact
        y += acc.astype(np.float64) * w.scale[:, g].astype(np.float64)
    np.testing.assert_array_equal(Int8TokenLinear(w)(x), (y * s[:, None].astype(np.float64)).astype(np.float32))


def test_int8_linear_exact_at_the_largest_sums() -> None:
    """Every product at its extreme (127 * 255) over more than EXACT_COLUMNS columns: float32 alone would round."""
    k = 3 * EXACT_COLUMNS
    w = GroupWiseWeights(np.full((8, k), 255, np.uint8), np.ones((8, 1), np.float32), np.zeros((8, 1), np.uint8),
                         8, k)
    y = Int8TokenLinear(w)(np.full((2, k), 2.0, np.float32))  # q = 127 everywhere, s = 2 / 127
    expected = np.float32(np.float64(QMAX * 255 * k) * np.float64(np.float32(2.0) / np.float32(QMAX)))
    assert (y == expected).all()


def test_int8_linear_refuses_other_formats() -> None:
    w = _weights(np.random.default_rng(2), 8, 32, 16)
    with pytest.raises(LowbitError, match="8-bit"):
        Int8TokenLinear(GroupWiseWeights(w.values % 16, w.scale, w.zero % 16, 4, 16))


def test_smoothquant_migration_lowers_the_w8a8_error() -> None:
    """An outlier input channel (as LLM activations have) makes per-token int8 coarse for every other channel;
    migrating it into the weights lowers the output error, and the choice is never worse than no smoothing."""
    torch.manual_seed(0)
    norm = torch.nn.Linear(1, 64)  # stands for the RMSNorm: its weight's first dimension is the channels
    linear = torch.nn.Linear(64, 48, bias=False)
    x = torch.randn(512, 64)
    x[:, 3] *= 60
    fold = SmoothFold("test", (linear,), norm)
    config = WeightOnlyConfig(bits=8, group=0, rounding="rtn", activation_bits=8)
    choice = choose_smoothquant_scale(linear.weight.detach(), x, fold, config.round)
    assert choice.alpha is not None and choice.loss < 0.5 * choice.loss_unsmoothed
    assert choice.scale[3] == choice.scale.max()  # the outlier channel is divided the most


def test_config_refuses_w8a8_without_int8_weights() -> None:
    with pytest.raises(LowbitError, match="W8A8"):
        WeightOnlyConfig(bits=4, activation_bits=8)
    with pytest.raises(LowbitError, match="activation_bits"):
        WeightOnlyConfig(bits=8, activation_bits=4)
    assert WeightOnlyConfig(bits=8, group=0, activation_bits=8).describe().startswith("W8A8")


@pytest.fixture(scope="module")
def w8a8_artifact(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("w8a8")
    gguf, calib = root / "tiny.gguf", root / "calib.txt"
    write_gguf(gguf)
    calib.write_text(CALIBRATION)
    out = root / "tiny-w8a8"
    result = CliRunner().invoke(lowbit, ["quantize", str(gguf), "-o", str(out), "--weights", "w8a8", "--rounding",
                                         "nearest", "--calib", str(calib)])
    assert result.exit_code == 0, result.output
    return out


def test_w8a8_artifact(w8a8_artifact: Path) -> None:
    out = w8a8_artifact
    report = json.loads((out / "report.json").read_text())
    assert report["weights"].startswith("W8A8") and "smoothing" in report
    assert json.loads((out / "manifest.json").read_text())["weights"]["activation_bits"] == 8
    assert not (out / "decoder.onnx").exists() and "tvm" not in report  # neither has per-token int8 activations
    markdown = (out / "report.md").read_text()
    assert "W8A8" in markdown and "Computed in float32" in markdown and "per-token activation scale" in markdown


def test_w8a8_runtime_matches_the_torch_model(w8a8_artifact: Path) -> None:
    """The numpy runtime's integer linears against the torch model with fake-quantized inputs (float32 sums: a
    token whose x / s lands near a rounding tie can round the other way, hence the tolerance)."""
    model, tokenizer = load_decoder_artifact(w8a8_artifact)
    runtime = load(w8a8_artifact, backend="numpy")
    ids = tokenizer.encode("the theme of the thin thing")
    with torch.inference_mode():
        expected = model(torch.from_numpy(ids[None, :]))[0].numpy()
        for module in model.modules():  # the same model without the activation quantization differs more
            module._forward_pre_hooks.clear()
        float_activations = model(torch.from_numpy(ids[None, :]))[0].numpy()
    got = runtime.logits(ids)
    scale = np.abs(expected).max()
    assert np.abs(got - expected).max() <= 1e-3 * scale
    assert np.abs(float_activations - expected).max() > 10 * np.abs(got - expected).max()
    assert runtime.generate("the theme", max_new_tokens=3).token_ids


def test_w8a8_refuses_plans_and_float_minimums(tmp_path: Path) -> None:
    gguf = tmp_path / "tiny.gguf"
    write_gguf(gguf)
    result = CliRunner().invoke(lowbit, ["quantize", str(gguf), "-o", str(tmp_path / "a"), "--weights", "w8a8",
                                         "--zero-point", "float"])
    assert result.exit_code != 0 and "w8a8" in result.output
    assert not (tmp_path / "a").exists()
