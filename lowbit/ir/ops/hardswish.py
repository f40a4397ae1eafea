"""hardswish: x * relu6(x + 3) / 6 (MobileNetV3's activation), lowered to an integer table lookup."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F

from .lut import lower_elementwise
from .registry import OpDef, register

if TYPE_CHECKING:
    from ...quantizer.graph import Node

aten = torch.ops.aten


def hardswish(x: np.ndarray) -> np.ndarray:
    return x * np.clip(x + 3.0, 0.0, 6.0) / 6.0


def _convert(ctx: Any, fx: Any) -> Any:
    return ctx.emit(fx, "hardswish", [ctx.tensor(fx, 0, "input")])


def _evaluate(node: Node, args: list[torch.Tensor], params: dict[str, torch.Tensor]) -> torch.Tensor:
    return F.hardswish(args[0])


HARDSWISH = register(OpDef(
    "hardswish",
    "x * relu6(x + 3) / 6; lowered to `lut`.",
    aten={aten.hardswish.default: _convert, aten.hardswish_.default: _convert},
    described_as="hardswish",
    evaluate=_evaluate, lower=lambda lw, node: lower_elementwise(lw, node, hardswish),
    absorbs_clamp=True,
))
