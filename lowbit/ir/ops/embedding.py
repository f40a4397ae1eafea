"""embedding: rows of a table gathered by integer ids (BERT's word embeddings).

The table is a constant of the op, not a weight: it gets no bit-width of its own, so the
searchable layers stay the convs and linears.

Integer form: int8 rows, each with its own scale (MiniLM's rows span 0.03 to 1.05 in max|x|:
one scale for the table would give most rows 3 of their 8 bits), and one int16 output grid
of step max|table| / 32767. A row's scale is a dyadic mantissa over one shared shift, so the
lookup is a gather and a per-row requantizer:

    out[..., :] = clip((rows[id] * mantissa[id] + 2^(shift-1)) >> shift, int16)

|rows * mantissa| <= 127 * 2^30 < 2^37: int64 is ample, and int32 is too where shift <= 15.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F

from ...errors import LowbitError
from ..dtypes import qrange
from ..dyadic import dyadic
from ..requantizer import Requantizer
from .registry import OpDef, UnsupportedAttr, register

if TYPE_CHECKING:
    from ...quantizer.graph import Node
    from ..graph import Op, QuantizedGraph

aten = torch.ops.aten
OUTPUT_DTYPE = "int16"


def _embedding(ctx: Any, fx: Any) -> Any:
    table = ctx.const(fx, 0, "weight")
    if table is None or table.dim() != 2:
        raise UnsupportedAttr("embedding needs a 2-D weight table")
    ids = ctx.tensor(fx, 1, "indices")
    if ctx.arg(fx, 3, "scale_grad_by_freq", False) or ctx.arg(fx, 4, "sparse", False):
        raise UnsupportedAttr("embedding with scale_grad_by_freq or sparse")
    # padding_idx only changes gradients: the forward lookup is the same.
    return ctx.emit(fx, "embedding", [ids], {}, {"table": table}, prefer_module_name=True)


def _evaluate(node: Node, args: list[torch.Tensor], params: dict[str, torch.Tensor]) -> torch.Tensor:
    return F.embedding(args[0].long(), params["table"])


def quantize_rows(table: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    """(int8 rows, their float64 scales, the int16 output scale) of a float table."""
    table = np.asarray(table, dtype=np.float64)
    if not np.isfinite(table).all():
        raise ValueError("the embedding table holds NaN or Inf")
    absmax = np.abs(table).max(axis=1)
    row_scale = np.maximum(absmax, 1e-12) / 127.0
    rows = np.clip(np.round(table / row_scale[:, None]), -127, 127).astype(np.int8)
    out_scale = max(float(absmax.max()), 1e-12) / qrange(OUTPUT_DTYPE)[1]
    return rows, row_scale, out_scale


def _lower(lw: Any, node: Node) -> None:
    ids = lw.input_value(node)
    if ids.dtype != "int64":
        raise LowbitError(f"node {node.name} (embedding): its ids must be an int64 model input, not {ids.dtype}")
    rows, row_scale, out_scale = quantize_rows(lw.graph.params[f"{node.name}.table"].numpy())
    out = lw.value(node.name, OUTPUT_DTYPE, node.shape, out_scale)
    ratios = row_scale / np.float64(out.scale)
    _, shift = dyadic(ratios.max())  # one shift: the largest row sets it, the others keep 20+ mantissa bits
    mantissa = np.round(ratios * np.exp2(float(shift[0]))).astype(np.int32)
    lw.emit(node.name, "embedding", [ids], out, {"vocab": int(rows.shape[0])},
            {"rows": rows, "mantissa": mantissa, "shift": shift.astype(np.int32)})


def requantizer(op: Op, qgraph: QuantizedGraph) -> Requantizer:
    """The shift-round-clip applied to rows[id] * mantissa[id] (already scaled per row)."""
    lo, hi = qrange(OUTPUT_DTYPE)
    return Requantizer(None, op.arrays["shift"].astype(np.int64)[:1], lo, hi, OUTPUT_DTYPE)


def _reference(op: Op, args: list[np.ndarray], qgraph: QuantizedGraph) -> np.ndarray:
    ids = np.asarray(args[0], dtype=np.int64)
    vocab = op.attrs["vocab"]
    if ids.size and (ids.min() < 0 or ids.max() >= vocab):
        raise LowbitError(f"{op.name} (embedding): token ids must lie in [0, {vocab}), got "
                          f"[{ids.min()}, {ids.max()}]; was the text tokenized with this model's tokenizer?")
    scaled = op.arrays["rows"].astype(np.int64)[ids] * op.arrays["mantissa"].astype(np.int64)[ids][..., None]
    return requantizer(op, qgraph).apply(scaled)


def input_ranges(qgraph: QuantizedGraph) -> dict[str, tuple[int, int]]:
    """Graph input -> the ids an embedding accepts from it, [0, vocab - 1]: compiled kernels clamp an id rather
    than read past the table, so runtimes refuse ids outside this range before running (as the reference does)."""
    return {op.inputs[0]: (0, int(op.attrs["vocab"]) - 1) for op in qgraph.ops
            if op.op == "embedding" and op.inputs[0] in qgraph.inputs}


EMBEDDING = register(OpDef(
    "embedding",
    "out[..., :] = clip((rows[ids] * mantissa[ids] + 2^(shift-1)) >> shift) as int16: int8 rows of a constant "
    "table (not a weight: no bit-width), each with a dyadic scale over one shared shift, gathered by int64 ids.",
    aten={aten.embedding.default: _embedding},
    described_as="embedding",
    evaluate=_evaluate, lower=_lower, reference=_reference, constants=("table",),
    requantizers=lambda op, qgraph: [requantizer(op, qgraph)],
    calibrated=False,
))
