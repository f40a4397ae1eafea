"""The reference executor: a plain interpreter of the integer IR, and the ground truth.

Each op's integer semantics are defined once, in its module of `lowbit.ir.ops`
(`OpDef.reference`); this module only walks the graph. Elementwise integer math is
numpy int64; see `lowbit.ir.ops._layer` for how convolutions and matmuls stay exact.
"""

from __future__ import annotations

import numpy as np

from ..ir import QuantizedGraph
from ..ir.dtypes import dtype
from ..ir.ops import OPS, check_backend, primitives
from ..ir.ops.quantize import quantize_input

__all__ = ["quantize_input", "run_reference"]


def run_reference(qgraph: QuantizedGraph, inputs: dict[str, np.ndarray] | np.ndarray,
                  integer_outputs: bool = False) -> dict[str, np.ndarray]:
    """Execute the IR. Returns the float outputs, or with `integer_outputs` the int values before dequantize."""
    if isinstance(inputs, np.ndarray):
        inputs = {qgraph.inputs[0]: inputs}
    check_backend(qgraph, set(primitives()), "reference")
    env: dict[str, np.ndarray] = dict(inputs)
    for op in qgraph.ops:
        env[op.output] = OPS[op.op].reference(op, [env[i] for i in op.inputs], qgraph)
    if integer_outputs:
        return {name: env[name].astype(dtype(qgraph.values[name].dtype).numpy) for name in qgraph.int_outputs}
    return {name: env[name] for name in qgraph.outputs}
