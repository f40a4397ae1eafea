"""Which ops a fast lowering computes inside another op's kernel: graph analyses only, no TVM.

- `residual_adds`: a residual block's add, in the epilogue of the conv that makes one of its inputs;
- `dense_fusions`: an encoder's GELU lut or residual add, in the epilogue of the linear before it;
- `permute_folds`: the permutes around attention's matmuls, read and written through by the matmul kernel.
"""

from __future__ import annotations

from ...ir import Op, QuantizedGraph
from ...ir.ops import add as add_op


def residual_adds(qgraph: QuantizedGraph) -> dict[str, tuple[Op, int]]:
    """conv name -> (add, k) for each add whose input k only a conv reads, and whose other input exists before
    that conv runs: the add can be computed in the conv's epilogue (the skip connections of residual blocks)."""
    position = {name: -1 for name in qgraph.inputs}
    readers: dict[str, int] = {name: 1 for name in qgraph.outputs}
    for i, op in enumerate(qgraph.ops):
        position[op.output] = i
        for name in op.inputs:
            readers[name] = readers.get(name, 0) + 1
    producer = {op.output: op for op in qgraph.ops}
    fusions: dict[str, tuple[Op, int]] = {}
    for add in qgraph.ops:
        if (add.op != "add" or len(add.inputs) != 2 or add.inputs[0] == add.inputs[1]
                or add_op.channel_input(add) is not None):  # a per-channel add runs as its own kernel
            continue
        for k in (0, 1):
            y, skip = add.inputs[k], add.inputs[1 - k]
            conv = producer.get(y)
            if (conv is not None and conv.op == "conv" and readers[y] == 1 and conv.name not in fusions
                    and position[skip] < position[y]):
                fusions[conv.name] = (add, k)
                break
    return fusions


def dense_fusions(qgraph: QuantizedGraph) -> dict[str, Op]:
    """linear name -> the op that its epilogue can compute: the lut that is the only reader of its output (an
    encoder's GELU), or the add that is, where the add's other input exists before the linear runs (the
    residual adds of an encoder layer, per-channel multipliers included)."""
    position = {name: -1 for name in qgraph.inputs}
    readers: dict[str, list[Op]] = {name: [] for name in qgraph.outputs}  # a graph output: never fused
    for i, op in enumerate(qgraph.ops):
        position[op.output] = i
        for name in op.inputs:
            readers.setdefault(name, []).append(op)
    fusions: dict[str, Op] = {}
    for op in qgraph.ops:
        if op.op != "linear" or "multiplier" not in op.arrays or len(readers.get(op.output, [])) != 1:
            continue
        (reader,) = readers[op.output]
        if reader.op == "lut":
            fusions[op.name] = reader
        elif reader.op == "add" and len(reader.inputs) == 2 and reader.inputs[0] != reader.inputs[1]:
            skip = reader.inputs[1 - reader.inputs.index(op.output)]
            if position[skip] < position[op.output]:
                fusions[op.name] = reader
    return fusions


def permute_folds(qgraph: QuantizedGraph) -> dict[str, dict[int | str, Op]]:
    """matmul name -> the permutes that its kernel can fold into its reads and writes (`x86.matmul_pairs`'s
    views): input k's producer, if a permute read by nothing else, and the output's only reader, if a permute
    (an encoder's heads transposed in and out of attention)."""
    readers: dict[str, list[Op]] = {name: [None] for name in qgraph.outputs}  # a graph output: never folded
    for op in qgraph.ops:
        for name in op.inputs:
            readers.setdefault(name, []).append(op)
    producer = {op.output: op for op in qgraph.ops}
    folds: dict[str, dict[int | str, Op]] = {}
    for op in qgraph.ops:
        if op.op != "matmul":
            continue
        views: dict[int | str, Op] = {}
        for k, name in enumerate(op.inputs):
            source = producer.get(name)
            if source is not None and source.op == "permute" and len(readers[name]) == 1:
                views[k] = source
        (after, *more) = readers.get(op.output, [None])
        if not more and after is not None and after.op == "permute":
            views["out"] = after
        if views:
            folds[op.name] = views
    return folds
