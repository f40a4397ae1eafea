"""Weight-only quantization of a torch model's linears (group-wise or VQ): GPTQ's sequential walk over its blocks.

Generic over models: the caller names the blocks (nn.Modules the model runs in sequence, e.g. decoder layers,
each taking the hidden states as its first argument or as `hidden_states=`) and gives calibration samples with a
`forward(model, sample)` that runs the model on one. The walk (Frantar et al. 2022, as their opt.py/llama.py):
1. a forward pre-hook on block 0 catches each sample's block inputs (args and kwargs) and stops the model there;
2. per block: hooks on its nn.Linear modules accumulate each one's input Hessian over all samples (one product
   per distinct input tensor: q/k/v read the same one), every linear is rounded (`groupwise.py`, or `vq.py`
   with `config.vq`; linears that read the same input are rounded together, as one stack of rows, so they share
   one VQ codebook), its dequantized weights are written in
   place, and the block reruns on its inputs with the quantized weights to give the next block's inputs, so
   each block is calibrated on what the quantized blocks before it really produce.
Only the blocks' linears are quantized: an embedding or lm_head outside them stays as it is (`skip` leaves
more in float). Memory: one hidden state per sample (32 x 512 tokens at hidden 576: 38 MB) and one block's
Hessians at a time. Round-to-nearest needs no calibration and runs no forward.

The calibration forward must not fill a KV cache: each block reruns on its stored inputs.
"""

from __future__ import annotations

import dataclasses
import fnmatch
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from ..errors import LowbitError
from ..ir.groupwise_weights import GroupWiseWeights
from ..ir.token_int8 import ACTIVATION_BITS
from ..ir.weight_formats import QuantizedWeights
from .activation_quant import quantize_linear_inputs
from .groupwise import CLIP_RATIOS, gptq_groupwise, rtn_groupwise
from .rounding import DAMPING, HessianAccumulator
from .vq import VQSpec, vq_quantize
from .weight_smoothing import SmoothChoice, SmoothFold, apply_scale, choose_scale, choose_smoothquant_scale

ROUNDINGS = ("rtn", "gptq")
SMOOTHQUANT_ROWS = 2048  # calibration rows (tokens) per linear input on which W8A8 smoothing picks alpha
_CACHE_KWARGS = ("past_key_value", "past_key_values", "cache", "kv_cache")


