"""lowbit's integer IR: values, ops (one module per op in `lowbit.ir.ops`), dtypes, requantizers, weight formats.

The graph (and its op registry, which needs torch) is imported on first use, so that the runtime can read the
weight formats (`lowbit.ir.groupwise_weights`) without torch.
"""

from __future__ import annotations

from typing import Any

__all__ = ["IR_VERSION", "Op", "QuantizedGraph", "Value"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from . import graph

        return getattr(graph, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
