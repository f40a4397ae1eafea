"""The one table of integer (and float) element types that IR values, weights and backends use.

Every backend maps an IR dtype name to its own type through this table, so adding
a type (int16 activations, say) is one row here, not an edit in every exporter.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class DType:
    name: str
    numpy: type
    onnx: int  # onnx.TensorProto element type (plain ints, so the table needs no onnx import)
    bits: int
    signed: bool
    is_float: bool = False

    @property
    def qmin(self) -> int:
        return -(1 << (self.bits - 1)) if self.signed else 0

    @property
    def qmax(self) -> int:
        return (1 << (self.bits - 1)) - 1 if self.signed else (1 << self.bits) - 1

    @property
    def range(self) -> tuple[int, int]:
        return self.qmin, self.qmax


# onnx.TensorProto: FLOAT = 1, UINT8 = 2, INT8 = 3, INT16 = 5, INT32 = 6, INT64 = 7.
DTYPES: dict[str, DType] = {d.name: d for d in (
    DType("int8", np.int8, 3, 8, True),
    DType("uint8", np.uint8, 2, 8, False),
    DType("int16", np.int16, 5, 16, True),
    DType("int32", np.int32, 6, 32, True),
    DType("int64", np.int64, 7, 64, True),
    DType("float32", np.float32, 1, 32, True, is_float=True),
)}


def dtype(name: str) -> DType:
    try:
        return DTYPES[name]
    except KeyError:
        raise ValueError(f"unknown IR dtype {name!r}; expected one of {', '.join(DTYPES)}") from None


def qrange(name: str) -> tuple[int, int]:
    """[qmin, qmax] of an integer IR dtype."""
    return dtype(name).range


def activation_dtype(bits: int, unsigned: bool) -> str:
    """The IR dtype of a `bits`-bit activation: uint8/int8 for 8 bits, int16 for 16.

    16-bit activations are always signed int16, whatever the tensor's sign: a non-negative tensor loses one bit
    of its 16 (still 128 times finer than uint8), and every backend needs one form only. ONNX Runtime's
    integer kernels take 8-bit inputs, so `model.int.onnx` splits x = 256 * h + l with h = x >> 8 (int8) and
    l = x & 255 (uint8); TVM takes int16 directly. Neither needs uint16, so there is none.
    """
    if bits == 16:
        return "int16"
    name = {(8, True): "uint8", (8, False): "int8"}.get((bits, unsigned))
    if name is None:
        raise ValueError(f"no {'unsigned' if unsigned else 'signed'} {bits}-bit activation type")
    return name


def steps(name: str) -> int:
    """Quantization steps from 0 to the largest positive value: 127 for int8, 255 for uint8."""
    return dtype(name).qmax
