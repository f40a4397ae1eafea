"""Mixed precision for a weight-only decoder: a bit-width per block linear under size and latency budgets (#14).

The predicted loss increase of rounding one linear y = W x to b bits (a second-order model, as HAWQ/GPTQ):
    ΔL_l(b) ≈ ½ Σ_o f_o · d_o H d_oᵀ,    d = round_b(W) - W,
with H = mean x xᵀ its inputs' Hessian and f_o = mean (∂L/∂y_o)² the language-model loss's gradient energy at
output o (a diagonal Fisher of the output), both on calibration text. f is what makes linears comparable: the
same output error costs more loss in a layer whose outputs the loss is sensitive to. Terms between linears are
left out (a separable objective); the measured perplexity of the plan is the check.

`round_b` here is round-to-nearest (fast, and what the predictions rank); the chosen plan is then quantized with
the configured rounding (GPTQ by default), which lowers every option's error by a similar factor.

The ILP (`ilp.solve`, HiGHS): one option per linear, minimise Σ ΔL under Σ bytes <= budget, bytes counted by the
weight format (values, zero points and scales), and/or Σ latency <= budget, each linear's latency its decode
GEMV's (M = 1) as measured on the target (`DecoderOptions.latency`; a decode step runs its linears one after
another, so their times add).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from ..errors import LowbitError
from ..quantizer.groupwise import rtn_groupwise
from ..quantizer.rounding import HessianAccumulator
from .ilp import Plan, Problem, solve

DECODER_BITS = (3, 4, 8)


@dataclass(frozen=True)
class LinearSensitivity:
    """Per block linear: its output Fisher diagonal [out] and input Hessian [in, in] on calibration text."""

    fisher: dict[str, torch.Tensor]
    hessian: dict[str, torch.Tensor]
    tokens: int


def measure_sensitivity(model: nn.Module, linears: dict[str, nn.Linear], samples: Sequence[torch.Tensor],
                        log: Callable[[str], object] = lambda _: None) -> LinearSensitivity:
    """One forward and backward pass per sample (int64 [1, t] token ids) of the next-token loss, recording each
    linear's input Hessian and output gradient energy."""
    hessians = {name: HessianAccumulator(torch.float32) for name in linears}
    fisher = {name: torch.zeros(lin.out_features, dtype=torch.float64) for name, lin in linears.items()}

    def hook(name: str) -> Callable[[nn.Module, tuple, torch.Tensor], None]:
        def gradient(g: torch.Tensor) -> None:
            fisher[name].add_((g.detach().double() ** 2).reshape(-1, g.shape[-1]).sum(0))

        def forward(_m: nn.Module, args: tuple, out: torch.Tensor) -> None:
            x = args[0].detach()
            hessians[name].add(x.reshape(-1, x.shape[-1]).T.unsqueeze(0))
            out.register_hook(gradient)
        return forward

    handles = [lin.register_forward_hook(hook(name)) for name, lin in linears.items()]
    tokens = 0
    try:
        for n, ids in enumerate(samples):
            logits = model(ids)
            loss = nn.functional.cross_entropy(logits[0, :-1].float(), ids[0, 1:], reduction="sum")
            model.zero_grad(set_to_none=True)
            loss.backward()
            tokens += ids.shape[1] - 1
            log(f"sensitivity: sample {n + 1}/{len(samples)}")
    finally:
        for h in handles:
            h.remove()
        model.zero_grad(set_to_none=True)
    if tokens == 0:
        raise LowbitError("the decoder search needs calibration text of at least two tokens")
    return LinearSensitivity({k: (v / tokens).float() for k, v in fisher.items()},
                             {k: acc.result()[0] for k, acc in hessians.items()}, tokens)


def predicted_loss(w: torch.Tensor, dq: torch.Tensor, hessian: torch.Tensor, fisher: torch.Tensor) -> float:
    """½ Σ_o f_o d_o H d_oᵀ with d = dq - w."""
    d = (dq - w).double()
    return 0.5 * float((fisher.double() * ((d @ hessian.double()) * d).sum(1)).sum())


