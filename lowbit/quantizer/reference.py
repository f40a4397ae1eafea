"""The reference executor: a plain interpreter of the integer IR, and the ground truth.

Each op's integer semantics are defined once, in its module of `lowbit.ir.ops`
(`OpDef.reference`); this module only walks the graph. Elementwise integer math is
numpy int64; see `lowbit.ir.ops._layer` for how convolutions and matmuls stay exact.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from ..ir import QuantizedGraph
from ..ir.dtypes import dtype
from ..ir.ops import OPS, check_backend, primitives
from ..ir.ops.quantize import quantize_input

__all__ = ["quantize_input", "run_reference", "run_reference_batches"]

Outputs = dict[str, np.ndarray]
ModelData = np.ndarray | Mapping[str, np.ndarray]  # one input array, or one per input name (a text model)
# numpy's integer kernels run on one core each and release the GIL, so batches run side by side on threads.
REFERENCE_THREADS = max(1, min(4, os.cpu_count() or 1))


def _execute(qgraph: QuantizedGraph, inputs: ModelData) -> tuple[Outputs, Outputs]:
    """(float outputs, integer values under the final dequantize) of one run."""
    inputs = {qgraph.inputs[0]: inputs} if isinstance(inputs, np.ndarray) else inputs
    check_backend(qgraph, set(primitives()), "reference")
    env: dict[str, np.ndarray] = dict(inputs)
    for op in qgraph.ops:
        env[op.output] = OPS[op.op].reference(op, [env[i] for i in op.inputs], qgraph)
    integers = {name: env[name].astype(dtype(qgraph.values[name].dtype).numpy) for name in qgraph.int_outputs}
    return {name: env[name] for name in qgraph.outputs}, integers


def run_reference(qgraph: QuantizedGraph, inputs: ModelData, integer_outputs: bool = False) -> Outputs:
    """Execute the IR. Returns the float outputs, or with `integer_outputs` the int values before dequantize."""
    floats, integers = _execute(qgraph, inputs)
    return integers if integer_outputs else floats


def sample_rows(data: ModelData, start: int, stop: int) -> ModelData:
    """Samples [start, stop) of one array or of each named array."""
    if isinstance(data, Mapping):
        return {k: np.ascontiguousarray(v[start:stop]) for k, v in data.items()}
    return np.ascontiguousarray(data[start:stop])


def samples_in(data: ModelData) -> int:
    return len(next(iter(data.values())) if isinstance(data, Mapping) else data)


def run_reference_batches(qgraph: QuantizedGraph, data: ModelData, batch: int = 32,
                          threads: int = REFERENCE_THREADS) -> tuple[Outputs, Outputs]:
    """`run_reference` on `batch` samples at a time, `threads` batches at once, concatenated:
    (float outputs, integer values under the final dequantize)."""
    starts = range(0, samples_in(data), batch)
    with ThreadPoolExecutor(threads) as pool:
        parts = list(pool.map(lambda i: _execute(qgraph, sample_rows(data, i, i + batch)), starts))
    floats = {name: np.concatenate([p[0][name] for p in parts]) for name in qgraph.outputs}
    integers = {name: np.concatenate([p[1][name] for p in parts]) for name in qgraph.int_outputs}
    return floats, integers
