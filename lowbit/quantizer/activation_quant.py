"""Per-token dynamic int8 activations in a torch model (W8A8): the torch twin of `lowbit.ir.token_int8`.

`fake_quantize_tokens(x)` rounds each row of x to `token_int8.quantize_tokens`' grid (same float32 scale, same
ties-to-even rounding) and returns it in float; a linear that reads it with its dequantized weights computes
`Int8TokenLinear`'s result up to float32 summation order. `quantize_linear_inputs(model, names)` makes the named
linears read their inputs that way (forward pre-hooks that stay on the model): how calibration reruns a block
and how perplexity evaluates a W8A8 model.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from ..errors import LowbitError
from ..ir.token_int8 import QMAX

_HOOK_FLAG = "_lowbit_token_int8"


def fake_quantize_tokens(x: torch.Tensor) -> torch.Tensor:
    """x rounded per row (last dimension) to symmetric int8 with a dynamic scale, dequantized (float32)."""
    x = x.float()
    scale = x.abs().amax(dim=-1, keepdim=True) / QMAX
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    return torch.clamp(torch.round(x / scale), -QMAX, QMAX) * scale


def _hook(_module: nn.Module, args: tuple) -> tuple:
    return (fake_quantize_tokens(args[0]), *args[1:])


def quantize_linear_inputs(model: nn.Module, names: Iterable[str]) -> None:
    """Make each nn.Linear `names` (as in model.named_modules) quantize its input per token (idempotent)."""
    modules = dict(model.named_modules())
    for name in names:
        linear = modules.get(name)
        if not isinstance(linear, nn.Linear):
            raise LowbitError(f"W8A8: {name!r} is not a linear of {type(model).__name__}")
        if not getattr(linear, _HOOK_FLAG, False):
            linear.register_forward_pre_hook(_hook)
            setattr(linear, _HOOK_FLAG, True)
