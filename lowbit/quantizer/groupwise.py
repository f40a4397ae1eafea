"""Group-wise weight rounding (`GroupWiseWeights`): round-to-nearest and GPTQ. No model walk here.

Each (row, group of columns) gets an asymmetric min-max grid: [lo, hi] = [min(w, 0), max(w, 0)] of the group,
optionally shrunk by the clipping ratio (from `CLIP_RATIOS`) that minimizes the group's squared rounding error,
scale (hi - lo) / (2^bits - 1), integer zero point round(-lo / scale). Including 0 in the range keeps an all-zero
group exact and the zero point within [0, 2^bits - 1].

GPTQ (Frantar et al. 2022) with groups: columns are rounded in order, each column's error spread over the columns
not yet rounded through the inverse Hessian (`rounding.gptq_setup`, blocked lazy updates as `rounding.gptq_round`).
A group's scale and zero point are fixed when the loop enters the group, from the weights as the errors of the
earlier columns left them (the paper's choice: the grid follows the updated weights). With `act_order` the
columns go in order of decreasing Hessian diagonal (the inputs with the most energy first, while the most columns
are left to absorb their error); the groups stay consecutive columns in storage, so their grids are fixed up
front from the original weights ("static groups"), since the loop no longer visits a group's columns together.

GPTQ treats the rows independently given H, so linears that read the same input (a decoder's q/k/v projections)
can be rounded as one matrix of their stacked rows with the same result, in one column loop.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from ..ir.groupwise_weights import GroupWiseWeights, n_groups
from .rounding import BLOCK, DAMPING, gptq_setup

# Clipping ratios tried per (row, group) by the clip search (1.0: plain min-max).
CLIP_RATIOS = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75)


def find_params(w: torch.Tensor, bits: int, clip_ratios: Sequence[float] = (1.0,), h: torch.Tensor | None = None,
                minimum_dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point (float64 [rows]) of each row of `w` [rows, cols], the clipping ratio chosen per row by
    the squared rounding error, weighted by the columns' input Hessian `h` [cols, cols] when given (the row's output
    error on those inputs, as AWQ's clip search).

    Integer zero points (`minimum_dtype` None): the range includes 0, the scale is float32-representable and the
    zero point an integer. Float minimums: the range is the row's own [min, max], scale and minimum m are
    representable in `minimum_dtype`, and the zero point is the fraction -m / scale (so (q - z) * s = q * s + m)."""
    w = w.double()
    qmax = (1 << bits) - 1
    lo0, hi0 = w.amin(1), w.amax(1)
    if minimum_dtype is None:
        lo0, hi0 = lo0.clamp(max=0.0), hi0.clamp(min=0.0)
    stored = torch.float32 if minimum_dtype is None else minimum_dtype
    tiny = float(torch.finfo(stored).tiny)
    best_scale = best_zero = best_err = None
    for ratio in clip_ratios:
        lo, hi = lo0 * ratio, hi0 * ratio
        # The scale the format stores; a constant row gets 1 (any scale is exact there).
        scale = torch.where(hi > lo, (hi - lo) / qmax, 1.0).clamp(min=tiny).to(stored).double()
        if minimum_dtype is None:
            zero = torch.clamp(torch.round(-lo / scale), 0, qmax)
        else:
            zero = -lo.to(stored).double() / scale
        if len(clip_ratios) == 1:
            return scale, zero
        d = dequantize_cols(quantize_cols(w, scale, zero, qmax), scale, zero) - w
        err = (d * d).sum(1) if h is None else ((d @ h.double()) * d).sum(1)
        if best_err is None:
            best_scale, best_zero, best_err = scale, zero, err
        else:
            better = err < best_err
            best_scale = torch.where(better, scale, best_scale)
            best_zero = torch.where(better, zero, best_zero)
            best_err = torch.where(better, err, best_err)
    assert best_scale is not None and best_zero is not None, "clip_ratios is empty"
    return best_scale, best_zero


def quantize_cols(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, qmax: int) -> torch.Tensor:
    """Integer values (as floats) of `w` [rows, cols] on each row's grid (`scale`, `zero`: [rows]; a fractional
    zero point for float minimums)."""
    return torch.clamp(torch.round(w / scale[:, None] + zero[:, None]), 0, qmax)


