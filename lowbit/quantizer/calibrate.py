"""Calibration: activation statistics per tensor, and the clipping range each method picks.

Two passes over the calibration data: the first finds each tensor's min and
max, the second fills a histogram of |x| over [0, max|x|]. From the histogram:

- `minmax`:     T = max |x|;
- `percentile`: T = the given percentile of |x|;
- `mse`:        T minimizing the expected squared error of quantize-dequantize
                (rounding noise s^2/12 inside the range, clipping error outside).

Quantization is symmetric: an unsigned tensor covers [0, T] in qmax steps (255 for
uint8), a signed one [-T, T] in qmax steps each side (127 for int8); `lowbit.ir.dtypes`.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np
import torch

from ..ir.dtypes import activation_dtype, steps
from .graph import Graph, run_graph
from .inputs import real_tokens, token_mask

METHODS = ("minmax", "percentile", "mse")
HIST_BINS = 2048


@dataclass
class TensorStats:
    min: float
    max: float
    hist: np.ndarray  # counts of |x| over HIST_BINS equal bins of [0, absmax]

    @property
    def absmax(self) -> float:
        return max(abs(self.min), abs(self.max))

    @property
    def nonnegative(self) -> bool:
        return self.min >= 0.0


def collect_stats(graph: Graph, batches: Callable[[], Iterable[torch.Tensor]], names: set[str] | None = None,
                  log: Callable[[str], None] = lambda _: None) -> dict[str, TensorStats]:
    """Statistics of the outputs in `names` (default: all nodes).

    `batches()` must yield the same data each time it is called. A text model's padded positions are left out
    (`inputs.real_tokens`): they never reach the output, yet in short sentences they are most of the rows and
    widen some ranges (MiniLM's first query projection: 1.9x).
    """
    lo: dict[str, float] = {}
    hi: dict[str, float] = {}
    wanted = names if names is not None else {n.name for n in graph.nodes}
    mask: torch.Tensor | None = None  # the current batch's

    def observe_range(name: str, t: torch.Tensor) -> torch.Tensor:
        if name in wanted:
            real = real_tokens(t, mask)
            lo[name] = min(lo.get(name, np.inf), float(real.min()))
            hi[name] = max(hi.get(name, -np.inf), float(real.max()))
        return t

    for i, x in enumerate(batches()):
        log(f"calibration pass 1/2 (ranges): batch {i + 1}")
        mask = token_mask(graph, x) if isinstance(x, dict) else None
        run_graph(graph, x, observe_range)

    hists = {n: np.zeros(HIST_BINS, dtype=np.int64) for n in lo}

    def observe_hist(name: str, t: torch.Tensor) -> torch.Tensor:
        top = max(abs(lo[name]), abs(hi[name])) if name in wanted else 0.0
        if top > 0:
            real = real_tokens(t, mask)
            hists[name] += torch.histc(real.abs().float(), HIST_BINS, 0.0, top).numpy().astype(np.int64)
        return t

    for i, x in enumerate(batches()):
        log(f"calibration pass 2/2 (histograms): batch {i + 1}")
        mask = token_mask(graph, x) if isinstance(x, dict) else None
        run_graph(graph, x, observe_hist)
    return {n: TensorStats(lo[n], hi[n], hists[n]) for n in lo}


def clip_threshold(stats: TensorStats, method: str, signed: bool, percentile: float = 99.99, bits: int = 8) -> float:
    """The clipping threshold T the method chooses for this tensor, quantized to `bits`-bit integers."""
    top = stats.absmax
    total = stats.hist.sum()
    if top == 0 or total == 0 or method == "minmax":
        return top
    edges = np.linspace(0.0, top, HIST_BINS + 1)
    if method == "percentile":
        cdf = np.cumsum(stats.hist) / total
        idx = int(np.searchsorted(cdf, percentile / 100.0))
        return float(edges[min(idx + 1, HIST_BINS)])
    if method == "mse":
        return _mse_threshold(stats.hist, edges, steps(activation_dtype(bits, unsigned=not signed)))
    raise ValueError(f"unknown calibration method {method!r}; expected one of {METHODS}")


def _mse_threshold(hist: np.ndarray, edges: np.ndarray, levels: int) -> float:
    centers = (edges[:-1] + edges[1:]) / 2
    candidates = edges[HIST_BINS // 64::HIST_BINS // 512][::-1]  # from absmax downwards
    best_t, best_err = float(edges[-1]), np.inf
    for t in candidates:
        step = t / levels
        inside = centers <= t
        err = (hist[inside].sum() * step * step / 12.0
               + np.sum(hist[~inside] * (centers[~inside] - t) ** 2))
        if err < best_err:
            best_t, best_err = float(t), err
    return best_t


def weight_scales(w: torch.Tensor, bits: int, method: str) -> torch.Tensor:
    """Per-output-channel symmetric scales for weight `w` (channel on dim 0)."""
    q = 2 ** (bits - 1) - 1
    flat = w.reshape(w.shape[0], -1).double()
    absmax = flat.abs().amax(1).clamp_min(1e-12)
    if method == "minmax":
        return (absmax / q).float()
    if method != "mse":
        raise ValueError(f"unknown weight range method {method!r}")
    # Grid search over clipping ratios, per channel: cheap, and it matters at 4 bits.
    best_scale, best_err = absmax / q, torch.full_like(absmax, np.inf)
    for ratio in torch.linspace(0.5, 1.0, 51, dtype=torch.float64):
        scale = absmax * ratio / q
        deq = torch.clamp(torch.round(flat / scale[:, None]), -q, q) * scale[:, None]
        err = ((deq - flat) ** 2).sum(1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_scale = torch.where(better, scale, best_scale)
    return best_scale.float()


# A recipe lowers the same weights several times (once per range method, then the final model); the mse range
# search costs seconds per transformer, so its scales are kept. Keyed by the tensor's identity and version (an
# in-place change bumps it); the entry holds the tensor, so its id cannot be reused while cached.
_SCALE_CACHE: OrderedDict[tuple[int, int, int, str], tuple[torch.Tensor, torch.Tensor]] = OrderedDict()
_SCALE_CACHE_SIZE = 1024


def cached_weight_scales(w: torch.Tensor, bits: int, method: str) -> torch.Tensor:
    key = (id(w), w._version, bits, method)
    if key in _SCALE_CACHE:
        _SCALE_CACHE.move_to_end(key)
        return _SCALE_CACHE[key][1]
    scale = weight_scales(w, bits, method)
    _SCALE_CACHE[key] = (w, scale)
    if len(_SCALE_CACHE) > _SCALE_CACHE_SIZE:
        _SCALE_CACHE.popitem(last=False)
    return scale


def round_weight(w: torch.Tensor, bits: int, method: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Round-to-nearest per-channel symmetric quantization: (integer values as float, per-channel scales)."""
    q = 2 ** (bits - 1) - 1
    scale = cached_weight_scales(w, bits, method)
    w_int = torch.clamp(torch.round(w / scale.reshape(-1, *[1] * (w.dim() - 1))), -q, q)
    return w_int, scale


def weight_error(w: torch.Tensor, bits: int, method: str) -> torch.Tensor:
    """Q_b(W) - W for round-to-nearest quantization at `bits`."""
    w_int, scale = round_weight(w, bits, method)
    return w_int * scale.reshape(-1, *[1] * (w.dim() - 1)) - w
