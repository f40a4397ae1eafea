"""Vector quantization of a linear's weight (`VQWeights`, after VPTQ 2024): codebooks and rounding, no model walk.

1. Rows are normalized by their RMS (stored as a float32 row scale), so one codebook serves rows of any size.
2. The codebook comes from k-means over the weight's vectors of `v` consecutive input columns, each element
   weighted by the Hessian diagonal of its column (times its row scale squared): the first-order share of the
   layer's output error that element carries. k-means++ seeds it; the codewords are then stored as int8 with
   one float32 scale, and every assignment uses those int8 codewords. An optional residual codebook is k-means
   on what the first codebook leaves.
3. Rounding is GPTQ's loop over columns, `v` at a time: a vector's codeword is the nearest under the weights
   1 / [U]_ii^2 (U: the upper Cholesky factor of H^-1, GPTQ's per-column error cost), then the error of each of
   its columns is spread over the columns not yet rounded, as `groupwise.gptq_groupwise` does for scalars. With
   `act_order` whole vectors go in order of decreasing Hessian diagonal (their columns stay contiguous in storage).

Without a Hessian (`h=None`) the codebook is unweighted k-means and each vector takes its nearest codeword.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..ir.vq_weights import MAX_INDEX_BITS, VQStage, VQWeights
from .rounding import BLOCK, DAMPING, gptq_setup

_TINY = float(np.finfo(np.float32).tiny)
_ASSIGN_CHUNK = 1 << 14
SEED_POINTS_PER_CODEWORD = 16  # points per distance matrix in `assign` (16k x 4096 float32: 256 MB at most)


@dataclass(frozen=True)
class VQSpec:
    """Vectors of `vector` input columns, a codebook of 2^`index_bits` entries, and optionally a residual codebook
    of 2^`residual_bits` entries (0: none) over the same vectors. Index bits per weight: (index_bits +
    residual_bits) / vector; the codebooks and row scales add a little (`VQWeights.nbytes`)."""

    vector: int = 4
    index_bits: int = 8
    residual_bits: int = 0
    # k-means on at most `kmeans_points` vectors drawn at random, `kmeans_iters` Lloyd iterations. On a random
    # 1536 x 576 weight (576-input Hessian), 2^15 points and 10 iterations gave a Hessian loss 4% above 2^17 and 25
    # at a quarter of the time (4.8 s against 20 s on one core); SmolLM2 has 210 linears to quantize.
    kmeans_iters: int = 10
    kmeans_points: int = 1 << 15

    def __post_init__(self) -> None:
        if self.vector < 1:
            raise ValueError(f"VQ vectors of {self.vector} columns: expected a positive length")
        if not 1 <= self.index_bits <= MAX_INDEX_BITS or not 0 <= self.residual_bits <= MAX_INDEX_BITS:
            raise ValueError(f"VQ codebooks of 2^{self.index_bits} and 2^{self.residual_bits} entries: index bits "
                             f"must be 1 to {MAX_INDEX_BITS} (residual: 0 for none)")
        if self.kmeans_iters < 0 or self.kmeans_points < 1 << self.index_bits:
            raise ValueError(f"k-means with {self.kmeans_iters} iterations on {self.kmeans_points} points: needs "
                             f"iterations >= 0 and at least as many points as codewords ({1 << self.index_bits})")

    @property
    def index_bits_per_weight(self) -> float:
        return (self.index_bits + self.residual_bits) / self.vector

    def describe(self) -> str:
        residual = f" + residual k{1 << self.residual_bits}" if self.residual_bits else ""
        return f"v{self.vector} k{1 << self.index_bits}{residual}"


# The CLI's VQ settings (`--weights vq2|vq3`): index bits per weight 2 and 3, plus codebooks and row scales.
VQ_PRESETS = {"vq2": VQSpec(vector=4, index_bits=8), "vq3": VQSpec(vector=4, index_bits=8, residual_bits=4)}


def assign(x: torch.Tensor, weights: torch.Tensor, codewords: torch.Tensor) -> torch.Tensor:
    """Index [n] of the codeword [k, d] nearest each point of `x` [n, d] under the per-element (or, [d], per-dim)
    `weights`: argmin_c sum_t w_t (x_t - c_t)^2 = argmin_c sum_t w_t c_t^2 - 2 w_t x_t c_t."""
    if weights.ndim == 1:  # one weight per dimension (GPTQ's loop): one addmm against a [d, k] table
        return torch.argmin(torch.addmm(((codewords * codewords) @ weights)[None, :], x,
                                        (-2 * weights[:, None]) * codewords.T), dim=1)
    out = torch.empty(x.shape[0], dtype=torch.long)
    # One matmul per chunk: [w, -2 w x] [n, 2d] @ [c^2, c]^T [2d, k], contiguous for the argmin.
    table = torch.cat([codewords * codewords, codewords], 1).T.contiguous()
    for start in range(0, x.shape[0], _ASSIGN_CHUNK):
        rows = slice(start, start + _ASSIGN_CHUNK)
        w = weights[rows]
        out[rows] = torch.argmin(torch.cat([w, -2 * w * x[rows]], 1) @ table, dim=1)
    return out


def weighted_kmeans(x: torch.Tensor, k: int, weights: torch.Tensor | None = None, iters: int = 10,
                    max_points: int = 1 << 15, seed: int = 0) -> torch.Tensor:
    """Codewords [k, d] minimizing sum_n sum_t weights[n, t] (x[n, t] - c[a(n), t])^2 (Lloyd's iterations from a
    weighted k-means++ seeding), on at most `max_points` points of `x` [n, d] drawn at random."""
    x = x.float()
    w = torch.ones_like(x) if weights is None else weights.float().expand_as(x)
    gen = torch.Generator().manual_seed(seed)
    pick = torch.randperm(x.shape[0], generator=gen)[:max_points]  # shuffled, so any prefix is a random sample
    x, w = x[pick], w[pick]
    if x.shape[0] <= k:  # as many codewords as points: each point is one (the rest repeat them)
        return x[torch.arange(k) % x.shape[0]].clone()
    # k-means++ on a subsample of SEED_POINTS_PER_CODEWORD * k points (it is sequential in k): each next center
    # drawn with probability ~ its weighted squared distance to the nearest center so far.
    xs, ws = x[:SEED_POINTS_PER_CODEWORD * k], w[:SEED_POINTS_PER_CODEWORD * k]
    centers = torch.empty(k, x.shape[1])
    centers[0] = xs[torch.randint(xs.shape[0], (1,), generator=gen)]
    nearest = (ws * (xs - centers[0]) ** 2).sum(1)
    for i in range(1, k):
        j = (torch.multinomial(nearest, 1, generator=gen) if float(nearest.sum()) > 0
             else torch.randint(xs.shape[0], (1,), generator=gen))
        centers[i] = xs[j]
        torch.minimum(nearest, (ws * (xs - centers[i]) ** 2).sum(1), out=nearest)
    for _ in range(iters):
        labels = assign(x, w, centers)
        num = torch.zeros_like(centers).index_add_(0, labels, w * x)
        den = torch.zeros_like(centers).index_add_(0, labels, w)
        centers = torch.where(den > 0, num / den.clamp(min=_TINY), centers)
    return centers


def int8_codebook(codewords: torch.Tensor) -> tuple[np.ndarray, np.float32]:
    """Codewords [k, d] as int8 with one float32 scale (symmetric, max |c| -> 127)."""
    scale = np.float32(max(float(codewords.abs().max()) / 127, _TINY))
    values = torch.clamp(torch.round(codewords.double() / float(scale)), -127, 127)
    return values.numpy().astype(np.int8), scale


def vq_quantize(w: torch.Tensor | np.ndarray, spec: VQSpec, h: torch.Tensor | None = None, feedback: bool = True,
                damp: float = DAMPING, act_order: bool = False, block: int = BLOCK, seed: int = 0) -> VQWeights:
    """Vector-quantize `w` [out, in] by `spec`. With the inputs' Hessian `h` [in, in]: the codebooks are weighted
    by its diagonal and (`feedback`) the vectors are rounded by GPTQ's error feedback; without it, unweighted
    codebooks and nearest codewords."""
    w = torch.as_tensor(w).double()
    if w.ndim != 2:
        raise ValueError(f"vector quantization takes a linear's weight [out, in], not {list(w.shape)}")
    out, k = w.shape
    v = spec.vector
    if k % v:
        raise ValueError(f"VQ vectors of {v} columns do not tile the {k} input columns; pick a divisor of {k}")
    if h is not None and tuple(h.shape) != (k, k):
        raise ValueError(f"Hessian of shape {list(h.shape)} for a weight of {k} input columns")
    row_scale = torch.sqrt((w * w).mean(1)).clamp(min=_TINY).float().double()  # float32, as stored
    wn = w / row_scale[:, None]
    diag = torch.ones(k, dtype=torch.float64) if h is None else torch.diagonal(h).double()
    diag = diag.clamp(min=1e-8 * float(diag.mean()) + _TINY)
    element_weights = (row_scale[:, None] ** 2 * diag[None, :]).reshape(-1, v)
    vectors = wn.reshape(-1, v)
    # Every stage's k-means runs on one random sample of the vectors (the residual stage on what the first
    # codebook leaves of the same sample), so no stage needs a pass over all of them.
    pick = torch.randperm(len(vectors), generator=torch.Generator().manual_seed(seed))[:spec.kmeans_points]
    target, sample_weights = vectors[pick].float(), element_weights[pick].float()
    stages, codewords = [], []
    for s, bits in enumerate(b for b in (spec.index_bits, spec.residual_bits) if b):
        centers = weighted_kmeans(target, 1 << bits, sample_weights, spec.kmeans_iters, spec.kmeans_points, seed + s)
        cb, scale = int8_codebook(centers)
        stages.append((cb, scale))
        codewords.append(torch.from_numpy(cb).float() * float(scale))
        target = target - codewords[-1][assign(target, sample_weights, codewords[-1])]
    if h is None or not feedback:
        indices = _nearest(vectors.float(), element_weights.float(), codewords)
        indices = [i.reshape(out, k // v) for i in indices]
    else:
        indices = _gptq_vectors(wn, h, codewords, v, damp, act_order, block)
    return VQWeights(row_scale.numpy().astype(np.float32),
                     tuple(VQStage(cb, scale, i.numpy().astype(np.uint16))
                           for (cb, scale), i in zip(stages, indices, strict=True)), k)


def _nearest(x: torch.Tensor, weights: torch.Tensor, codewords: list[torch.Tensor]) -> list[torch.Tensor]:
    """Per stage, each vector's codeword index, the residual stage on what the earlier stages leave (greedy)."""
    indices, residual = [], x
    for cw in codewords:
        i = assign(residual, weights, cw)
        indices.append(i)
        residual = residual - cw[i]
    return indices


