"""Perplexity of a causal language model over a token sequence, in non-overlapping windows (numpy only).

The sequence is cut into windows of `window` tokens (the last one may be shorter; a last window of one token is
dropped, as it has nothing to score). Each window is run on its own, from an empty context: it scores its tokens
2..n given the tokens before them in that window, so every window costs one prefill and no token is scored twice.
This is the usual "non-overlapping" evaluation; it is pessimistic next to a sliding window, whose tokens all have
long contexts.

Perplexity = exp(total NLL / scored tokens). The interval is a percentile bootstrap over windows (windows are the
independent-ish units; tokens within one are not), resampling whole windows and recomputing the ratio.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from ..errors import LowbitError

DEFAULT_WINDOW = 512
MIN_WINDOW = 2
BOOTSTRAP_SAMPLES = 2000
CONFIDENCE = 0.95


@dataclass(frozen=True)
class PerplexityResult:
    """Perplexity over `tokens` scored tokens in `windows` windows of up to `window` tokens, with a bootstrap
    `interval` (CONFIDENCE, over windows). `window_nll` and `window_tokens` give each window's summed NLL and count."""

    perplexity: float
    mean_nll: float
    tokens: int
    windows: int
    window: int
    interval: tuple[float, float]
    window_nll: tuple[float, ...]
    window_tokens: tuple[int, ...]

    def as_dict(self) -> dict[str, object]:
        return {"perplexity": self.perplexity, "interval": list(self.interval), "confidence": CONFIDENCE,
                "mean_nll": self.mean_nll, "tokens": self.tokens, "windows": self.windows, "window": self.window}


def window_bounds(n_tokens: int, window: int, max_windows: int | None = None) -> list[tuple[int, int]]:
    """(start, end) of each window of at least MIN_WINDOW tokens, at most `max_windows` of them (None: all)."""
    if isinstance(window, bool) or not isinstance(window, int) or window < MIN_WINDOW:
        raise LowbitError(f"window must be an integer >= {MIN_WINDOW} (each window scores tokens 2..n), "
                          f"got {window!r}")
    if max_windows is not None and max_windows < 1:
        raise LowbitError(f"max_windows must be at least 1, got {max_windows}")
    bounds = [(s, min(s + window, n_tokens)) for s in range(0, n_tokens, window)]
    bounds = [(s, e) for s, e in bounds if e - s >= MIN_WINDOW]
    return bounds if max_windows is None else bounds[:max_windows]


def token_nll(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """-log softmax(logits)[target] per position, float64; logits [t, vocab], targets [t]."""
    x = logits.astype(np.float64)
    top = x.max(axis=-1, keepdims=True)
    log_z = top[:, 0] + np.log(np.exp(x - top).sum(axis=-1))
    return log_z - x[np.arange(len(targets)), targets]


def bootstrap_interval(window_nll: np.ndarray, window_tokens: np.ndarray, samples: int = BOOTSTRAP_SAMPLES,
                       seed: int = 0) -> tuple[float, float]:
    """Percentile interval of exp(sum NLL / sum tokens) over windows resampled with replacement."""
    n = len(window_nll)
    if n == 1:
        ppl = float(np.exp(window_nll[0] / window_tokens[0]))
        return ppl, ppl
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, n, size=(samples, n))
    ppl = np.exp(window_nll[picks].sum(axis=1) / window_tokens[picks].sum(axis=1))
    alpha = (1 - CONFIDENCE) / 2
    low, high = np.quantile(ppl, [alpha, 1 - alpha])
    return float(low), float(high)


def perplexity(logits_fn: Callable[[np.ndarray], np.ndarray], token_ids: np.ndarray, window: int = DEFAULT_WINDOW,
               max_windows: int | None = None, log: Callable[[str], None] | None = None,
               seed: int = 0) -> PerplexityResult:
    """Perplexity of `logits_fn` (ids int64 [1, t] -> logits [1, t, vocab]) over `token_ids` [n].

    `max_windows` keeps only the first windows (for quick checks); `log` hears "window i/n: ppl so far" lines
    (pass a `Progress` step log); `seed` seeds the bootstrap.
    """
    ids = np.asarray(token_ids)
    if ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer):
        raise LowbitError(f"token ids must be a 1-D integer array, got {ids.dtype} {ids.shape}")
    bounds = window_bounds(len(ids), window, max_windows)
    if not bounds:
        raise LowbitError(f"the text has {len(ids)} token(s); perplexity needs at least {MIN_WINDOW}")
    nll, counts = [], []
    for i, (start, end) in enumerate(bounds, 1):
        chunk = ids[start:end].astype(np.int64)[None, :]
        logits = np.asarray(logits_fn(chunk))
        if logits.ndim != 3 or logits.shape[:2] != chunk.shape:
            raise LowbitError(f"the model returned logits of shape {logits.shape} for ids of shape {chunk.shape}; "
                              "expected [1, t, vocab]")
        nll.append(float(token_nll(logits[0, :-1], chunk[0, 1:]).sum()))
        counts.append(end - start - 1)
        if log is not None:
            log(f"window {i}/{len(bounds)}: perplexity so far {np.exp(sum(nll) / sum(counts)):.3f}")
    window_nll, window_tokens = np.array(nll), np.array(counts)
    mean = float(window_nll.sum() / window_tokens.sum())
    if not np.isfinite(mean):
        raise LowbitError("the model gave a non-finite log-likelihood (NaN or infinite logits)")
    return PerplexityResult(float(np.exp(mean)), mean, int(window_tokens.sum()), len(bounds), window,
                            bootstrap_interval(window_nll, window_tokens, seed=seed), tuple(nll), tuple(counts))
