"""The layer-kernel interface that the lowering calls, shared by the portable kernels (`kernels`) and lowbit's
x86 kernels (`x86`): a builder takes the layer's shapes, integer weights and requantizer and returns a PrimFunc
with parameters (x, *constants, out) plus the constant arrays to pass in that order."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import numpy as np

if TYPE_CHECKING:
    from tvm import tirx

    KernelResult = tuple[tirx.PrimFunc, list[np.ndarray]]


@dataclass(frozen=True)
class Residual:
    """A rescaled add fused into the epilogue of the conv or linear that makes one of its inputs (y; the other
    is skip): clip((y * y_multiplier + skip * skip_multiplier + 2^(shift-1)) >> shift, qmin, qmax). A multiplier
    is one integer, or a tuple of one per output channel (an add with a per-channel multiplier, `ir.ops.add`)."""

    skip_dtype: str
    y_multiplier: int | tuple[int, ...]
    skip_multiplier: int | tuple[int, ...]
    shift: int
    qmin: int
    qmax: int


@dataclass(frozen=True)
class Lut:
    """A table lookup fused into the epilogue of the linear that makes its input: out = table[y + offset +
    channel * row] with y the requantized output (`row` = 0: one table for every channel)."""

    offset: int
    row: int
    size: int  # entries in the flat table
    dtype: str


class ConvKernel(Protocol):
    """Quantized NHWC conv2d, weights [OC, IC/groups, KH, KW]; `padding` is (top, left, bottom, right).

    acc = bias + sum x * w (int32); y = clip((int64(acc) * mantissa + 2^(shift-1)) >> shift, qmin, qmax) as
    `out_dtype`, or acc itself (int32) where `mantissa` is None."""

    def __call__(self, x_shape: tuple[int, int, int, int], x_dtype: str, weight: np.ndarray, stride: tuple[int, int],
                 padding: tuple[int, int, int, int], dilation: tuple[int, int], groups: int, bias: np.ndarray,
                 mantissa: np.ndarray | None, shift: np.ndarray | None, qmin: int, qmax: int, out_dtype: str,
                 weight_bits: int) -> KernelResult: ...


class DenseKernel(Protocol):
    """Quantized x [N, IN] . weight [OUT, IN]^T with the same bias and requantizer as `ConvKernel`."""

    def __call__(self, x_shape: tuple[int, int], x_dtype: str, weight: np.ndarray, bias: np.ndarray,
                 mantissa: np.ndarray | None, shift: np.ndarray | None, qmin: int, qmax: int, out_dtype: str,
                 weight_bits: int) -> KernelResult: ...
