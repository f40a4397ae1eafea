"""lowbit's x86 layer kernels, `conv2d_nhwc` and `dense`: the interface of `kernel_api`, dispatched to the
depthwise or the GEMM kernel family, with the instruction set and thread count the caller's target allows."""

from __future__ import annotations

import numpy as np
from tvm import tirx

from ..kernel_api import Lut, Residual
from .depthwise import depthwise_conv
from .gemm import gemm_conv
from .isa import Isa
from .packing import check_int4
from .plans import NUM_THREADS


def conv2d_nhwc(x_shape: tuple[int, int, int, int], x_dtype: str, weight: np.ndarray, stride: tuple[int, int],
                padding: tuple[int, int, int, int], dilation: tuple[int, int], groups: int, bias: np.ndarray,
                mantissa: np.ndarray | None, shift: np.ndarray | None, qmin: int, qmax: int, out_dtype: str,
                weight_bits: int = 8, num_threads: int = NUM_THREADS, vnni: bool = False, avx512: bool = False,
                residual: Residual | None = None) -> tuple[tirx.PrimFunc, list[np.ndarray]] | None:
    """Quantized NHWC conv2d.  Returns (PrimFunc(x, *consts, out), consts).

    `vnni` (AVX-512 VNNI with VL, or AVX-VNNI): GEMM-shaped convs use vpdpbusd on u8 x s8 bytes,
    int8 depthwise convs vpdpwssd on tap pairs.

    `residual` (fields skip_dtype, y_multiplier, skip_multiplier, shift, qmin, qmax) fuses a rescaled add
    into the epilogue: the PrimFunc is then (x, skip, *consts, out), skip and out of the conv output's
    shape, out = clip((y * y_multiplier + skip * skip_multiplier + 2^(shift-1)) >> shift, qmin, qmax) with
    y the conv's output and `out_dtype` the add's. Returns None where this kernel cannot fuse it exactly
    (depthwise or grouped convs, channels not in whole vectors, no float64 epilogue)."""
    weight = np.asarray(weight)
    wbits = 4 if int(weight_bits) == 4 else 8
    if wbits == 4:
        check_int4(weight)
    isa = Isa(vnni=vnni, avx512=avx512)
    C = int(x_shape[3])
    depthwise = int(groups) == C and int(weight.shape[0]) == C and int(weight.shape[1]) == 1 and C > 1
    if depthwise:
        if residual is not None:
            return None
        return depthwise_conv(tuple(x_shape), x_dtype, weight, stride, padding, dilation, bias, mantissa, shift, qmin,
                              qmax, out_dtype, wbits, num_threads, isa)
    return gemm_conv(tuple(x_shape), x_dtype, weight, stride, padding, dilation, groups, bias, mantissa, shift, qmin,
                     qmax, out_dtype, wbits=wbits, num_threads=num_threads, isa=isa, residual=residual)


def dense(x_shape: tuple[int, int], x_dtype: str, weight: np.ndarray, bias: np.ndarray, mantissa: np.ndarray | None,
          shift: np.ndarray | None, qmin: int, qmax: int, out_dtype: str, weight_bits: int = 8,
          num_threads: int = NUM_THREADS, vnni: bool = False, avx512: bool = False,
          residual: Residual | None = None,
          lut: tuple[Lut, np.ndarray] | None = None) -> tuple[tirx.PrimFunc, list[np.ndarray]] | None:
    """Quantized dense: x [N, IN] . weight[OUT, IN]^T.  Returns (PrimFunc(x, *consts, out), consts).

    `residual` fuses a rescaled add as `conv2d_nhwc` does (PrimFunc(x, skip, *consts, out), skip [N, OUT];
    its multipliers may be per channel); `lut` (a `Lut` and its table) fuses a table lookup on the
    requantized output (the table is the last constant, `out_dtype` the table's). Either returns None where
    the kernel cannot fuse it exactly (`gemm.gemm_conv`)."""
    Nb, IN = (int(v) for v in x_shape)
    OUT = int(weight.shape[0])
    wbits = 4 if int(weight_bits) == 4 else 8
    if wbits == 4:
        check_int4(weight)
    w4 = np.asarray(weight).reshape(OUT, IN, 1, 1)
    kernel = gemm_conv((Nb, 1, 1, IN), x_dtype, w4, (1, 1), (0, 0, 0, 0), (1, 1), 1, bias, mantissa, shift, qmin,
                       qmax, out_dtype, out_shape=(Nb, OUT), x_buf_shape=(Nb, IN), wbits=wbits,
                       num_threads=num_threads, isa=Isa(vnni=vnni, avx512=avx512), residual=residual, lut=lut)
    if kernel is None and residual is None and lut is None:  # only a fusion is ever refused
        raise RuntimeError("the GEMM kernel refused a dense layer")
    return kernel
