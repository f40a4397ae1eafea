"""The weight formats of weight-only quantization, and reading any of them back from a tensor file.

Each format owns its storage (`to_tensors` under a prefix, with a `layout` tensor) and its `dequantize` and
`nbytes`; this module only tells them apart when reading: vector-quantized weights have a `codebook0` tensor.
"""

from __future__ import annotations

import numpy as np

from .groupwise_weights import GroupWiseWeights
from .vq_weights import VQWeights

QuantizedWeights = GroupWiseWeights | VQWeights
LAYOUT = "layout"  # every format writes `<prefix>layout`


def weights_from_tensors(tensors: dict[str, np.ndarray], prefix: str, where: str = "") -> QuantizedWeights:
    """The weights stored under `prefix` (which has a `layout` tensor), in whichever format wrote them."""
    if prefix + VQWeights.KEY in tensors:
        return VQWeights.from_tensors(tensors, prefix, where)
    return GroupWiseWeights.from_tensors(tensors, prefix, where)


def quantized_prefixes(tensors: dict[str, np.ndarray]) -> list[str]:
    """The prefixes ("name.") of every quantized weight in a tensor file: those with a layout tensor."""
    return sorted(k[: -len(LAYOUT)] for k in tensors if k.endswith("." + LAYOUT))


def stored_weights(tensors: dict[str, np.ndarray], where: str = "") -> dict[str, QuantizedWeights | np.ndarray]:
    """Every parameter of a tensor file as stored: quantized ones in their format (by name, without the prefix's
    dot), the rest as float32 arrays (a quantized weight's own tensors are "<its name>.<tensor>")."""
    weights: dict[str, QuantizedWeights | np.ndarray] = {
        p[:-1]: weights_from_tensors(tensors, p, where) for p in quantized_prefixes(tensors)}
    weights.update({k: np.asarray(v, np.float32) for k, v in tensors.items() if k.rsplit(".", 1)[0] not in weights})
    return weights


def n_weights(weights: QuantizedWeights) -> int:
    out, k = weights.shape
    return out * k
