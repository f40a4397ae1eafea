"""Smoothing before weight-only rounding (SmoothQuant+, Pan et al. 2023; AWQ, Lin et al. 2024). No model walk here.

A linear y = W x is unchanged when its input channels are divided by s and its weight's columns multiplied by s:
W x = (W diag(s)) (diag(1/s) x). The division is folded into whatever produces x (an RMSNorm's gain, or the
output rows of the linear before), so the model keeps its shape. Rounding W diag(s) instead of W gives the input
channels that carry large activations a finer share of each group's grid: their weights' rounding error is
divided by s on the way back, where it meets those large activations.

Per fold, s_j = rms(x_j)^alpha (normalised by sqrt(max * min), as AWQ), with alpha chosen from a grid by the
rounding's output error on calibration data: tr(D H Dᵀ), D = round(W diag(s)) diag(1/s) - W, H the inputs'
Hessian (mean x xᵀ), which is also what GPTQ minimises. alpha = 0 (no smoothing) is on the grid, so the chosen s
never has a larger proxy error than none. The Hessian of the smoothed input is diag(1/s) H diag(1/s).

For W8A8 (per-token int8 activations as well, `choose_smoothquant_scale`), SmoothQuant's own migration instead:
s_j = max|x_j|^alpha / max|w_j|^(1 - alpha) (Xiao et al. 2023), alpha chosen by the output error of quantizing
both, ||Q(X diag(1/s)) R(diag(s) W^T) - X W^T||^2 on calibration rows: the activation error depends on each
token's largest entry, which a Hessian does not hold. No smoothing (s = 1) is a candidate too.

Where a linear's input channels are copies of fewer source channels (grouped-query attention: o_proj reads each
KV head's values once per query head that uses it), one scale per source channel is shared by its copies.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from ..errors import LowbitError
from ..ir.groupwise_weights import GroupWiseWeights

ALPHA_GRID = tuple(round(0.1 * i, 1) for i in range(11))
SMOOTHQUANT_GRID = tuple(round(0.1 * i, 1) for i in range(1, 10))  # 0.5 is SmoothQuant's default
_TINY = 1e-12


@dataclass(frozen=True)
class SmoothFold:
    """Linears whose input channels can be scaled, and the module whose output channels undo it.

    `source` holds a `weight` whose first dimension is its output channels: an RMSNorm/LayerNorm gain [C] or a
    linear's [C, in] (with its bias, if any). `channels[j]` is the source channel that the linears' input
    channel j copies (None: the identity, the same number of channels)."""

    name: str
    linears: tuple[nn.Linear, ...]
    source: nn.Module
    channels: torch.Tensor | None = None

    def __post_init__(self) -> None:
        n_in = {lin.in_features for lin in self.linears}
        width = self.source.weight.shape[0]
        expected = width if self.channels is None else len(self.channels)
        if len(n_in) != 1 or n_in != {expected}:
            raise LowbitError(f"smoothing fold {self.name}: the linears read {sorted(n_in)} input channels but the "
                              f"source {type(self.source).__name__} gives {expected}")
        if self.channels is not None and int(self.channels.max()) >= width:
            raise LowbitError(f"smoothing fold {self.name}: a channel map points past the source's {width} channels")


@dataclass(frozen=True)
class SmoothChoice:
    """The scale chosen for one fold: per source channel, its alpha, and the proxy errors with and without it."""

    scale: torch.Tensor
    alpha: float | None  # None: no smoothing won (SmoothQuant's alpha = 0 is still a scaling)
    loss: float
    loss_unsmoothed: float


def proxy_loss(w: torch.Tensor, dq: torch.Tensor, h: torch.Tensor) -> float:
    """tr((DQ - W) H (DQ - W)ᵀ): the summed squared output error per input row, given its Hessian `h`."""
    d = dq - w
    return float(((d @ h) * d).sum())


def choose_scale(w: torch.Tensor, h: torch.Tensor, fold: SmoothFold,
                 rounding: Callable[[torch.Tensor, torch.Tensor], GroupWiseWeights],
                 grid: Sequence[float] = ALPHA_GRID) -> SmoothChoice:
    """The alpha of `grid` whose scale gives `rounding(w diag(s), smoothed Hessian)` (w: the fold's linears
    stacked [out, in]) the least proxy error under the inputs' Hessian `h` [in, in]."""
    if 0.0 not in grid:
        raise LowbitError("the smoothing grid must hold alpha = 0 (no smoothing), so smoothing never adds error")
    w, h = w.float(), h.float()
    rms = torch.diagonal(h).clamp(min=_TINY).sqrt()
    source_rms = _per_source(rms, fold)
    best: SmoothChoice | None = None
    unsmoothed = 0.0
    for alpha in grid:
        s = source_rms.clamp(min=_TINY) ** alpha
        s = s / torch.sqrt(s.max() * s.min())
        expanded = s if fold.channels is None else s[fold.channels]
        rounded = rounding(w * expanded, h / (expanded[:, None] * expanded[None, :]))
        dq = torch.from_numpy(rounded.dequantize()).float() / expanded
        loss = proxy_loss(w, dq, h)
        if alpha == 0.0:
            unsmoothed = loss
        if best is None or loss < best.loss:
            best = SmoothChoice(s, float(alpha), loss, 0.0)
    assert best is not None
    return SmoothChoice(best.scale, best.alpha, best.loss, unsmoothed)


