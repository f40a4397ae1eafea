"""sigmoid: 1 / (1 + exp(-x)), lowered to an integer table lookup."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from .lut import lower_elementwise
from .registry import OpDef, register

if TYPE_CHECKING:
    from ...quantizer.graph import Node

aten = torch.ops.aten


def sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * x))  # no overflow in exp for large |x|


def _convert(ctx: Any, fx: Any) -> Any:
    return ctx.emit(fx, "sigmoid", [ctx.tensor(fx, 0, "input")])


def _evaluate(node: Node, args: list[torch.Tensor], params: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.sigmoid(args[0])


SIGMOID = register(OpDef(
    "sigmoid",
    "1 / (1 + exp(-x)); lowered to `lut`.",
    aten={aten.sigmoid.default: _convert, aten.sigmoid_.default: _convert},
    described_as="sigmoid",
    evaluate=_evaluate, lower=lambda lw, node: lower_elementwise(lw, node, sigmoid),
))
