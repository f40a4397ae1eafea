"""Smoothing before weight-only rounding: the folds keep the model's function, the search never adds proxy error,
and it helps where a few input channels carry large activations."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from lowbit.errors import LowbitError
from lowbit.models.llama import smoothing_folds
from lowbit.quantizer.groupwise import rtn_groupwise
from lowbit.quantizer.weight_only import WeightOnlyConfig, quantize_weights
from lowbit.quantizer.weight_smoothing import SmoothFold, apply_scale, choose_scale, gqa_channels, proxy_loss
from tests.test_llama import tiny_model

IDS = torch.tensor([[3, 70, 200, 9, 41, 260, 5, 18, 99, 7, 120, 33]])


def test_gqa_channels_follow_the_query_heads_kv_head() -> None:
    channels = gqa_channels(num_heads=4, num_kv_heads=2, head_dim=3)
    # query heads 0, 1 read KV head 0; heads 2, 3 read KV head 1
    assert channels.tolist() == [0, 1, 2, 0, 1, 2, 3, 4, 5, 3, 4, 5]


def test_folding_any_scale_keeps_the_models_function() -> None:
    model = tiny_model(torch.float64)
    before = model(IDS)
    generator = torch.Generator().manual_seed(0)
    for block in model.layers:
        for fold in smoothing_folds(block):
            width = fold.source.weight.shape[0]
            scale = torch.exp(torch.randn(width, generator=generator, dtype=torch.float64))
            apply_scale(fold, scale, torch.eye(fold.linears[0].in_features, dtype=torch.float64))
    assert torch.allclose(model(IDS), before, atol=1e-10, rtol=1e-10)


def _outlier_problem(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, SmoothFold]:
    """A weight [64, 128] whose inputs have a few channels 30x larger than the rest (as decoder activations)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2048, 128, generator=g)
    x[:, :4] *= 30
    h = x.T @ x / len(x)
    w = torch.randn(64, 128, generator=g)
    norm = nn.LayerNorm(128)
    return w, h, SmoothFold("test", (nn.Linear(128, 64, bias=False),), norm)


def test_the_search_finds_a_scale_that_lowers_the_output_error_of_4_bit_rounding() -> None:
    w, h, fold = _outlier_problem()
    choice = choose_scale(w, h, fold, lambda m, _h: rtn_groupwise(m, 4, 32))
    plain = proxy_loss(w, torch.from_numpy(rtn_groupwise(w, 4, 32).dequantize()).float(), h)
    assert choice.loss_unsmoothed == pytest.approx(plain, rel=1e-5)
    assert choice.alpha > 0 and choice.loss < 0.8 * plain


def test_the_search_never_adds_proxy_error_and_needs_alpha_0() -> None:
    w, _, fold = _outlier_problem(1)
    h = torch.eye(128)  # white inputs: no channel deserves a finer grid
    choice = choose_scale(w, h, fold, lambda m, _h: rtn_groupwise(m, 4, 32))
    assert choice.loss <= choice.loss_unsmoothed
    with pytest.raises(LowbitError, match="alpha = 0"):
        choose_scale(w, h, fold, lambda m, _h: rtn_groupwise(m, 4, 32), grid=(0.5,))


def test_fold_shapes_are_checked() -> None:
    with pytest.raises(LowbitError, match="input channels"):
        SmoothFold("bad", (nn.Linear(8, 4),), nn.LayerNorm(6))


def test_smoothed_walk_lowers_the_models_output_error() -> None:
    reference = tiny_model(torch.float32)
    with torch.no_grad():  # a few hidden channels with large activations, as in real decoders
        reference.embed_tokens.weight[:, :2] *= 20
    calib = [torch.randint(0, reference.config.vocab_size, (1, 48), generator=torch.Generator().manual_seed(s))
             for s in range(4)]

    def error(smooth: bool) -> float:
        model = tiny_model(torch.float32)
        model.load_state_dict(reference.state_dict())
        record: dict = {}
        quantize_weights(model, list(model.layers), WeightOnlyConfig(bits=3, group=16, rounding="rtn", smooth=smooth),
                         calib, folds=smoothing_folds, smoothing=record)
        assert len(record) == (4 * len(model.layers) if smooth else 0)
        with torch.no_grad():
            return float(np.mean([((model(x) - reference(x)) ** 2).mean() for x in calib]))

    assert error(True) < error(False)


def test_smoothing_without_folds_is_refused() -> None:
    model = tiny_model(torch.float32)
    with pytest.raises(LowbitError, match="folds"):
        quantize_weights(model, list(model.layers), WeightOnlyConfig(smooth=True), [IDS])