def dequantize_cols(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    return (q - zero[:, None]) * scale[:, None]


def _as_weights(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int, group: int,
                minimum_dtype: torch.dtype | None) -> GroupWiseWeights:
    values = q.numpy().astype(np.uint8)
    if minimum_dtype is None:
        return GroupWiseWeights(values, scale.numpy().astype(np.float32), zero.numpy().astype(np.uint8), bits, group)
    return GroupWiseWeights(values, scale.to(minimum_dtype).numpy(), None, bits, group,
                            minimum=(-zero * scale).to(minimum_dtype).numpy())


def minimum_dtype_for(w: torch.Tensor, bits: int, group: int, float_minimum: bool) -> torch.dtype | None:
    """None for integer zero points; for float minimums float16 (as GGUF's Q4_1) where it holds every weight and
    every non-constant group's step as a normal number, else float32 (a weight of tiny or huge values)."""
    if not float_minimum:
        return None
    fp16 = torch.finfo(torch.float16)
    steps = torch.cat([(w[:, j:j + group].amax(1) - w[:, j:j + group].amin(1)) for j in range(0, w.shape[1], group)])
    steps = steps[steps > 0] / ((1 << bits) - 1)
    fits = float(w.abs().max()) < fp16.max / 2 and (not len(steps) or float(steps.min()) > fp16.tiny)
    return torch.float16 if fits else torch.float32


def _check(w: torch.Tensor, bits: int, group: int) -> None:
    if w.ndim != 2:
        raise ValueError(f"group-wise rounding takes a linear's weight [out, in], not {list(w.shape)}")
    if bits not in GroupWiseWeights.SUPPORTED_BITS or group < 1:
        raise ValueError(f"{bits} bits in groups of {group}: bits must be one of "
                         f"{GroupWiseWeights.SUPPORTED_BITS} and the group positive")


def rtn_groupwise(w: torch.Tensor | np.ndarray, bits: int, group: int, clip_ratios: Sequence[float] = (1.0,),
                  h: torch.Tensor | None = None, float_minimum: bool = False) -> GroupWiseWeights:
    """Round-to-nearest of `w` [out, in] in groups of `group` columns (`group >= in`: per output channel); `h`:
    the inputs' Hessian [in, in], which weights the clip search (else plain weight error); `float_minimum`: a
    float minimum per group instead of an integer zero point."""
    w = torch.as_tensor(w).double()
    _check(w, bits, group)
    qmax = (1 << bits) - 1
    k = w.shape[1]
    group = min(group, k)
    g = n_groups(k, group)
    q = torch.empty_like(w)
    scale = torch.empty(w.shape[0], g, dtype=torch.float64)
    zero = torch.empty_like(scale)
    stored = minimum_dtype_for(w, bits, group, float_minimum)
    for j in range(g):
        cols = slice(j * group, min((j + 1) * group, k))
        scale[:, j], zero[:, j] = find_params(w[:, cols], bits, clip_ratios, None if h is None else h[cols, cols],
                                              stored)
        q[:, cols] = quantize_cols(w[:, cols], scale[:, j], zero[:, j], qmax)
    return _as_weights(q, scale, zero, bits, group, stored)


def gptq_groupwise(w: torch.Tensor | np.ndarray, h: torch.Tensor, bits: int, group: int, damp: float = DAMPING,
                   block: int = BLOCK, act_order: bool = False, clip_ratios: Sequence[float] = (1.0,),
                   dtype: torch.dtype = torch.float32, float_minimum: bool = False) -> GroupWiseWeights:
    """GPTQ of `w` [out, in] given its inputs' Hessian `h` [in, in] (e.g. `HessianAccumulator`), in groups of
    `group` columns; `damp`: fraction of the mean Hessian diagonal added to it; `block`: columns per lazy update.

    H⁻¹'s Cholesky factor is computed in float64; the column loop runs in `dtype` (float32, as the paper's code:
    twice as fast as float64 here, with the same proxy loss to about 1e-4)."""
    w = torch.as_tensor(w).double()
    _check(w, bits, group)
    k = w.shape[1]
    if tuple(h.shape) != (k, k):
        raise ValueError(f"Hessian of shape {list(h.shape)} for a weight of {k} input columns")
    qmax = (1 << bits) - 1
    group = min(group, k)
    g = n_groups(k, group)
    scale = torch.empty(w.shape[0], g, dtype=torch.float64)
    zero = torch.empty_like(scale)
    stored = minimum_dtype_for(w, bits, group, float_minimum)
    perm = torch.argsort(torch.diagonal(h), descending=True, stable=True) if act_order else torch.arange(k)
    work, hinv = gptq_setup(w[:, perm][None], h[perm][:, perm][None], damp)
    hinv = hinv[0].to(dtype)
    col_group = perm // group  # the (storage) group of each column in loop order
    static = act_order and group < k
    if static:
        original = torch.empty_like(work[0])
        original[:, perm] = work[0]
        for j in range(g):
            cols = slice(j * group, min((j + 1) * group, k))
            scale[:, j], zero[:, j] = find_params(original[:, cols], bits, clip_ratios, h[cols, cols], stored)
    else:  # blocks of whole groups: the group being entered has all its updates when its grid is fixed
        block = -(-block // group) * group if group < k else block
    # Columns as contiguous rows [in, out]: each step reads one and updates the rest of its block in one addr_.
    work = work[0].T.to(dtype).contiguous()
    grid_scale, grid_zero = scale.T.to(dtype), zero.T.to(dtype)  # views refreshed as groups are entered
    q = torch.empty_like(work)
    for start in range(0, k, block):
        stop = min(start + block, k)
        errors = torch.empty(stop - start, work.shape[1], dtype=dtype)
        for i in range(start, stop):
            gi = int(col_group[i])
            if not static and i % group == 0:
                cols = slice(i, i + group)  # not act-order: loop order is storage order
                scale[:, gi], zero[:, gi] = find_params(work[cols].T, bits, clip_ratios, h[cols, cols], stored)
                grid_scale[gi], grid_zero[gi] = scale[:, gi], zero[:, gi]
            s, z, col = grid_scale[gi], grid_zero[gi], work[i]
            q[i] = torch.clamp(torch.round(col / s + z), 0, qmax)
            err = errors[i - start]
            torch.div(col - (q[i] - z) * s, hinv[i, i], out=err)
            work[i + 1:stop].addr_(hinv[i, i + 1:stop], err, alpha=-1)
        if stop < k:
            work[stop:].addmm_(hinv[start:stop, stop:].T, errors, alpha=-1)
    values = torch.empty(q.shape[1], k, dtype=torch.float64)
    values[:, perm] = q.T.double()
    return _as_weights(values, scale, zero, bits, group, stored)


def hessian_loss(w: torch.Tensor | np.ndarray, dq: torch.Tensor | np.ndarray, h: torch.Tensor) -> float:
    """GPTQ's proxy loss tr((W - Q) H (W - Q)ᵀ): with H = mean X Xᵀ, the layer's squared output error (summed over
    outputs) per input row of X."""
    d = torch.as_tensor(w).double() - torch.as_tensor(dq).double()
    return float(torch.einsum("oi,ij,oj->", d, h.double(), d))
