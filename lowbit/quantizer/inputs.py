"""Calibration data: one array per graph input, all with the same number of samples.

An image model takes one float32 array (N, C, H, W); a text encoder takes int64 token ids
and an attention mask, each (N, seq). Every quantizer stage that reads calibration data
takes either form (`CalibData`) and turns it into `ModelInputs` once, checked against the
graph: names, shapes, dtypes, and no NaN/Inf in float inputs.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from ..errors import LowbitError
from ..ir.ops.quantize import input_dtype
from .graph import Graph

CalibData = np.ndarray | Mapping[str, np.ndarray]
TorchInputs = dict[str, torch.Tensor]


@dataclass(frozen=True)
class ModelInputs:
    """Samples of a model's inputs, by graph input name (validated by `model_inputs`)."""

    arrays: Mapping[str, np.ndarray]

    def __len__(self) -> int:
        return len(next(iter(self.arrays.values())))

    def take(self, index: slice | np.ndarray) -> ModelInputs:
        """Some of the samples (a slice, or indices), in the order given."""
        return ModelInputs({k: np.ascontiguousarray(v[index]) for k, v in self.arrays.items()})

    def tensors(self) -> TorchInputs:
        """The samples as torch tensors (sharing memory with the arrays)."""
        return {k: torch.from_numpy(v) for k, v in self.arrays.items()}

    def batches(self, size: int) -> Iterator[TorchInputs]:
        for i in range(0, len(self), size):
            yield self.take(slice(i, i + size)).tensors()


def concat_tensors(parts: Sequence[TorchInputs]) -> TorchInputs:
    return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}


def sample_count(x: TorchInputs) -> int:
    return len(next(iter(x.values())))


MASK_READERS = ("softmax", "masked_mean")  # ops whose second input is the attention mask


def token_mask(graph: Graph, inputs: TorchInputs) -> torch.Tensor | None:
    """The attention mask as bool [batch, seq], if the graph reads one. Padded positions never reach the output
    (softmax and the pooling leave them out), so fits and statistics leave their rows out too: they have their own
    outliers, and in a calibration set of short sentences they are most of the rows."""
    missing = sorted(set(graph.inputs) - set(inputs))
    if missing:
        raise LowbitError(f"graph {graph.name!r} needs inputs {missing}; got {sorted(inputs)}")
    for name in graph.inputs:
        if any(n.op in MASK_READERS and n.inputs[1:2] == [name] for n in graph.consumers(name)):
            return inputs[name].bool()
    return None


def real_tokens(t: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """The real-token positions of `t`: [tokens, ...] from [batch, seq, ...], or from [batch, heads, seq, ...]
    (attention's per-head tensors, with seq moved first). `t` itself without a mask (an image model) or when it has
    no seq axis (a pooled [batch, hidden] output)."""
    if mask is None or t.dim() < 3 or t.shape[0] != mask.shape[0]:
        return t
    if t.shape[1] == mask.shape[1]:
        return t[mask]
    if t.dim() >= 4 and t.shape[2] == mask.shape[1]:
        return t.movedim(2, 1)[mask]
    return t


def model_inputs(graph: Graph, data: CalibData | ModelInputs, where: str) -> ModelInputs:
    """`data` checked against `graph`'s inputs: one array for a single-input graph, or one per input name."""
    if isinstance(data, ModelInputs):
        return data
    if not isinstance(data, Mapping):
        if len(graph.inputs) != 1:
            raise LowbitError(f"{where}: the model takes {len(graph.inputs)} inputs ({', '.join(graph.inputs)}); "
                              "give one array per input, by name")
        data = {graph.inputs[0]: data}
    missing, extra = set(graph.inputs) - set(data), set(data) - set(graph.inputs)
    if missing or extra:
        raise LowbitError(f"{where}: the model's inputs are {', '.join(graph.inputs)}; the data has "
                          f"{', '.join(sorted(data)) or 'none'}")
    arrays = {name: _checked(graph, name, np.asarray(data[name]), where) for name in graph.inputs}
    counts = {name: len(a) for name, a in arrays.items()}
    if len(set(counts.values())) > 1:
        raise LowbitError(f"{where}: the inputs have different sample counts: {counts}")
    return ModelInputs(arrays)


def _checked(graph: Graph, name: str, x: np.ndarray, where: str) -> np.ndarray:
    node = graph.node(name)
    expected = node.shape[1:]
    label = f"{where}: input {name}" if len(graph.inputs) > 1 else where
    if x.ndim != len(expected) + 1 or tuple(x.shape[1:]) != tuple(expected):
        raise LowbitError(f"{label}: calibration data has shape {tuple(x.shape)}, but the model takes "
                          f"(N, {', '.join(map(str, expected))})")
    if len(x) == 0:
        raise LowbitError(f"{label}: the calibration set is empty; give at least one sample")
    if input_dtype(node) == "int64":
        if x.dtype.kind not in "iub":
            raise LowbitError(f"{label}: integer data (token ids or a mask) is needed, not {x.dtype}")
        return np.ascontiguousarray(x, dtype=np.int64)
    bad = ~np.isfinite(x)
    if bad.any():
        samples = sorted({int(i) for i in np.nonzero(bad)[0][:5]})
        raise LowbitError(f"{label}: calibration data holds {int(bad.sum())} NaN/Inf values "
                          f"(first in samples {samples}); clean the data")
    return np.ascontiguousarray(x, dtype=np.float32)
