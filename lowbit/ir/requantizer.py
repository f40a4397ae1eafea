"""The typed requantizer that lowering attaches to every op that changes scale.

    q = clip(((acc * mantissa) + r) >> shift, qmin, qmax)  as `dtype`

with the rules of `lowbit.ir.dyadic`. `mantissa`/`shift` are one value, or one per
channel along `axis` of the accumulator. A `mantissa` of None means the
accumulator is already scaled (a residual add scales each input by its own
mantissa and shares one shift). Each backend emits a requantizer in exactly one
place; the IR stores it as the op's `multiplier`/`shift` arrays and `qmin`/`qmax`
attributes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .dtypes import qrange
from .dyadic import MANTISSA_BITS, MAX_SHIFT, requantize


@dataclass(frozen=True)
class Requantizer:
    mantissa: np.ndarray | None  # int64, shape () or [channels]
    shift: np.ndarray  # int64, same shape as mantissa
    qmin: int
    qmax: int
    dtype: str  # the output's IR dtype
    axis: int | None = None  # the accumulator's channel axis for per-channel values

    def __post_init__(self) -> None:
        lo, hi = qrange(self.dtype)
        if not lo <= self.qmin <= self.qmax <= hi:
            raise ValueError(f"requantizer range [{self.qmin}, {self.qmax}] outside {self.dtype} [{lo}, {hi}]")
        shift = np.asarray(self.shift)
        if shift.size and (shift.min() < 0 or shift.max() > MAX_SHIFT):
            raise ValueError(f"requantizer shift outside [0, {MAX_SHIFT}]: {shift.ravel()}")
        if self.mantissa is not None:
            m = np.asarray(self.mantissa)
            if m.size and (m.min() < 0 or m.max() >= 1 << MANTISSA_BITS):  # keeps |acc * m| < 2^61
                raise ValueError(f"requantizer mantissa outside [0, 2^{MANTISSA_BITS}): {m.ravel()}")

    def broadcast(self, values: np.ndarray, ndim: int) -> np.ndarray:
        """`values` (mantissa or shift) shaped to broadcast against an accumulator of `ndim` dims."""
        values = np.asarray(values, dtype=np.int64)
        if self.axis is None:
            return values.reshape(()) if values.size == 1 else values
        shape = [1] * ndim
        shape[self.axis] = -1
        return values.reshape(shape)

    def apply(self, acc: np.ndarray) -> np.ndarray:
        """The reference semantics, in int64."""
        acc = np.asarray(acc, dtype=np.int64)
        mantissa = np.int64(1) if self.mantissa is None else self.broadcast(self.mantissa, acc.ndim)
        return requantize(acc, mantissa, self.broadcast(self.shift, acc.ndim), self.qmin, self.qmax)
