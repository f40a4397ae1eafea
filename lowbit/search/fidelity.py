"""How close a plan's output is to FP32, per sample: the one metric a search measures, bisects and reports.

A classifier is scored by top-1 agreement (does the plan's class match FP32's?), a
sentence encoder by the cosine of its embedding with FP32's. Both are a mean over
held-out samples of a per-sample score, so one drop and one paired bootstrap interval
(`metrics.paired_difference`) serve both: drop = baseline's mean - plan's mean.

Every measured plan records `metric` (the key below), `score` (the mean) and
`score_interval`, beside the metric's own record (`agreement` or `cosine`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from ..metrics import Agreement, agreement_summary, bootstrap_interval, cosine_summary


@dataclass(frozen=True)
class Fidelity:
    """A per-sample fidelity score of a model output against FP32's (higher is better, 1 at best)."""

    key: str  # "top1_agreement" or "cosine"
    label: str  # what a report calls it

    def per_sample(self, reference: np.ndarray, output: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def details(self, reference: np.ndarray, output: np.ndarray, groups: np.ndarray | None) -> dict[str, Any]:
        """The metric's own record, beside the generic score (for the report's extra columns)."""
        raise NotImplementedError

    def measure(self, reference: np.ndarray, output: np.ndarray, groups: np.ndarray | None) -> dict[str, Any]:
        """`metric`, `score`, `score_interval` (bootstrap 95% over `groups`, or samples) and the details."""
        scores = self.per_sample(reference, output)
        interval = bootstrap_interval(scores, groups)
        return {"metric": self.key, "score": float(scores.mean()), "score_interval": [interval.low, interval.high],
                **self.details(reference, output, groups)}

    def value(self, score: float) -> str:
        raise NotImplementedError

    def difference(self, delta: float) -> str:
        raise NotImplementedError

    def short(self, measured: dict[str, Any]) -> str:
        """'84.9% [79.2, 90.1]' or '0.9972 [0.9961, 0.9981]' for a measured plan."""
        low, high = measured.get("score_interval") or (None, None)
        if low is None or high is None:
            return self.value(measured["score"])
        return f"{self.value(measured['score'])} [{self.value(low)}, {self.value(high)}]"


class TopOneAgreement(Fidelity):
    def __init__(self) -> None:
        super().__init__("top1_agreement", "top-1 agreement")

    def per_sample(self, reference: np.ndarray, output: np.ndarray) -> np.ndarray:
        return (reference.argmax(-1) == output.argmax(-1)).astype(np.float64)

    def details(self, reference: np.ndarray, output: np.ndarray, groups: np.ndarray | None) -> dict[str, Any]:
        summary = agreement_summary(reference, output, groups)
        return {"top1_agreement": Agreement.from_json(summary["top1"]).value, "agreement": summary}

    def value(self, score: float) -> str:
        return f"{100 * score:.1f}%"

    def difference(self, delta: float) -> str:
        return f"{100 * delta:+.1f}"

    def short(self, measured: dict[str, Any]) -> str:
        if "agreement" in measured:  # the interval resamples photos
            return Agreement.from_json(measured["agreement"]["top1"]).short()
        return super().short(measured)


class EmbeddingCosine(Fidelity):
    def __init__(self) -> None:
        super().__init__("cosine", "embedding cosine")

    def per_sample(self, reference: np.ndarray, output: np.ndarray) -> np.ndarray:
        f, q = reference.astype(np.float64), output.astype(np.float64)
        return np.sum(f * q, axis=1) / np.maximum(np.linalg.norm(f, axis=1) * np.linalg.norm(q, axis=1), 1e-300)

    def details(self, reference: np.ndarray, output: np.ndarray, groups: np.ndarray | None) -> dict[str, Any]:
        return {"cosine": cosine_summary(reference, output, groups)}

    def value(self, score: float) -> str:
        return f"{score:.4f}"

    def difference(self, delta: float) -> str:
        return f"{delta:+.4f}"


TOP1 = TopOneAgreement()
COSINE = EmbeddingCosine()
FIDELITIES = {f.key: f for f in (TOP1, COSINE)}


def fidelity_of(embedding: bool) -> Fidelity:
    """The metric of a model's output: cosine for a pooled embedding, top-1 agreement for class scores."""
    return COSINE if embedding else TOP1


def fidelity_of_record(measured: dict[str, Any]) -> Fidelity:
    """The metric a measured plan was scored by (records from before `metric` existed are top-1 agreement)."""
    return FIDELITIES[measured.get("metric", TOP1.key)]


def extra_column(measured: dict[str, Any]) -> tuple[str, str]:
    """A report's second fidelity column for a measured plan: (header, cell)."""
    if "cosine" in measured:
        c = measured["cosine"]
        return "worst 1% / min cosine", f"{c['worst_1pct']:.4f} / {c['min']:.4f}"
    agreement = measured.get("agreement")
    cell = "-" if agreement is None else Agreement.from_json(agreement["confident"]).describe()
    return "confident inputs", cell
