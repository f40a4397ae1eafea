"""The block linears of the TVM decoder, per linear format: which kernel runs each weight, how a layer's linears
become kernel calls, the calls' packed operands and their compiled functions.

Kernel formats (`KERNELS`):
- "int4" (`x86.gemv_int4`) runs int2, int3 and int4 group-wise weights: their values and integer zero points lie
  in [0, 15], so packed as nibbles they keep the same q, z and scales, hence the same dequantized weights (exact);
- "int8" (`x86.gemv_int8`) runs int8 group-wise weights.
A third kernel format (vector-quantized weights, `VQWeights`) is one more entry in `KERNELS`: its weights' test,
its packer and its PrimFunc; `supports` then stops refusing those linears.

A fused group (q|k|v, gate|up) is one call when its members share a kernel format and a group size: their rows
stacked into one weight, writing the whole buffer. Otherwise each member is its own call writing its columns of
the same buffer (the kernels' `out_width` and `col`), so the runtime's buffers and the kernels after the linears
do not change. o and down add into the residual (`accumulate`).

One function is compiled per distinct `LinearFunc` and row count M, named `<LinearFunc.name>_<M>`; the artifact's
META lists them and, per layer and slot, its calls (`layer_calls`), so the runtime finds functions by name.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from tvm import tirx

from ...errors import LowbitError
from ...ir.groupwise_weights import GroupWiseWeights
from ...runtime.decoder_tvm import LINEAR_SLOTS
from .x86.gemv_int4 import Int4GemvPlan, gemv_int4_func
from .x86.gemv_int8 import Int8GemvPlan, gemv_int8_func, pack_int8_gemv
from .x86.int4_groups import pack_int4_gemv

# slot -> its members (the parameters under layers.<i>.), in the order their columns are stacked
SLOT_MEMBERS = {"qkv": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "o": ("self_attn.o_proj",),
                "gate_up": ("mlp.gate_proj", "mlp.up_proj"), "down": ("mlp.down_proj",)}
ACCUMULATE = frozenset({"o", "down"})  # add into the residual stream x
PROJECTIONS = tuple(p for slot in LINEAR_SLOTS for p in SLOT_MEMBERS[slot])


def _pack_int4(weights: list[GroupWiseWeights]) -> list[np.ndarray]:
    values, scale = np.concatenate([w.values for w in weights]), np.concatenate([w.scale for w in weights])
    if any(w.float_minimum for w in weights):
        packed = pack_int4_gemv(values, scale, None, weights[0].group,
                                offset=np.concatenate([w.offset for w in weights]))
    else:
        packed = pack_int4_gemv(values, scale, np.concatenate([w.zero for w in weights]), weights[0].group)
    return packed.arrays()


def _pack_int8(weights: list[GroupWiseWeights]) -> list[np.ndarray]:
    values, scale = np.concatenate([w.values for w in weights]), np.concatenate([w.scale for w in weights])
    if any(w.float_minimum for w in weights):
        packed = pack_int8_gemv(values, scale, None, weights[0].group,
                                offset=np.concatenate([w.offset for w in weights]))
    else:
        packed = pack_int8_gemv(values, scale, np.concatenate([w.zero for w in weights]), weights[0].group)
    return packed.arrays()


@dataclass(frozen=True)
class KernelFormat:
    """A GEMV kernel for one family of weight formats: which weights it runs, their packing into its operands (w,
    scale, neg_zs: the runtime passes them in that order after x) and its PrimFunc for a `LinearFunc` at M rows.
    `bits`: the group-wise integer bit-widths it runs (none for a kernel of another family)."""

    bits: tuple[int, ...]
    runs: Callable[[object], bool]
    pack: Callable[[list[Any]], list[np.ndarray]]
    func: Callable[[LinearFunc, int, int], tirx.PrimFunc]


OPERANDS = ("w", "scale", "neg_zs")


def _int4_func(f: LinearFunc, m: int, threads: int) -> tirx.PrimFunc:
    return gemv_int4_func(Int4GemvPlan.of(m, f.K, f.N, f.group, threads, accumulate=f.accumulate,
                                          out_width=f.out_width))


def _int8_func(f: LinearFunc, m: int, threads: int) -> tirx.PrimFunc:
    return gemv_int8_func(Int8GemvPlan.of(m, f.K, f.N, f.group, threads, accumulate=f.accumulate,
                                          out_width=f.out_width))


def _groupwise(bits: tuple[int, ...]) -> Callable[[object], bool]:
    return lambda w: isinstance(w, GroupWiseWeights) and w.bits in bits


KERNELS: dict[str, KernelFormat] = {
    "int4": KernelFormat((2, 3, 4), _groupwise((2, 3, 4)), _pack_int4, _int4_func),
    "int8": KernelFormat((8,), _groupwise((8,)), _pack_int8, _int8_func),
}


def kernel_of(weights: object) -> str | None:
    """The kernel format that runs these weights (`KERNELS`), None if none does."""
    return next((name for name, k in KERNELS.items() if k.runs(weights)), None)


def kernel_for_bits(bits: int) -> str:
    """The kernel format of group-wise weights of `bits` bits."""
    name = next((name for name, k in KERNELS.items() if bits in k.bits), None)
    if name is None:
        raise LowbitError(f"no TVM decoder kernel for int{bits} group-wise weights; "
                          f"kernels: {'; '.join(f'{n} for bits {list(k.bits)}' for n, k in KERNELS.items())}")
    return name


@dataclass(frozen=True)
class LinearFunc:
    """One compiled linear function (at each row count M): Y[:, col:col + N] (+)= X [M, K] W^T, W [N, K] of
    `kernel`'s format in groups of `group`; Y's rows hold `out_width` columns (N, and no col argument, if None)."""

    kernel: str
    K: int
    N: int
    group: int
    accumulate: bool
    out_width: int | None

    @property
    def name(self) -> str:
        return (f"{self.kernel}_k{self.K}_n{self.N}_g{self.group}" + ("_acc" if self.accumulate else "")
                + (f"_of{self.out_width}" if self.out_width is not None else ""))

    def func(self, m: int, threads: int) -> tirx.PrimFunc:
        return KERNELS[self.kernel].func(self, m, threads)


@dataclass(frozen=True)
class LinearCall:
    """One kernel call of a slot: its function, its operands' prefix in PACKED, its first output column (None when
    it writes the whole buffer), and the weights it packs."""

    function: LinearFunc
    operands: str
    col: int | None
    members: tuple[str, ...]

    def meta(self) -> dict[str, Any]:
        return {"function": self.function.name, "operands": self.operands, "col": self.col,
                "members": list(self.members)}


def layer_calls(layer: int, weights: Mapping[str, Any]) -> dict[str, list[LinearCall]]:
    """The calls of block `layer`, per slot (`LINEAR_SLOTS`); `weights` must be ones `supports` accepts."""
    calls: dict[str, list[LinearCall]] = {}
    for slot in LINEAR_SLOTS:
        members = SLOT_MEMBERS[slot]
        ws = [weights[f"layers.{layer}.{p}.weight"] for p in members]
        k, accumulate = ws[0].shape[1], slot in ACCUMULATE
        if len({(kernel_of(w), w.group) for w in ws}) == 1:
            f = LinearFunc(kernel_of(ws[0]), k, sum(w.shape[0] for w in ws), ws[0].group, accumulate, None)
            calls[slot] = [LinearCall(f, f"layers.{layer}.{slot}", None, members)]
            continue
        width, col, calls[slot] = sum(w.shape[0] for w in ws), 0, []
        for p, w in zip(members, ws, strict=True):
            f = LinearFunc(kernel_of(w), k, w.shape[0], w.group, accumulate, width)
            calls[slot].append(LinearCall(f, f"layers.{layer}.{p.rsplit('.', 1)[1]}", col, (p,)))
            col += w.shape[0]
    return calls


def pack_calls(layer: int, calls: dict[str, list[LinearCall]], weights: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """The packed operands of a layer's calls, named `<operands>.<w|scale|neg_zs>`."""
    out = {}
    for slot_calls in calls.values():
        for c in slot_calls:
            arrays = KERNELS[c.function.kernel].pack([weights[f"layers.{layer}.{p}.weight"] for p in c.members])
            out.update({f"{c.operands}.{name}": a for name, a in zip(OPERANDS, arrays, strict=True)})
    return out


def linear_functions(calls: list[dict[str, list[LinearCall]]]) -> dict[str, dict[str, Any]]:
    """The distinct functions of all layers' calls, by name, with their parameters (META's "functions")."""
    return {c.function.name: asdict(c.function) for layer in calls for slot in layer.values() for c in slot}
