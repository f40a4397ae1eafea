"""embedding: rows of a table gathered by integer ids (BERT's word embeddings).

The table is a constant of the op, not a weight: it gets no bit-width of its own, so the
searchable layers stay the convs and linears. Its integer lowering (to come) stores
the table as int8 rows and the lookup is a gather, integer in and integer out.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from .registry import OpDef, UnsupportedAttr, register

if TYPE_CHECKING:
    from ...quantizer.graph import Node

aten = torch.ops.aten


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


EMBEDDING = register(OpDef(
    "embedding",
    "out[..., :] = table[ids[...], :]: rows of a constant table (not a weight: no bit-width) gathered by int64 ids.",
    aten={aten.embedding.default: _embedding},
    described_as="embedding",
    evaluate=_evaluate, constants=("table",),
))
