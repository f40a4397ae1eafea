"""How well sentence embeddings track human similarity judgements, and how close two encoders' embeddings are.

Torch-free: every function takes numpy embeddings, or an ``embed(texts) -> [n, hidden]`` callable, so the
same code scores FP32 torch, ONNX Runtime and a compiled artifact.

- Lee-50: Spearman correlation between the cosine similarities of the 50 documents' embeddings and the
  human ratings, over the 1225 pairs (gensim's own test uses the same pairs, with Pearson).
- WordSim-353, SimLex-999: each word embedded on its own (as a one-word sentence); Spearman between the
  pairs' cosines and the human scores.
- Agreement with a reference encoder: per-sentence cosine, its mean and its worst 1%.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from scipy.stats import spearmanr

from ..errors import LowbitError
from .corpora import SIMLEX999, WORDSIM353, Lee50, WordPairs, read_lee50, read_word_pairs

Embed = Callable[[list[str]], np.ndarray]
WORST_FRACTION = 0.01


def _unit_rows(x: np.ndarray, what: str) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2 or not np.all(np.isfinite(x)):
        raise LowbitError(f"{what}: expected a finite [n, hidden] array of embeddings, got shape {x.shape}")
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    if np.any(norms == 0):
        raise LowbitError(f"{what}: {int(np.sum(norms == 0))} embedding(s) are all zeros; cosine is undefined")
    return x / norms


def row_cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine similarity of each row of `a` with the same row of `b` (float64)."""
    if np.shape(a) != np.shape(b):
        raise LowbitError(f"cannot compare embeddings of shapes {np.shape(a)} and {np.shape(b)}")
    return np.sum(_unit_rows(a, "reference") * _unit_rows(b, "embeddings"), axis=1)


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    """Spearman rank correlation (ties get average ranks)."""
    rho = spearmanr(np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)).statistic
    return float(rho)


def lee50_spearman(document_embeddings: np.ndarray, lee: Lee50) -> float:
    """Spearman of the documents' pairwise embedding cosines against the human ratings (1225 pairs)."""
    if len(document_embeddings) != len(lee.documents):
        raise LowbitError(f"Lee-50: expected {len(lee.documents)} document embeddings, got {len(document_embeddings)}")
    unit = _unit_rows(document_embeddings, "Lee-50 documents")
    i, j, human = lee.pairs()
    return spearman(np.sum(unit[i] * unit[j], axis=1), human)


def word_pairs_spearman(words: Sequence[str], word_embeddings: np.ndarray, pairs: WordPairs) -> float:
    """Spearman of the pairs' embedding cosines against the human scores; `words[k]` has `word_embeddings[k]`."""
    index = {w: k for k, w in enumerate(words)}
    absent = sorted((set(pairs.first) | set(pairs.second)) - set(index))
    if absent:
        raise LowbitError(f"{pairs.name}: no embedding for {len(absent)} word(s), e.g. {absent[:5]}")
    unit = _unit_rows(word_embeddings, pairs.name)
    a = unit[[index[w] for w in pairs.first]]
    b = unit[[index[w] for w in pairs.second]]
    return spearman(np.sum(a * b, axis=1), pairs.scores)


@dataclass(frozen=True)
class CosineAgreement:
    """Per-sentence cosine between an encoder's embeddings and a reference's: mean, worst 1% and minimum.

    ``worst_1pct`` is the mean over the lowest ceil(1% of n) sentences (at least one), so with 200
    held-out sentences it averages the worst two.
    """

    n: int
    mean: float
    worst_1pct: float
    minimum: float


def cosine_agreement(reference: np.ndarray, other: np.ndarray) -> CosineAgreement:
    cos = np.sort(row_cosines(reference, other))
    worst = max(1, math.ceil(WORST_FRACTION * len(cos)))
    return CosineAgreement(len(cos), float(cos.mean()), float(cos[:worst].mean()), float(cos[0]))


@dataclass(frozen=True)
class SimilarityScores:
    """Spearman correlations with human judgements on the three packaged sets."""

    lee50: float
    wordsim353: float
    simlex999: float


def similarity_scores(embed: Embed) -> SimilarityScores:
    """Score an encoder on Lee-50, WordSim-353 and SimLex-999 (each distinct word is embedded once)."""
    lee = read_lee50()
    lee_rho = lee50_spearman(embed(list(lee.documents)), lee)
    word_scores = []
    for name in (WORDSIM353, SIMLEX999):
        pairs = read_word_pairs(name)
        words = pairs.words()
        word_scores.append(word_pairs_spearman(words, embed(words), pairs))
    return SimilarityScores(lee_rho, *word_scores)
