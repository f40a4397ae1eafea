"""How close one model's outputs are to another's: the numbers `quantize`'s report and `search` both give.

Float metrics (top-1 agreement, KL, SQNR) compare FP32 with a quantized model; `first_difference`
compares two integer backends, which must agree bit for bit.

Every agreement comes with a bootstrap 95% interval. Crops of one photo are correlated (a model that
misreads a texture misreads most crops of it), so the bootstrap resamples photos, not crops: a cluster
bootstrap over each sample's `groups` id. Without groups, samples are treated as independent.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np

BOOTSTRAP_RESAMPLES = 2000  # the 2.5% and 97.5% quantiles move by about 0.1 points between seeds at this count
BOOTSTRAP_SEED = 0
BOOTSTRAP_LEVEL = 0.95
# An FP32 top-1/top-2 logit gap above this makes a "confident" input: issue #15 found that rounding only the input
# to the int8 grid flips none of them, so their agreement is the figure least hurt by near ties.
CONFIDENT_GAP = 1.0
_BOOTSTRAP_CHUNK = 4_000_000  # drawn cluster ids held at once by the vectorized bootstrap (32 MB of int64)


def sqnr_db(signal: float, noise: float) -> float | None:
    """10 log10(signal / noise); None when the noise is exactly zero (infinite SQNR)."""
    if noise == 0.0:
        return None
    # An all-zero float tensor with a nonzero error gets a hugely negative (but finite, JSON-safe) value.
    return 10.0 * math.log10(max(signal, 1e-300) / noise)


def top1_agreement(reference: np.ndarray, other: np.ndarray) -> float:
    """Fraction of samples whose highest class score is the same class in both (last axis: classes)."""
    return float(np.mean(reference.argmax(-1) == other.argmax(-1)))


def logit_gap(logits: np.ndarray) -> np.ndarray:
    """Top-1 minus top-2 score of each sample (last axis: classes); 0 for a tie."""
    top2 = np.sort(logits, axis=-1)[..., -2:]
    return top2[..., 1] - top2[..., 0]


def confident_mask(reference: np.ndarray, gap: float = CONFIDENT_GAP) -> np.ndarray:
    """The samples whose reference (FP32) top-1/top-2 logit gap is above `gap`."""
    return logit_gap(reference) > gap


class Interval(NamedTuple):
    """A bootstrap percentile interval and how many resamples it came from."""

    low: float
    high: float
    resamples: int


def _group_index(groups: np.ndarray | None, n: int) -> tuple[np.ndarray, int]:
    """Each sample's group as 0..G-1, and G; None: every sample its own group."""
    if groups is None:
        return np.arange(n), n
    groups = np.asarray(groups)
    if groups.shape != (n,):
        raise ValueError(f"groups has shape {groups.shape}; expected one id per sample ({n},)")
    _, index = np.unique(groups, return_inverse=True)
    return index, int(index.max()) + 1