def choose_smoothquant_scale(w: torch.Tensor, x: torch.Tensor, fold: SmoothFold,
                             rounding: Callable[[torch.Tensor, torch.Tensor | None], GroupWiseWeights],
                             grid: Sequence[float] = SMOOTHQUANT_GRID) -> SmoothChoice:
    """W8A8: SmoothQuant's scale for the alpha of `grid`, or none, whichever gives the fold's linears (w: stacked
    [out, in]) the least output error on the calibration rows x [n, in] with their inputs per-token int8
    (`fake_quantize_tokens`) and their weights `rounding(w diag(s), None)` (round-to-nearest)."""
    from .activation_quant import fake_quantize_tokens

    w, x = w.float(), x.float()
    reference = x @ w.T
    x_max, w_max = _per_source(x.abs().amax(0), fold), _per_source(w.abs().amax(0), fold)
    best: SmoothChoice | None = None
    unsmoothed = 0.0
    for alpha in (None, *grid):
        if alpha is None:
            s = torch.ones_like(x_max)
        else:
            s = x_max.clamp(min=_TINY) ** alpha / w_max.clamp(min=_TINY) ** (1 - alpha)
            s = s / torch.sqrt(s.max() * s.min())
        e = s if fold.channels is None else s[fold.channels]
        dq = torch.from_numpy(rounding(w * e, None).dequantize()).float()
        loss = float(((fake_quantize_tokens(x / e) @ dq.T - reference) ** 2).sum())
        if alpha is None:
            unsmoothed = loss
        if best is None or loss < best.loss:
            best = SmoothChoice(s, alpha, loss, 0.0)
    assert best is not None
    return SmoothChoice(best.scale, best.alpha, best.loss, unsmoothed)


def _per_source(per_input: torch.Tensor, fold: SmoothFold) -> torch.Tensor:
    """Per-input-channel maxima [in] -> per source channel (the largest of its copies)."""
    if fold.channels is None:
        return per_input
    return torch.zeros(fold.source.weight.shape[0]).scatter_reduce(0, fold.channels, per_input, "amax",
                                                                   include_self=False)


def apply_scale(fold: SmoothFold, scale: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """Divide the source's output channels by `scale`, multiply the linears' input columns by it (in place; the
    model computes the same function); returns the smoothed inputs' Hessian."""
    expanded = scale if fold.channels is None else scale[fold.channels]
    with torch.no_grad():
        weight = fold.source.weight
        weight.div_(scale.to(weight.dtype).view(-1, *[1] * (weight.dim() - 1)))
        bias = getattr(fold.source, "bias", None)
        if bias is not None:
            bias.div_(scale.to(bias.dtype))
        for linear in fold.linears:
            linear.weight.mul_(expanded.to(linear.weight.dtype)[None, :])
    e = expanded.to(h.dtype)
    return h / (e[:, None] * e[None, :])


def gqa_channels(num_heads: int, num_kv_heads: int, head_dim: int) -> torch.Tensor:
    """For grouped-query attention: the value channel (of num_kv_heads * head_dim) that each of the attention
    output's num_heads * head_dim channels copies (query head h reads KV head h // (num_heads / num_kv_heads))."""
    group = num_heads // num_kv_heads
    heads = torch.arange(num_heads).repeat_interleave(head_dim) // group
    return heads * head_dim + torch.arange(head_dim).repeat(num_heads)


def smoothing_summary(choices: dict[str, SmoothChoice]) -> dict[str, object]:
    """For the report: per fold its alpha and proxy-error ratio (smoothed / unsmoothed)."""
    ratios = [c.loss / c.loss_unsmoothed for c in choices.values() if c.loss_unsmoothed > 0]
    return {"folds": {name: {"alpha": c.alpha, "error_ratio": c.loss / c.loss_unsmoothed if c.loss_unsmoothed
                             else 1.0} for name, c in choices.items()},
            "median_error_ratio": float(np.median(ratios)) if ratios else 1.0}