@dataclass(frozen=True)
class WeightOnlyConfig:
    bits: int = 4  # 2, 3, 4 or 8
    group: int = 128  # input columns per scale and zero point; 0: one group per output channel
    # rtn | gptq. On SmolLM2-135M int4 g128 (BENCHMARKS.md smollm2_weights, 16 windows per text), GPTQ with
    # act_order is the best measured: Lee/enwiki perplexity x1.233/x1.296 of FP32 against RTN's x1.306/x1.323.
    # Plain GPTQ measured worse than RTN (first 6 blocks, mean NLL on 3 Lee windows, FP32 3.3844: RTN 3.4442,
    # GPTQ 3.4501, GPTQ + act_order 3.4203, GPTQ damp 0.1 3.4205, true_sequential 3.4372), although it lowers each
    # checked linear's held-out output error 2-3x below RTN's: it seems ill-conditioned on the outlier input channels.
    rounding: str = "gptq"
    damp: float = DAMPING  # GPTQ: fraction of the mean Hessian diagonal added to it
    act_order: bool = True  # GPTQ: columns by decreasing Hessian diagonal (static groups)
    # Per group, the clipping ratio (`CLIP_RATIOS`) of least squared weight error. Off: on SmolLM2 int4 g128 RTN
    # it raised perplexity (Lee 42.87 -> 47.80, enwiki 29.67 -> 32.23; it does lower Gaussian weights' error).
    clip_search: bool = False
    # Per group a float minimum and scale (float16, as GGUF's Q4_1) instead of an integer zero point and float32
    # scale (`GroupWiseWeights`).
    float_minimum: bool = False
    # GPTQ: within a block, each set of linears reading one input gets its Hessian after the sets before it are
    # quantized (q/k/v, then o on their quantized attention, ...), as GPTQ's LLaMA script; one forward per set.
    true_sequential: bool = False
    # SmoothQuant+/AWQ scaling of each linear's input channels before rounding (`weight_smoothing.py`), alpha
    # searched per fold; needs calibration data and the model's folds (e.g. `llama.smoothing_folds`).
    smooth: bool = False
    skip: tuple[str, ...] = ()  # fnmatch patterns of linear names (as in model.named_modules) kept in float
    # A mixed plan: (linear name, bits) pairs overriding `bits` for those linears (`search.decoder_search`).
    plan: tuple[tuple[str, int], ...] = ()
    # Vector quantization (`VQWeights`, e.g. `vq.VQ_PRESETS["vq2"]`) instead of group-wise integers: `bits`,
    # `group` and `clip_search` are then unused. rtn: unweighted k-means codebooks and nearest codewords; gptq:
    # codebooks weighted by the Hessian diagonal and GPTQ's error feedback (with act_order: whole vectors by
    # decreasing Hessian diagonal).
    vq: VQSpec | None = None
    # 0: activations stay float (weight-only). 8: W8A8, every quantized linear's input quantized per token to int8
    # at run time (`lowbit.ir.token_int8`); needs 8-bit weights with integer zero points, and `smooth` then uses
    # SmoothQuant's migration (`weight_smoothing.choose_smoothquant_scale`).
    activation_bits: int = 0

    def __post_init__(self) -> None:
        if self.vq is not None and not isinstance(self.vq, VQSpec):
            raise LowbitError(f"vq={self.vq!r}: give a VQSpec (lowbit.quantizer.vq.VQ_PRESETS has vq2 and vq3)")
        if self.vq is not None and (self.smooth or self.plan or self.float_minimum):
            raise LowbitError("VQ weights with smoothing, a mixed plan or float minimums: not supported (those are "
                              "options of group-wise integer weights); turn them off for vq2/vq3")
        if self.activation_bits not in (0, ACTIVATION_BITS):
            raise LowbitError(f"activation_bits={self.activation_bits}: 0 (float activations) or {ACTIVATION_BITS} "
                              "(per-token int8, W8A8)")
        if self.activation_bits and (self.bits != 8 or self.vq is not None or self.float_minimum or self.plan):
            raise LowbitError("W8A8 (int8 activations) needs uniform 8-bit group-wise weights with integer zero "
                              "points: no VQ, mixed plan or float minimums")
        if self.bits not in GroupWiseWeights.SUPPORTED_BITS:
            raise LowbitError(f"--weights int{self.bits}: group-wise weights have "
                              f"{', '.join(map(str, GroupWiseWeights.SUPPORTED_BITS))} bits")
        if self.group < 0:
            raise LowbitError(f"--group {self.group}: give input columns per group (32, 64, 128), "
                              "or 0 for one group per output channel")
        if self.rounding not in ROUNDINGS:
            raise LowbitError(f"--rounding {self.rounding!r}: expected one of {', '.join(ROUNDINGS)}")
        if not 0.0 < self.damp < 1.0:
            raise LowbitError(f"GPTQ damping {self.damp}: expected a fraction of the mean Hessian diagonal in (0, 1)")
        bad = [f"{name}: {bits}" for name, bits in self.plan if bits not in GroupWiseWeights.SUPPORTED_BITS]
        if bad:
            raise LowbitError(f"the plan gives unsupported bit-widths ({', '.join(bad[:3])}); group-wise weights "
                              f"have {', '.join(map(str, GroupWiseWeights.SUPPORTED_BITS))} bits")
        if isinstance(self.skip, str):
            raise LowbitError(f"skip={self.skip!r}: give a tuple of name patterns, not one string")

    def bits_for(self, name: str) -> int:
        return dict(self.plan).get(name, self.bits)

    def group_for(self, in_features: int) -> int:
        return in_features if self.group == 0 else self.group

    def describe(self) -> str:
        group = "per channel" if self.group == 0 else f"g{self.group}"
        gptq = self.rounding == "gptq"  # act-order and true-sequential are GPTQ's; RTN ignores them
        extras = [e for e, on in (("float min", self.float_minimum), ("smoothed", self.smooth),
                                  ("act-order", gptq and self.act_order),
                                  ("clip search", self.clip_search and self.vq is None),
                                  ("true-sequential", gptq and self.true_sequential)) if on]
        if self.vq is not None:
            width, group = "vq", self.vq.describe()
        elif self.plan:
            counts = {b: sum(1 for _, pb in self.plan if pb == b) for b in sorted({b for _, b in self.plan})}
            width = "mixed (" + ", ".join(f"{n} linears int{b}" for b, n in counts.items()) + ")"
        else:
            width = "W8A8 (int8 per-token activations)" if self.activation_bits else f"int{self.bits}"
        return f"{width} {group} {self.rounding}" + "".join(f", {e}" for e in extras)

    def with_rounding(self, rounding: str) -> WeightOnlyConfig:
        return dataclasses.replace(self, rounding=rounding)

    def for_linear(self, name: str) -> WeightOnlyConfig:
        """The uniform config that rounds linear `name` (its bits from the plan)."""
        return dataclasses.replace(self, bits=self.bits_for(name), plan=()) if self.plan else self

    def round(self, w: torch.Tensor, h: torch.Tensor | None) -> QuantizedWeights:
        """One weight [out, in] (stacked rows of linears that share `h`), by this config's rounding."""
        if self.vq is not None:
            if self.rounding == "rtn":
                return vq_quantize(w, self.vq)
            assert h is not None, "GPTQ needs the linear's input Hessian"
            return vq_quantize(w, self.vq, h, damp=self.damp, act_order=self.act_order)
        group = self.group_for(w.shape[1])
        ratios = CLIP_RATIOS if self.clip_search else (1.0,)
        if self.rounding == "rtn":
            return rtn_groupwise(w, self.bits, group, ratios, h if self.clip_search else None, self.float_minimum)
        assert h is not None, "GPTQ needs the linear's input Hessian"
        return gptq_groupwise(w, h, self.bits, group, self.damp, act_order=self.act_order, clip_ratios=ratios,
                              float_minimum=self.float_minimum)


