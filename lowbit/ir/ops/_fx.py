"""Reading torch.fx nodes for fusion matchers: arguments, and the attention mask behind a chain of ops.

A fusion (`registry.Fusion`) is matched on the exported ATen graph before anything is
converted, so its matcher reads fx nodes directly. The attention mask reaches the
ops that use it (masked softmax, masked mean) through a cast to float and a few
scalar and reshaping ops; `mask_source` reads through them and gives the model input
they start from with the affine map a * mask + b that they compute.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.fx

aten = torch.ops.aten


def fx_arg(n: torch.fx.Node, i: int, name: str, default: Any = None) -> Any:
    """Argument `i` (or keyword `name`) of `n`, unresolved (a torch.fx.Node or a Python value)."""
    return n.args[i] if i < len(n.args) else n.kwargs.get(name, default)


def is_call(n: Any, *targets: Any) -> bool:
    return isinstance(n, torch.fx.Node) and n.op == "call_function" and n.target in targets


def shape(n: torch.fx.Node) -> tuple[int, ...]:
    return tuple(int(s) for s in n.meta["val"].shape)


def is_scalar(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


@dataclass(frozen=True)
class MaskSource:
    """The chain's end holds a * input + b (with unit dims added); `chain` holds the nodes read through."""

    input: torch.fx.Node
    a: float
    b: float
    chain: frozenset[torch.fx.Node]


_CASTS = (aten.to.dtype, aten._to_copy.default)
_VIEWS = (aten.unsqueeze.default, aten.view.default, aten.reshape.default, aten._unsafe_view.default)


def _cast_to_float32(n: torch.fx.Node) -> bool:
    dtype = fx_arg(n, 1, "dtype") if n.target == aten.to.dtype else n.kwargs.get("dtype")
    return dtype == torch.float32 and len([k for k in n.kwargs if k not in ("dtype",)]) == 0


def mask_source(n: Any) -> MaskSource | None:
    """The model input behind `n` through casts to float32, views that only add unit dims, and scalar
    affine ops (c - m, m * c, m + c, m - c), or None when `n` is anything else."""
    a, b = 1.0, 0.0  # n's value is a * v + b, v the value of the node reached so far (walking inward)
    chain: set[torch.fx.Node] = set()
    while isinstance(n, torch.fx.Node) and n.op == "call_function":
        x = fx_arg(n, 0, "self")
        other = fx_arg(n, 1, "other")
        if n.target in _CASTS and _cast_to_float32(n):
            pass
        elif n.target in _VIEWS and isinstance(x, torch.fx.Node):
            if [d for d in shape(n) if d != 1] != [d for d in shape(x) if d != 1]:
                return None
        elif n.target == aten.rsub.Scalar and is_scalar(other):  # other - alpha * x
            alpha = fx_arg(n, 2, "alpha", 1)
            a, b = -a * alpha, a * other + b
        elif n.target in (aten.mul.Tensor, aten.mul.Scalar) and is_scalar(other):
            a = a * other
        elif n.target in (aten.add.Tensor, aten.sub.Tensor) and is_scalar(other) and fx_arg(n, 2, "alpha", 1) == 1:
            b = a * (other if n.target == aten.add.Tensor else -other) + b
        else:
            return None
        chain.add(n)
        n = x
    if not (isinstance(n, torch.fx.Node) and n.op == "placeholder"):
        return None
    return MaskSource(n, float(a), float(b), frozenset(chain))


def single_user(n: torch.fx.Node) -> bool:
    return len(n.users) == 1