@dataclass(frozen=True)
class DecoderOptions:
    """Per linear and bit-width: the predicted loss increase and the stored bytes."""

    names: list[str]
    bits: tuple[int, ...]
    loss: np.ndarray  # [linears, options]
    nbytes: np.ndarray  # [linears, options]
    latency: np.ndarray | None = None  # [linears, options]: seconds per decode step, where measured

    def metric(self, name: str) -> np.ndarray:
        if name == "size":
            return self.nbytes
        if name == "latency" and self.latency is not None:
            return self.latency
        raise LowbitError(f"the decoder search has no {name} per option (size, and latency once measured)")

    def problem(self, budgets: Mapping[str, float]) -> Problem:
        return Problem(groups=[[n] for n in self.names], bits=list(self.bits), cost=self.loss,
                       metrics={m: self.metric(m) for m in budgets}, budgets={m: float(b) for m, b in budgets.items()})

    def with_latency(self, latency: np.ndarray) -> DecoderOptions:
        if latency.shape != self.loss.shape or not (latency > 0).all():
            raise LowbitError(f"a latency table of shape {latency.shape} for {self.loss.shape} options, or with a "
                              "non-positive entry")
        return dataclasses.replace(self, latency=latency)


def decoder_options(linears: dict[str, nn.Linear], sensitivity: LinearSensitivity, group: int,
                    bits: Sequence[int] = DECODER_BITS) -> DecoderOptions:
    """Every linear's predicted loss and bytes at each of `bits`, rounded to nearest in groups of `group`."""
    names = list(linears)
    loss = np.zeros((len(names), len(bits)))
    nbytes = np.zeros_like(loss)
    for i, name in enumerate(names):
        w = linears[name].weight.detach().float()
        for j, b in enumerate(bits):
            rounded = rtn_groupwise(w, b, min(group, w.shape[1]) if group else w.shape[1])
            loss[i, j] = predicted_loss(w, torch.from_numpy(rounded.dequantize()), sensitivity.hessian[name],
                                        sensitivity.fisher[name])
            nbytes[i, j] = rounded.nbytes
    return DecoderOptions(names, tuple(bits), loss, nbytes)


UNITS: dict[str, Callable[[float], str]] = {"size": lambda v: f"{v / 1e6:.2f} MB",
                                            "latency": lambda v: f"{v * 1e3:.3f} ms"}


def solve_plan(options: DecoderOptions, budgets: float | Mapping[str, float],
               log: Callable[[str], None] = lambda _: None) -> Plan:
    """The bits per linear that minimise the predicted loss with the linears' summed bytes (a number: bytes) and/or
    latency within `budgets` (metric -> bound)."""
    budgets = {"size": budgets} if isinstance(budgets, (int, float)) else dict(budgets)
    for m, budget in budgets.items():
        low = options.metric(m).min(1).sum()
        if budget < low:
            cheapest = options.bits[int(np.argmin(options.metric(m).sum(0)))]
            raise LowbitError(f"a {m} budget of {UNITS[m](budget)} for the block linears is below the smallest plan "
                              f"({UNITS[m](low)}, about every linear at {cheapest} bits)")
        budgets[m] = min(budget, options.metric(m).max(1).sum())
    problem = options.problem(budgets)
    return problem.plan(solve(problem, UNITS, log=log))


def plan_totals(options: DecoderOptions, plan: Mapping[str, int]) -> dict[str, float]:
    """A plan's predicted loss and its linears' summed bytes (and latency, where measured)."""
    index = {n: i for i, n in enumerate(options.names)}
    chosen = [(index[n], options.bits.index(b)) for n, b in plan.items()]
    totals = {"predicted_loss": float(sum(options.loss[i, j] for i, j in chosen)),
              "bytes": float(sum(options.nbytes[i, j] for i, j in chosen))}
    if options.latency is not None:
        totals["latency_s"] = float(sum(options.latency[i, j] for i, j in chosen))
    return totals