def quantize_weights(model: nn.Module, blocks: Sequence[nn.Module], config: WeightOnlyConfig,
                     calibration: Iterable[Any] = (), forward: Callable[[nn.Module, Any], object] | None = None,
                     log: Callable[[str], object] = lambda _: None,
                     folds: Callable[[nn.Module], Sequence[SmoothFold]] | None = None,
                     smoothing: dict[str, SmoothChoice] | None = None) -> dict[str, QuantizedWeights]:
    """Quantize the linears of `blocks` (in `model`) in place; returns linear name -> its weights
    (GroupWiseWeights, or VQWeights with `config.vq`).

    `forward(model, sample)` runs the model on one calibration sample (default: `model(**sample)` for a
    mapping, else `model(sample)`); GPTQ and smoothing need at least one sample, round-to-nearest alone none.
    `log` gets a line per block and step (a `Progress.steps_of` log, as the pipeline's other stages).
    `folds(block)` says where a block's linears can be smoothed (needed with `config.smooth`); `smoothing`, if
    given, receives each fold's chosen scale.
    """
    if config.smooth and folds is None:
        raise LowbitError("smoothing needs the model's folds (where each linear's input scale is undone); pass "
                          "folds=, e.g. lowbit.models.llama.smoothing_folds, or turn smoothing off")
    linears = _block_linears(model, blocks, config.skip)
    unknown = sorted(set(dict(config.plan)) - {name for named in linears for name, _ in named})
    if unknown:
        raise LowbitError(f"the plan names {len(unknown)} linear(s) that are not block linears of this model "
                          f"({', '.join(unknown[:3])}{', ...' if len(unknown) > 3 else ''}); was it searched for "
                          "another model?")
    result: dict[str, QuantizedWeights] = {}
    if config.rounding == "rtn" and not config.smooth:
        for b, named in enumerate(linears):
            log(f"block {b + 1}/{len(blocks)}: {config.describe()} of {len(named)} linears")
            for name, linear in named:
                result[name] = _write(linear, config.for_linear(name).round(linear.weight.detach(), None))
            if config.activation_bits:
                quantize_linear_inputs(model, [name for name, _ in named])
        return result
    with torch.no_grad():
        inputs = _capture_block_inputs(model, blocks[0], calibration, forward or _default_forward)
        for b, (block, named) in enumerate(zip(blocks, linears, strict=True)):
            step = f"block {b + 1}/{len(blocks)}"
            modules = dict(named)
            shared = None
            if config.smooth:
                assert folds is not None
                log(f"{step}: Hessians of {len(named)} linears on {len(inputs)} samples (smoothing)")
                shared = _block_hessians(block, named, inputs, f"block {b}")
                rows = _block_input_rows(block, modules, [names for names, _ in shared], inputs) \
                    if config.activation_bits else None
                shared = _smooth_block(config, modules, shared, folds(block), smoothing, log, step, rows)
            if config.true_sequential:
                pending = named
                while pending:
                    log(f"{step}: Hessians of the next linears of {len(pending)} on {len(inputs)} samples")
                    (names, hessian), = _block_hessians(block, pending, inputs, f"block {b}", first_stage=True)
                    log(f"{step}: {config.describe()} of {', '.join(names)}")
                    result.update(_round_stack(config, modules, names, hessian))
                    pending = [(n, m) for n, m in pending if n not in names]
            else:
                if shared is None:
                    log(f"{step}: Hessians of {len(named)} linears on {len(inputs)} samples")
                    shared = _block_hessians(block, named, inputs, f"block {b}")
                log(f"{step}: {config.describe()} of {len(named)} linears")
                for names, hessian in shared:
                    result.update(_round_stack(config, modules, names, hessian))
                del shared
            if config.activation_bits:  # the next block's inputs as the W8A8 model computes them
                quantize_linear_inputs(model, [name for name, _ in named])
            log(f"{step}: rerun with quantized weights")
            for n, (args, kwargs) in enumerate(inputs):
                inputs[n] = _with_hidden(args, kwargs, _hidden_of(block(*args, **kwargs)))
    return {name: result[name] for named in linears for name, _ in named}  # in definition order


