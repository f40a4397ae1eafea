"""Careful rounding: GPTQ (Frantar et al. 2022), kept apart from the walk over the model.

Rounding each weight to nearest ignores that the layer's inputs are
correlated. GPTQ quantizes the weight matrix one input column at a time and
spreads each column's rounding error over the columns not yet quantized,
weighted by the inverse Hessian of the layer's output error, H = X Xᵀ (X: the
layer's inputs on calibration data). The per-channel scales stay as chosen;
only the rounding changes, so the integer format is the same.

The layer's inputs arrive as the columns its weight multiplies ([groups, K,
samples]), which each op with weights defines (`OpDef.input_columns`), so this
module knows nothing about convolutions. Everything is batched over groups, so a depthwise conv (one tiny K=9 problem
per channel) costs the same nine steps as a dense layer costs K steps.
"""

from __future__ import annotations

import torch

DAMPING = 0.01  # fraction of the mean Hessian diagonal added for numerical stability
BLOCK = 128  # columns per lazy batch update in `gptq_round`


class HessianAccumulator:
    """Running H = mean of X Xᵀ per group, fed chunk by chunk to bound memory.

    Each chunk's product is taken in `dtype` and summed in float64: float32 halves the time of a decoder's
    Hessians (hundreds of tokens per chunk, so a chunk's float32 rounding stays near 1e-6 of H)."""

    def __init__(self, dtype: torch.dtype = torch.float64) -> None:
        self.h: torch.Tensor | None = None
        self.count = 0
        self.dtype = dtype

    def add(self, cols: torch.Tensor) -> None:
        cols = cols.to(self.dtype)
        update = (cols @ cols.transpose(1, 2)).double()
        self.h = update if self.h is None else self.h + update
        self.count += cols.shape[-1]

    def result(self) -> torch.Tensor:
        assert self.h is not None, "no samples were added"
        return self.h / max(self.count, 1)


def inverse_cholesky(h: torch.Tensor, mean_diag: torch.Tensor, damping: float = DAMPING) -> torch.Tensor:
    """Upper Cholesky factor of H⁻¹ ([G, K, K]), with `damping` · mean diagonal added, raised until H is
    positive definite."""
    eye = torch.eye(h.shape[-1], dtype=h.dtype)
    for _ in range(4):
        damped = h + damping * mean_diag[:, None, None] * eye
        lower, info = torch.linalg.cholesky_ex(damped)
        if not info.any():
            return torch.linalg.cholesky(torch.cholesky_inverse(lower), upper=True)
        damping *= 10
    raise ValueError("GPTQ: the layer's input Hessian is not positive definite even with strong damping")


def gptq_setup(w: torch.Tensor, h: torch.Tensor, damping: float = DAMPING) -> tuple[torch.Tensor, torch.Tensor]:
    """Float64 working copies for GPTQ's column loop: `w` [G, O, K] with the weights of dead inputs zeroed (inputs
    that are always zero: their weights don't matter), and the upper Cholesky factor of H⁻¹ [G, K, K]."""
    w = w.double().clone()
    h = h.double().clone()
    diag = torch.diagonal(h, dim1=1, dim2=2)
    dead = diag == 0
    diag[dead] = 1.0
    w[dead.unsqueeze(1).expand_as(w)] = 0.0
    return w, inverse_cholesky(h, diag.mean(1), damping)


def gptq_round(w: torch.Tensor, h: torch.Tensor, scale: torch.Tensor, qmin: int, qmax: int) -> torch.Tensor:
    """Integer weights for `w` [G, O, K] given Hessians `h` [G, K, K] and scales [G, O].

    Columns go in blocks of `BLOCK` (the paper's lazy batch updates): each column's error feeds the rest of its
    block at once, and the block's errors reach the columns after it in one matmul, not one pass per column.
    """
    w, hinv = gptq_setup(w, h)
    scale = scale.double()
    k = w.shape[-1]
    q = torch.empty_like(w)
    for start in range(0, k, BLOCK):
        stop = min(start + BLOCK, k)
        block = w[:, :, start:stop]  # a view: updates land in w
        errors = torch.empty_like(block)
        for j in range(stop - start):
            i = start + j
            col = block[:, :, j]
            q[:, :, i] = torch.clamp(torch.round(col / scale), qmin, qmax)
            err = (col - q[:, :, i] * scale) / hinv[:, i, i].unsqueeze(1)
            block[:, :, j + 1:] -= err.unsqueeze(2) * hinv[:, i, i + 1:stop].unsqueeze(1)
            errors[:, :, j] = err
        if stop < k:
            w[:, :, stop:] -= errors @ hinv[:, start:stop, stop:]
    return q
