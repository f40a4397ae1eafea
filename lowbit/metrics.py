"""How close one model's outputs are to another's: the numbers `quantize`'s report and `search` both give.

Float metrics (top-1 agreement, KL, SQNR) compare FP32 with a quantized model; `first_difference`
compares two integer backends, which must agree bit for bit.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np


def sqnr_db(signal: float, noise: float) -> float | None:
    """10 log10(signal / noise); None when the noise is exactly zero (infinite SQNR)."""
    if noise == 0.0:
        return None
    # An all-zero float tensor with a nonzero error gets a hugely negative (but finite, JSON-safe) value.
    return 10.0 * math.log10(max(signal, 1e-300) / noise)


def top1_agreement(reference: np.ndarray, other: np.ndarray) -> float:
    """Fraction of samples whose highest class score is the same class in both (last axis: classes)."""
    return float(np.mean(reference.argmax(-1) == other.argmax(-1)))


def log_softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def mean_kl(reference: np.ndarray, other: np.ndarray) -> float:
    """Mean over samples of KL(softmax(reference) || softmax(other)), for (N, classes) scores."""
    lp, lq = log_softmax(reference), log_softmax(other)
    return float(np.mean(np.sum(np.exp(lp) * (lp - lq), axis=1)))


def output_fidelity(fp32: np.ndarray, int8: np.ndarray) -> dict[str, Any]:
    """Top-1 agreement, mean KL(softmax fp32 || softmax int8) and SQNR of one output over a batch."""
    f, q = fp32.astype(np.float64), int8.astype(np.float64)
    result: dict[str, Any] = {
        "samples": len(f),
        "sqnr_db": sqnr_db(float(np.sum(f * f)), float(np.sum((f - q) ** 2))),
        "max_abs_error": float(np.max(np.abs(f - q))),
        "top1_agreement": None,
        "mean_kl": None,
    }
    if f.ndim == 2:  # class scores: the classification metrics are meaningful
        result["top1_agreement"] = top1_agreement(f, q)
        result["mean_kl"] = mean_kl(f, q)
    return result


@dataclass(frozen=True)
class Difference:
    """Where two runs of one model first disagree: output, sample, element and both values."""

    output: str
    sample: int
    element: tuple[int, ...]
    got: int | float | str
    want: int | float | str
    differing: int  # elements that differ in this output, over all samples

    def describe(self, got_name: str, want_name: str) -> str:
        where = ", ".join(map(str, self.element))
        return (f"output {self.output!r}, sample {self.sample}, element [{where}]: {got_name} gives {self.got}, "
                f"{want_name} {self.want} ({self.differing} element(s) of this output differ)")


def first_difference(got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> Difference | None:
    """The first element (outputs in `want`'s order, then C order) where `got` differs from `want`; None if equal.

    Compares the values exactly, integers as integers: float32 would merge distinct int32 values above 2^24.
    """
    for name, expected in want.items():
        actual = got[name]
        if actual.shape != expected.shape:
            return Difference(name, 0, (), f"shape {actual.shape}", f"shape {expected.shape}", int(expected.size))
        unequal = actual != expected
        if unequal.any():
            index = tuple(int(i) for i in np.unravel_index(int(np.argmax(unequal)), unequal.shape))
            return Difference(name, index[0], index[1:], actual[index].item(), expected[index].item(),
                              int(unequal.sum()))
    return None