def _smooth_block(config: WeightOnlyConfig, modules: dict[str, nn.Linear],
                  shared: list[tuple[tuple[str, ...], torch.Tensor]], folds: Sequence[SmoothFold],
                  record: dict[str, SmoothChoice] | None, log: Callable[[str], object], step: str,
                  rows: dict[tuple[str, ...], torch.Tensor] | None = None,
                  ) -> list[tuple[tuple[str, ...], torch.Tensor]]:
    """Smooth each set of linears that share an input and have a fold (in execution order, so a fold into an
    earlier set's rows lands before that set is rounded); returns the sets with their smoothed Hessians. With
    `rows` (W8A8: each set's calibration input rows), SmoothQuant's migration chosen on them."""
    by_linears = {frozenset(id(lin) for lin in fold.linears): fold for fold in folds}
    out = []
    for names, hessian in shared:
        fold = by_linears.get(frozenset(id(modules[n]) for n in names))
        if fold is not None:
            stacked = torch.cat([modules[n].weight.detach() for n in names])
            rtn = config.with_rounding("rtn").round
            choice = choose_scale(stacked, hessian, fold, rtn) if rows is None else \
                choose_smoothquant_scale(stacked, rows[names], fold, rtn)
            hessian = apply_scale(fold, choice.scale, hessian)
            ratio = choice.loss / max(choice.loss_unsmoothed, 1e-30)
            log(f"{step}: smoothed {fold.name} (alpha {choice.alpha}, proxy output error x{ratio:.3f})")
            if record is not None:
                record[fold.name] = choice
        out.append((names, hessian))
    return out


def _round_stack(config: WeightOnlyConfig, modules: dict[str, nn.Linear], names: tuple[str, ...],
                 hessian: torch.Tensor) -> dict[str, QuantizedWeights]:
    """Round the linears `names` (that share `hessian`) as one stack of rows per bit-width; write each one's weights
    in place."""
    result = {}
    for bits in dict.fromkeys(config.bits_for(n) for n in names):
        same = [n for n in names if config.bits_for(n) == bits]
        stacked = torch.cat([modules[n].weight.detach() for n in same])
        rounded = config.for_linear(same[0]).round(stacked, hessian)
        parts = _split_rows(rounded, [modules[n].out_features for n in same])
        result.update({name: _write(modules[name], part) for name, part in zip(same, parts, strict=True)})
    return {name: result[name] for name in names}