def _draws(n_groups: int, resamples: int, seed: int) -> Iterator[np.ndarray]:
    """The groups each resample takes (n_groups of them, with replacement), a block of resamples at a time so
    that a large sample does not hold every draw in memory at once."""
    rng = np.random.default_rng(seed)
    block = max(1, _BOOTSTRAP_CHUNK // n_groups)
    for start in range(0, resamples, block):
        yield rng.integers(0, n_groups, size=(min(block, resamples - start), n_groups))


def bootstrap_interval(values: np.ndarray, groups: np.ndarray | None = None,
                       statistic: Callable[[np.ndarray], float] | None = None, *,
                       resamples: int = BOOTSTRAP_RESAMPLES, seed: int = BOOTSTRAP_SEED,
                       level: float = BOOTSTRAP_LEVEL) -> Interval:
    """Percentile bootstrap interval of a statistic of per-sample `values` (first axis: samples).

    Each resample draws as many groups as there are, with replacement, and keeps all their samples (a cluster
    bootstrap; `groups=None` resamples samples). The statistic defaults to the mean over samples, computed
    from group sums without expanding the resamples; any other `statistic(values[resampled])` is called
    once per resample. Deterministic for a given `seed`.
    """
    values = np.asarray(values)
    n = len(values)
    if n == 0:
        raise ValueError("cannot bootstrap an empty sample")
    if not 0 < level < 1 or resamples < 1:
        raise ValueError(f"need 0 < level < 1 and resamples >= 1; got level {level}, resamples {resamples}")
    index, n_groups = _group_index(groups, n)
    if statistic is None:
        # Mean of a resample = its groups' summed values over their summed sizes.
        sums = np.bincount(index, weights=values.astype(np.float64), minlength=n_groups)
        sizes = np.bincount(index, minlength=n_groups).astype(np.float64)
        equal_sizes = bool(np.all(sizes == sizes[0]))  # then every resample has n samples
        stats = np.concatenate([sums[rows].sum(1) / (n if equal_sizes else sizes[rows].sum(1))
                                for rows in _draws(n_groups, resamples, seed)])
    else:
        members = [np.flatnonzero(index == g) for g in range(n_groups)]
        stats = np.array([statistic(values[np.concatenate([members[g] for g in row])])
                          for rows in _draws(n_groups, resamples, seed) for row in rows])
    tail = (1 - level) / 2
    low, high = np.quantile(stats, [tail, 1 - tail])
    return Interval(float(low), float(high), resamples)


def paired_difference(a: np.ndarray, b: np.ndarray, groups: np.ndarray | None = None,
                      statistic: Callable[[np.ndarray], float] | None = None, *,
                      resamples: int = BOOTSTRAP_RESAMPLES, seed: int = BOOTSTRAP_SEED,
                      level: float = BOOTSTRAP_LEVEL) -> tuple[float, Interval]:
    """statistic(a) - statistic(b) for two models scored on the same samples, with a paired bootstrap interval.

    Both are evaluated on the same resamples, so what the two share (hard photos, near ties) cancels out:
    the interval is much narrower than the two separate intervals suggest. The statistic defaults to the mean.
    """
    a, b = np.asarray(a), np.asarray(b)
    if a.shape != b.shape:
        raise ValueError(f"paired samples need equal shapes; got {a.shape} and {b.shape}")
    if statistic is None:
        delta = a.astype(np.float64) - b.astype(np.float64)
        return float(delta.mean()), bootstrap_interval(delta, groups, resamples=resamples, seed=seed, level=level)
    both = np.stack([a, b], axis=1)
    point = float(statistic(a) - statistic(b))
    return point, bootstrap_interval(both, groups, lambda v: statistic(v[:, 0]) - statistic(v[:, 1]),
                                     resamples=resamples, seed=seed, level=level)


@dataclass(frozen=True)
class Agreement:
    """Top-1 agreement on a set of samples, with its bootstrap interval.

    `photos` counts the distinct source photos of those samples (the bootstrap's clusters); None when the
    grouping is unknown and the samples were resampled as if independent.
    """

    agree: int
    samples: int
    photos: int | None
    low: float | None  # None when there are no samples
    high: float | None

    @property
    def value(self) -> float | None:
        return self.agree / self.samples if self.samples else None

    def to_json(self) -> dict[str, Any]:
        return {"agreement": self.value, "low": self.low, "high": self.high, "agree": self.agree,
                "samples": self.samples, "photos": self.photos}

    @classmethod
    def from_json(cls, record: Mapping[str, Any]) -> Agreement:
        return cls(record["agree"], record["samples"], record["photos"], record["low"], record["high"])

    def describe(self, unit: str = "crops") -> str:
        """'84.9% [79.2, 90.1] (163/192 crops of 13 photos)'."""
        if not self.samples:
            return f"n/a (no {unit})"
        return f"{self.short()} ({self.agree}/{self.samples} {self.counts(unit)})"

    def short(self) -> str:
        """'84.9% [79.2, 90.1]'; 'n/a' without samples."""
        if self.value is None or self.low is None or self.high is None:
            return "n/a"
        return f"{100 * self.value:.1f}% [{100 * self.low:.1f}, {100 * self.high:.1f}]"

    def counts(self, unit: str = "crops") -> str:
        """What the samples are: 'crops of 13 photos', 'photos, one crop each' or 'samples, grouping unknown'."""
        if self.photos is None:
            return "samples, grouping unknown"
        if self.photos == self.samples:
            return "photos, one crop each" if unit == "crops" else unit
        return f"{unit} of {self.photos} photo{'s' if self.photos != 1 else ''}"


def agreement(reference: np.ndarray, other: np.ndarray, groups: np.ndarray | None = None,
              mask: np.ndarray | None = None, *, resamples: int = BOOTSTRAP_RESAMPLES,
              seed: int = BOOTSTRAP_SEED) -> Agreement:
    """Top-1 agreement of `other` with `reference` on the samples in `mask` (all by default), with a cluster
    bootstrap 95% interval over `groups` (each sample's source photo; None: samples independent)."""
    agrees = reference.argmax(-1) == other.argmax(-1)
    if mask is not None:
        agrees = agrees[mask]
        groups = None if groups is None else np.asarray(groups)[mask]
    if not len(agrees):
        return Agreement(0, 0, None if groups is None else 0, None, None)
    interval = bootstrap_interval(agrees, groups, resamples=resamples, seed=seed)
    photos = None if groups is None else len(np.unique(groups))
    return Agreement(int(agrees.sum()), len(agrees), photos, interval.low, interval.high)


def agreement_summary(reference: np.ndarray, other: np.ndarray, groups: np.ndarray | None = None,
                      gap: float = CONFIDENT_GAP) -> dict[str, Any]:
    """The agreement record reports carry: on all samples, and on the confident ones (FP32 gap above `gap`)."""
    return {
        "top1": agreement(reference, other, groups).to_json(),
        "confident": {"gap": gap, **agreement(reference, other, groups, confident_mask(reference, gap)).to_json()},
        "bootstrap": {"resamples": BOOTSTRAP_RESAMPLES, "seed": BOOTSTRAP_SEED, "level": BOOTSTRAP_LEVEL,
                      "resampled": "samples" if groups is None else "photos"},
    }


def describe_agreement_summary(summary: Mapping[str, Any], unit: str = "crops") -> str:
    """'84.9% [79.2, 90.1] (163/192 crops of 13 photos); confident inputs (gap > 1.0): 97.0% [..] (97/100)'."""
    confident = summary["confident"]
    return (f"{Agreement.from_json(summary['top1']).describe(unit)}; confident inputs "
            f"(gap > {float(confident['gap'])}): {Agreement.from_json(confident).describe(unit)}")


def log_softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def mean_kl(reference: np.ndarray, other: np.ndarray) -> float:
    """Mean over samples of KL(softmax(reference) || softmax(other)), for (N, classes) scores."""
    lp, lq = log_softmax(reference), log_softmax(other)
    return float(np.mean(np.sum(np.exp(lp) * (lp - lq), axis=1)))


def cosine_summary(fp32: np.ndarray, other: np.ndarray, groups: np.ndarray | None = None) -> dict[str, Any]:
    """Each sample's cosine between two embeddings [N, D]: the mean with its bootstrap interval, the worst 1% and
    the minimum."""
    f, q = fp32.astype(np.float64), other.astype(np.float64)
    norms = np.maximum(np.linalg.norm(f, axis=1) * np.linalg.norm(q, axis=1), 1e-300)
    cos = np.sum(f * q, axis=1) / norms
    interval = bootstrap_interval(cos, groups)
    return {"samples": len(cos), "mean": float(cos.mean()), "interval": [interval.low, interval.high],
            "worst_1pct": float(np.percentile(cos, 1)), "min": float(cos.min())}


def output_fidelity(fp32: np.ndarray, int8: np.ndarray, groups: np.ndarray | None = None,
                    embedding: bool = False) -> dict[str, Any]:
    """SQNR of one output over a batch, and for class scores top-1 agreement (with intervals, see
    `agreement_summary`) and mean KL(softmax fp32 || softmax int8), for an `embedding` its cosines
    (`cosine_summary`); `groups`: each sample's source photo, None if unknown."""
    f, q = fp32.astype(np.float64), int8.astype(np.float64)
    result: dict[str, Any] = {
        "samples": len(f),
        "sqnr_db": sqnr_db(float(np.sum(f * f)), float(np.sum((f - q) ** 2))),
        "max_abs_error": float(np.max(np.abs(f - q))),
        "top1_agreement": None,
        "mean_kl": None,
    }
    if embedding:
        result["cosine"] = cosine_summary(f, q, groups)
    elif f.ndim == 2:  # class scores: the classification metrics are meaningful
        result["top1_agreement"] = top1_agreement(f, q)
        result["mean_kl"] = mean_kl(f, q)
        result["agreement"] = agreement_summary(f, q, groups)
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
