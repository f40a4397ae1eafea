"""W8A8 linears: per-token dynamic int8 activations against int8 group-wise weights, summed in integers.

SmoothQuant's W8A8 setting for a decoder (Xiao et al. 2023; ZeroQuant's per-token activation scales): each row
(token) x_t of a linear's input is quantized symmetrically at run time,

    s_t = max_j |x_t,j| / 127,   q_t,j = clip(round(x_t,j / s_t), -127, 127)      (float32 arithmetic, ties to even)

(a row of zeros gets s_t = 1, so q = 0), and multiplied with the weight's integers (`GroupWiseWeights`: uint8
values v with an integer zero point z and a float32 scale per group g):

    acc_t,o,g = sum_{i in g} q_t,i * (v_o,i - z_o,g)                                  (exact integers)
    y_t,o = float32( s_t * sum_g acc_t,o,g * scale_o,g )                                (float64, then rounded)

This module is the reference semantics (numpy, no torch: the runtime uses it); `lowbit.quantizer.
activation_quant` is its torch twin for calibration and evaluation.

Exactness of the integer sums in float32 BLAS: |q| <= 127 and |v - z| <= 255, so a product is at most 32,385 and
a sum of at most `EXACT_COLUMNS` = 512 of them at most 16,581,120 < 2^24: every partial sum is an integer that
float32 holds exactly, whatever order the BLAS adds in. Longer groups are summed in chunks of 512 columns, each
chunk's exact result added in float64 (exact below 2^53).
"""

from __future__ import annotations

import numpy as np

from ..errors import LowbitError
from .groupwise_weights import GroupWiseWeights

ACTIVATION_BITS = 8
QMAX = 2 ** (ACTIVATION_BITS - 1) - 1  # symmetric: -127..127
EXACT_COLUMNS = 512
assert QMAX * 255 * EXACT_COLUMNS < 2 ** 24  # the float32 exactness bound above


def quantize_tokens(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-row symmetric int8: (q int8 [..., in], scale float32 [...]) with x ~ q * scale[..., None]."""
    x = np.asarray(x, np.float32)
    scale = np.abs(x).max(axis=-1) / np.float32(QMAX)
    scale = np.where(scale > 0, scale, np.float32(1)).astype(np.float32)
    q = np.clip(np.round(x / scale[..., None]), -QMAX, QMAX).astype(np.int8)
    return q, scale


class Int8TokenLinear:
    """A W8A8 linear's weights prepared for `__call__`: y [t, out] = the module docstring's y for x [t, in]."""

    def __init__(self, weights: GroupWiseWeights) -> None:
        if weights.bits != 8 or weights.float_minimum:
            raise LowbitError(f"a W8A8 linear needs 8-bit weights with integer zero points, not "
                              f"{weights.bits}-bit{' float-minimum' if weights.float_minimum else ''} ones")
        self.group = weights.group
        self.scale = weights.scale.astype(np.float64)  # [out, groups]
        zero = np.repeat(weights.zero.astype(np.int16), weights.group, axis=1)[:, :weights.values.shape[1]]
        centered = weights.values.astype(np.int16) - zero  # [out, in], in [-255, 255]
        # Per group, its columns in chunks of at most EXACT_COLUMNS, transposed for x @ w: float32 [cols, out].
        in_features = centered.shape[1]
        self.chunks: list[list[tuple[slice, np.ndarray]]] = []
        for start in range(0, in_features, self.group):
            stop = min(start + self.group, in_features)
            self.chunks.append([(slice(a, min(a + EXACT_COLUMNS, stop)),
                                 np.ascontiguousarray(centered[:, a:min(a + EXACT_COLUMNS, stop)].T, np.float32))
                                for a in range(start, stop, EXACT_COLUMNS)])

    def __call__(self, x: np.ndarray) -> np.ndarray:
        q, s = quantize_tokens(x)
        qf = q.astype(np.float32)
        y = np.zeros((len(qf), self.scale.shape[0]), np.float64)
        for g, chunks in enumerate(self.chunks):
            # each chunk's product is exact in float32 (module docstring); chunks are added in float64
            acc = sum(np.asarray(qf[:, cols] @ w, np.float64) for cols, w in chunks)
            y += acc * self.scale[:, g]
        return (y * s[:, None].astype(np.float64)).astype(np.float32)