def _default_forward(model: nn.Module, sample: Any) -> object:
    return model(**sample) if isinstance(sample, Mapping) else model(sample)


def _block_linears(model: nn.Module, blocks: Sequence[nn.Module],
                   skip: tuple[str, ...]) -> list[list[tuple[str, nn.Linear]]]:
    """Per block, its (full name, nn.Linear) pairs in definition order, without the skipped ones."""
    if not blocks:
        raise LowbitError("weight-only quantization: no blocks given; pass the model's decoder layers")
    names = {id(m): n for n, m in model.named_modules()}
    per_block = []
    for b, block in enumerate(blocks):
        if id(block) not in names:
            raise LowbitError(f"block {b} ({type(block).__name__}) is not a submodule of the model "
                              f"{type(model).__name__}; pass blocks taken from the model itself")
        per_block.append([(names[id(m)], m) for m in block.modules() if isinstance(m, nn.Linear)
                          and not any(fnmatch.fnmatchcase(names[id(m)], p) for p in skip)])
    return per_block


class _Reached(Exception):
    """Raised by block 0's pre-hook: the calibration forward has what it needs."""


def _capture_block_inputs(model: nn.Module, first: nn.Module, calibration: Iterable[Any],
                          forward: Callable[[nn.Module, Any], object]) -> list[tuple[tuple, dict]]:
    """Block 0's (args, kwargs) for every calibration sample; the model stops there (nothing after it runs)."""
    captured: list[tuple[tuple, dict]] = []

    def catch(_module: nn.Module, args: tuple, kwargs: dict) -> None:
        caching = [k for k in _CACHE_KWARGS if kwargs.get(k) is not None] + (["use_cache"] * bool(kwargs.get(
            "use_cache"))) + [type(a).__name__ for a in (*args, *kwargs.values()) if type(a).__name__.endswith("Cache")]
        if caching:
            raise LowbitError(f"the calibration forward passes block 0 a KV cache ({', '.join(caching)}): "
                              "run it without one (each block reruns on its stored inputs)")
        if not args and "hidden_states" not in kwargs:
            raise LowbitError(f"block 0 ({type(_module).__name__}) got no positional argument and no "
                              "hidden_states=: the walk needs the hidden states as one of those")
        captured.append((args, dict(kwargs)))
        raise _Reached

    handle = first.register_forward_pre_hook(catch, with_kwargs=True)
    try:
        for n, sample in enumerate(calibration):
            try:
                forward(model, sample)
            except _Reached:
                continue
            raise LowbitError(f"calibration sample {n}: the model's forward never ran block 0 "
                              f"({type(first).__name__}); pass the blocks the forward executes, in order")
    finally:
        handle.remove()
    if not captured:
        raise LowbitError("GPTQ and smoothing need calibration samples (got none); round-to-nearest alone needs none")
    return captured


