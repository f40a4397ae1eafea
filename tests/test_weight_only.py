"""The weight-only walk (`quantize_weights`) on a tiny stand-in for a decoder: blocks of linears with residuals."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lowbit.errors import LowbitError
from lowbit.quantizer.weight_only import WeightOnlyConfig, quantize_weights

D, FF = 64, 96  # FF % 64 = 32: the down projection has a tail group at group 64


class Block(nn.Module):
    """Attention-like (q and k read one normed input) and MLP-like halves, each with a residual."""

    def __init__(self) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(D), nn.LayerNorm(D)
        self.q, self.k, self.o = nn.Linear(D, D), nn.Linear(D, D, bias=False), nn.Linear(D, D)
        self.up, self.down = nn.Linear(D, FF), nn.Linear(FF, D)

    def forward(self, x: torch.Tensor, *, gain: torch.Tensor) -> tuple[torch.Tensor, None]:
        h = self.norm1(x)
        x = x + self.o(torch.tanh(self.q(h)) * self.k(h))
        return x + gain * self.down(F.silu(self.up(self.norm2(x)))), None  # a tuple, as Hugging Face blocks


class Tiny(nn.Module):
    def __init__(self, n_blocks: int = 3) -> None:
        super().__init__()
        self.embed = nn.Linear(8, D)  # low-rank inputs: correlated features, where GPTQ pays
        self.layers = nn.ModuleList(Block() for _ in range(n_blocks))
        self.head = nn.Linear(D, 10)
        self.gain = torch.tensor(0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x) + 0.05 * torch.sin(3 * self.embed(x))
        for layer in self.layers:
            h = layer(h, gain=self.gain)[0]
        return self.head(h)


def _model() -> Tiny:
    torch.manual_seed(0)
    return Tiny().eval()


def _samples(n: int, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(2, 16, 8, generator=g) for _ in range(n)]


def _linear_names(model: Tiny) -> list[str]:
    return [n for block in model.layers for n, m in model.named_modules()
            if isinstance(m, nn.Linear) and any(m is b for b in block.modules())]


def _output_error(model: nn.Module, reference: nn.Module, samples: list[torch.Tensor]) -> float:
    with torch.no_grad():
        return float(sum(((model(x) - reference(x)) ** 2).mean() for x in samples))


def test_gptq_walk_beats_rtn_on_held_out_inputs() -> None:
    reference = _model()
    calib, held_out = _samples(16, seed=1), _samples(8, seed=2)
    errors = {}
    for name, rounding, sequential in (("rtn", "rtn", False), ("gptq", "gptq", False), ("seq", "gptq", True)):
        model = copy.deepcopy(reference)
        config = WeightOnlyConfig(bits=3, group=32, rounding=rounding, true_sequential=sequential)
        quantize_weights(model, model.layers, config, calib)
        errors[name] = _output_error(model, reference, held_out)
    assert errors["gptq"] < 0.7 * errors["rtn"], errors
    assert errors["seq"] < 0.7 * errors["rtn"], errors


@pytest.mark.parametrize("rounding,sequential", [("rtn", False), ("gptq", False), ("gptq", True)])
def test_walk_covers_every_block_linear_and_writes_the_dequantized_weights(rounding: str, sequential: bool) -> None:
    model = _model()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    lines: list[str] = []
    config = WeightOnlyConfig(bits=4, group=64, rounding=rounding, skip=("layers.1.down",), true_sequential=sequential)
    result = quantize_weights(model, model.layers, config, _samples(4, seed=1), log=lines.append)
    expected = [n for n in _linear_names(model) if n != "layers.1.down"]
    assert list(result) == expected  # definition order
    modules = dict(model.named_modules())
    for name, weights in result.items():
        linear = modules[name]
        assert weights.shape == tuple(linear.weight.shape) and weights.bits == 4
        assert weights.group == 64 and weights.scale.shape == (linear.out_features, -(-linear.in_features // 64))
        assert np.array_equal(linear.weight.detach().numpy(), weights.dequantize())
        assert not torch.equal(linear.weight, before[f"{name}.weight"])
        if linear.bias is not None:
            assert torch.equal(linear.bias, before[f"{name}.bias"])  # biases stay float
    for name in ("embed.weight", "head.weight", "layers.1.down.weight"):
        assert torch.equal(dict(model.named_parameters())[name], before[name])
    assert any("block 3/3" in line for line in lines)
    if sequential:  # one stage per input the linears read, in execution order
        stages = [line.split(" of ")[-1] for line in lines if "block 1/3: int4 g64 gptq" in line]
        assert stages == ["layers.0.q, layers.0.k", "layers.0.o", "layers.0.up", "layers.0.down"]


def test_linears_sharing_an_input_get_its_hessian_once_and_round_as_a_stack() -> None:
    """q and k read the same tensor: they are rounded together, with the same result as one by one."""
    model = _model()
    calib = _samples(4, seed=1)
    config = WeightOnlyConfig(bits=4, group=32, rounding="gptq")
    quantized = copy.deepcopy(model)
    stacked = quantize_weights(quantized, quantized.layers[:1], config, calib)  # only block 0
    assert set(stacked) == {f"layers.0.{n}" for n in ("q", "k", "o", "up", "down")}
    h = []
    handle = model.layers[0].q.register_forward_pre_hook(lambda _m, a: h.append(a[0].reshape(-1, D)))
    with torch.no_grad():
        for x in calib:
            model(x)
    handle.remove()
    x = torch.cat(h).double()
    hessian = x.T @ x / x.shape[0]
    for name in ("q", "k"):
        alone = config.round(getattr(model.layers[0], name).weight.detach(), hessian)
        assert np.array_equal(alone.values, stacked[f"layers.0.{name}"].values)


def test_config_and_walk_errors_are_clear() -> None:
    with pytest.raises(LowbitError, match="--weights int5"):
        WeightOnlyConfig(bits=5)
    with pytest.raises(LowbitError, match="--rounding 'nearest'"):
        WeightOnlyConfig(rounding="nearest")
    with pytest.raises(LowbitError, match="--group -1"):
        WeightOnlyConfig(group=-1)
    assert WeightOnlyConfig(group=0).group_for(576) == 576
    model = _model()
    with pytest.raises(LowbitError, match="need calibration samples"):
        quantize_weights(model, model.layers, WeightOnlyConfig(rounding="gptq"))
    with pytest.raises(LowbitError, match="not a submodule"):
        quantize_weights(model, [Block()], WeightOnlyConfig(), _samples(1, 1))
    with pytest.raises(LowbitError, match="never ran block 0"):
        quantize_weights(model, model.layers, WeightOnlyConfig(rounding="gptq"), _samples(1, 1),
                         forward=lambda m, x: None)
    assert torch.equal(model.layers[0].q.weight, _model().layers[0].q.weight)  # nothing was touched


class KVCache:
    """Stands in for a decoder's cache object: the walk refuses to rerun blocks that append to one."""


def test_a_kv_cache_in_the_calibration_forward_is_refused() -> None:
    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(8, 8)

        def forward(self, x: torch.Tensor, cache: KVCache | None) -> torch.Tensor:
            return self.fc(x)

    class Model(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layers = nn.ModuleList([Block()])

        def forward(self, x: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
            return self.layers[0](x, cache)

    model = Model()
    with pytest.raises(LowbitError, match="KV cache .*KVCache"):
        quantize_weights(model, model.layers, WeightOnlyConfig(group=8, rounding="gptq"), [torch.randn(1, 8)],
                         forward=lambda m, x: m(x, KVCache()))
    # Without a cache it runs.
    quantize_weights(model, model.layers, WeightOnlyConfig(group=8, rounding="gptq"), [torch.randn(1, 8)])
