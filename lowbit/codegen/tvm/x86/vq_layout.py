"""Vector-quantized weights (`VQWeights`: vq2, vq3) for the float-activation GEMV/GEMM `gemv_vq`: the layout and
its numpy packer (no TVM here, so they test alone).

The weight [N, K] may be several linears' rows stacked (q, k and v: one call), each part ("segment") with its own
codebooks; the parts share K, the vector length v and the index widths. Operands, in the kernel's order after x:
- `row_scale`: float32 [N];
- per stage s: `codebook{s}` float32 [G, 2^bits_s, v], segment g's codewords (int8 codebook times its scale,
  dequantized once at pack time: 4 KB for 256 x 4), so a codeword is one v-wide vector load;
- per stage s: `indices{s}` int32 [N, (K / v) / (32 / bits_s)]: each row's indices, 32 / bits_s to a word, the
  index of vector j in bits bits_s * (j % per) .. of word j // per (per = 32 / bits_s; little-endian, as the
  stored `pack_bits` stream: an 8-bit index is a byte of its row). One word load serves 4 (vq2) or 8 (vq3's
  residual) vectors, and an index costs a shift and a mask.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ....errors import LowbitError
from ....ir.vq_weights import VQWeights

WORD_BITS = 32
INDEX_BITS = (1, 2, 4, 8)  # index widths that tile an int32 word
VECTORS = (4, 8)  # codeword lengths of one float32 xmm / ymm register


def check_vq_shape(K: int, N: int, v: int, bits: tuple[int, ...], where: str = "VQ GEMV") -> None:
    """Raise LowbitError unless the kernel's layout covers a [N, K] weight of vectors of v with these indices."""
    if not 1 <= len(bits) <= VQWeights.MAX_STAGES:
        raise LowbitError(f"{where}: {len(bits)} codebook stages; the kernel takes 1 or 2")
    if v not in VECTORS:
        raise LowbitError(f"{where}: vectors of {v} columns; the kernel loads codewords of {VECTORS} floats")
    for s, b in enumerate(bits):
        if b not in INDEX_BITS:
            raise LowbitError(f"{where}: stage {s} has {b}-bit indices; the kernel packs {INDEX_BITS}-bit "
                              f"indices into int32 words (quantize the layer with one of those)")
    step = v * max(WORD_BITS // b for b in bits)
    if K <= 0 or K % step:
        raise LowbitError(f"{where}: {K} input columns; the kernel reads a word of indices at a time ({step} "
                          f"columns), so pad the weight's columns (and x) with zeros to a multiple of {step}")
    if N <= 0:
        raise LowbitError(f"{where}: {N} output features")


@dataclass(frozen=True)
class VQPacked:
    """`pack_vq_gemv`'s result: the kernel's constant operands (module docstring) and the rows per segment."""

    row_scale: np.ndarray
    codebooks: tuple[np.ndarray, ...]
    indices: tuple[np.ndarray, ...]
    segments: tuple[int, ...]

    def arrays(self) -> list[np.ndarray]:
        """The operands after x, in the kernel's parameter order."""
        return [self.row_scale, *self.codebooks, *self.indices]

    @property
    def nbytes(self) -> int:
        """Bytes a call reads from these weights."""
        return sum(a.nbytes for a in self.arrays())


def pack_indices_words(indices: np.ndarray, bits: int) -> np.ndarray:
    """uint16 [N, J] indices < 2^bits -> int32 [N, J / per], index j in bits bits * (j % per) of word j // per
    (per = 32 / bits)."""
    per = WORD_BITS // bits
    n, j = indices.shape
    shifts = (bits * np.arange(per)).astype(np.uint32)
    words = (indices.astype(np.uint32).reshape(n, j // per, per) << shifts).sum(axis=-1, dtype=np.uint32)
    return np.ascontiguousarray(words).view(np.int32)


def pack_vq_gemv(weights: VQWeights | Sequence[VQWeights]) -> VQPacked:
    """The `gemv_vq` kernel's operands for one linear's weights, or several stacked (their rows in order, each
    with its codebooks: a segment)."""
    parts = [weights] if isinstance(weights, VQWeights) else list(weights)
    if not parts:
        raise LowbitError("pack_vq_gemv: no weights")
    first = parts[0]
    kinds = {(w.in_features, tuple((s.vector, s.bits) for s in w.stages)) for w in parts}
    if len(kinds) != 1:
        raise LowbitError(f"pack_vq_gemv: stacked weights differ in input features, vector length or index widths "
                          f"({sorted(kinds)}); stack only linears quantized with one VQ preset and one input")
    vs = {s.vector for s in first.stages}
    if len(vs) != 1:
        raise LowbitError(f"pack_vq_gemv: stages with vectors of {sorted(vs)} columns; the kernel needs one length")
    bits = tuple(s.bits for s in first.stages)
    check_vq_shape(first.in_features, sum(w.shape[0] for w in parts), vs.pop(), bits, "pack_vq_gemv")
    return VQPacked(
        np.ascontiguousarray(np.concatenate([w.row_scale for w in parts]), np.float32),
        tuple(np.ascontiguousarray(np.stack([w.stages[s].codewords() for w in parts]), np.float32)
              for s in range(len(bits))),
        tuple(np.concatenate([pack_indices_words(w.stages[s].indices, b) for w in parts]) for s, b in enumerate(bits)),
        tuple(w.shape[0] for w in parts))