def _block_hessians(block: nn.Module, named: list[tuple[str, nn.Linear]], inputs: list[tuple[tuple, dict]],
                    where: str, first_stage: bool = False) -> list[tuple[tuple[str, ...], torch.Tensor]]:
    """Run `block` on every sample; returns (names of the linears that read the same input, their Hessian [in, in])
    in execution order. Which linears share an input is read from the first sample and checked on the others.

    `first_stage`: only the first of those sets, and each forward stops as soon as a linear of `named` reads
    another input (the set is complete then; the rest of the block need not run)."""
    calls: dict[str, list[torch.Tensor]] = {}

    def record(name: str) -> Callable[[nn.Module, tuple], None]:
        def hook(_module: nn.Module, args: tuple) -> None:
            if first_stage and calls and all(args[0] is not xs[0] for xs in calls.values()):
                raise _Reached
            calls.setdefault(name, []).append(args[0])
        return hook

    handles = [linear.register_forward_pre_hook(record(name)) for name, linear in named]
    groups: list[tuple[str, ...]] = []
    accumulators: list[HessianAccumulator] = []
    try:
        for n, (args, kwargs) in enumerate(inputs):
            calls.clear()
            try:
                block(*args, **kwargs)
            except _Reached:
                pass
            signature = {name: tuple(id(x) for x in xs) for name, xs in calls.items()}
            if n == 0:
                missing = [] if first_stage and calls else [name for name, _ in named if name not in calls]
                if missing:
                    raise LowbitError(f"{where}: the linears {', '.join(missing)} did not run in the block's "
                                      "forward, so they have no calibration inputs; leave them out with skip=")
                by_input: dict[tuple[int, ...], list[str]] = {}
                for name in calls:  # execution order
                    by_input.setdefault(signature[name], []).append(name)
                groups = [tuple(names) for names in by_input.values()][:1 if first_stage else None]
                accumulators = [HessianAccumulator(torch.float32) for _ in groups]
            for names, acc in zip(groups, accumulators, strict=True):
                if len({signature.get(name) for name in names}) != 1:
                    raise LowbitError(f"{where}, calibration sample {n}: the linears {', '.join(names)} read one "
                                      "input tensor on sample 0 but not on this one; the walk needs one fixed "
                                      "block structure")
                for x in calls[names[0]]:
                    acc.add(x.reshape(-1, x.shape[-1]).T.unsqueeze(0))
    finally:
        for handle in handles:
            handle.remove()
        calls.clear()
    return [(names, acc.result()[0]) for names, acc in zip(groups, accumulators, strict=True)]


def _block_input_rows(block: nn.Module, modules: dict[str, nn.Linear], groups: list[tuple[str, ...]],
                      inputs: list[tuple[tuple, dict]], total: int = SMOOTHQUANT_ROWS) -> dict[tuple[str, ...],
                                                                                             torch.Tensor]:
    """Per set of linears sharing an input (`groups`), up to `total` rows of that input, spread evenly over the
    samples and over each sample's tokens: [rows, in]."""
    per_sample = max(1, total // len(inputs))
    got: dict[tuple[str, ...], list[torch.Tensor]] = {names: [] for names in groups}

    def record(names: tuple[str, ...]) -> Callable[[nn.Module, tuple], None]:
        def hook(_module: nn.Module, args: tuple) -> None:
            x = args[0].reshape(-1, args[0].shape[-1])
            got[names].append(x[torch.linspace(0, len(x) - 1, min(per_sample, len(x))).long()].clone())
        return hook

    handles = [modules[names[0]].register_forward_pre_hook(record(names)) for names in groups]
    try:
        for args, kwargs in inputs:
            block(*args, **kwargs)
    finally:
        for handle in handles:
            handle.remove()
    return {names: torch.cat(xs) for names, xs in got.items()}


def _split_rows(weights: QuantizedWeights, rows: list[int]) -> list[QuantizedWeights]:
    """The stacked linears' own weights (GPTQ rounds rows independently given H; VQ: each linear stores a copy of
    the stack's codebooks, counted in its size)."""
    starts = np.cumsum([0, *rows])
    return [weights.take_rows(int(a), int(b)) for a, b in zip(starts[:-1], starts[1:], strict=True)]


def _write(linear: nn.Linear, weights: QuantizedWeights) -> QuantizedWeights:
    """Put the dequantized weights into the model, so the same module evaluates the quantized layer."""
    with torch.no_grad():
        linear.weight.copy_(torch.from_numpy(weights.dequantize()))
    return weights


def _hidden_of(output: object) -> torch.Tensor:
    """A block's hidden-state output: the output itself, or the first item of a tuple (Hugging Face style)."""
    hidden = output[0] if isinstance(output, (tuple, list)) else output
    if not isinstance(hidden, torch.Tensor):
        raise LowbitError(f"a block returned {type(hidden).__name__}; the walk needs the hidden states as its "
                          "output or as the first item of a tuple")
    return hidden


def _with_hidden(args: tuple, kwargs: dict, hidden: torch.Tensor) -> tuple[tuple, dict]:
    """The block call (args, kwargs) with the hidden states replaced (the first positional or hidden_states=)."""
    if args:
        return (hidden, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": hidden}
