"""ATen ops that vanish at capture: dropout and copies (identities), metadata assertions, and the first output of
a tuple."""

from __future__ import annotations

import operator
from typing import Any

import torch

from .registry import UnsupportedAttr, register_converters

aten = torch.ops.aten


def _identity(ctx: Any, fx: Any) -> Any:
    return ctx.arg(fx, 0, "input")


def _getitem(ctx: Any, fx: Any) -> Any:
    container, index = ctx.arg(fx, 0, "a"), ctx.arg(fx, 1, "b")
    if not isinstance(container, (list, tuple)) or index != 0:
        raise UnsupportedAttr("only the first output of a multi-output op is supported")
    return container[index]


_IDENTITIES = (aten.dropout.default, aten.clone.default, aten.contiguous.default, aten.alias.default,
               aten.detach.default, aten.feature_dropout.default, aten.dropout_.default, aten.lift_fresh_copy.default)


def _check(ctx: Any, fx: Any) -> None:
    """A dtype/shape assertion torch.export leaves before a cast: it computes nothing."""
    return None


register_converters({t: _identity for t in _IDENTITIES}, "dropout")
register_converters({operator.getitem: _getitem, aten._assert_tensor_metadata.default: _check}, "")
