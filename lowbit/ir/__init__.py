"""lowbit's integer IR: values, ops (one module per op in `lowbit.ir.ops`), dtypes, requantizers, weight formats."""

from .graph import IR_VERSION, Op, QuantizedGraph, Value

__all__ = ["IR_VERSION", "Op", "QuantizedGraph", "Value"]