def _gptq_vectors(wn: torch.Tensor, h: torch.Tensor, codewords: list[torch.Tensor], v: int, damp: float,
                  act_order: bool, block: int) -> list[torch.Tensor]:
    """GPTQ's column loop, `v` columns (one vector per row) at a time; per stage the indices [out, in / v]."""
    out, k = wn.shape
    n_vec = k // v
    order = (torch.argsort(torch.diagonal(h).reshape(n_vec, v).sum(1), descending=True, stable=True)
             if act_order else torch.arange(n_vec))
    perm = (order[:, None] * v + torch.arange(v)).reshape(-1)
    work, hinv = gptq_setup(wn[:, perm][None], h[perm][:, perm][None], damp)
    hinv = hinv[0].float()
    work = work[0].T.float().contiguous()  # columns as rows [in, out], as gptq_groupwise
    cost = 1 / torch.diagonal(hinv) ** 2  # GPTQ's error cost of each column
    block = -(-block // v) * v
    found = [torch.empty(n_vec, out, dtype=torch.long) for _ in codewords]
    for start in range(0, k, block):
        stop = min(start + block, k)
        errors = torch.empty(stop - start, out)
        for i in range(start, stop, v):
            chosen = _nearest(work[i:i + v].T, cost[i:i + v], codewords)
            q = torch.zeros(out, v)
            for stage, (cw, idx) in enumerate(zip(codewords, chosen, strict=True)):
                found[stage][i // v] = idx
                q += cw[idx]
            for t in range(v):  # the vector's columns, each error fed to the columns after it (its own included)
                c = i + t
                err = errors[c - start]
                torch.div(work[c] - q[:, t], hinv[c, c], out=err)
                work[c + 1:stop].addr_(hinv[c, c + 1:stop], err, alpha=-1)
        if stop < k:
            work[stop:].addmm_(hinv[start:stop, stop:].T, errors, alpha=-1)
    result = []
    for idx in found:
        stored = torch.empty(out, n_vec, dtype=torch.long)
        stored[:, order] = idx.T
        result.append(stored)
    return result
