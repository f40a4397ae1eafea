"""The block linears of the TVM decoder, per linear format: which kernel runs each weight, how a layer's linears
become kernel calls, the calls' packed operands and their compiled functions.

Kernel formats (`KERNELS`):
- "int4" (`x86.gemv_int4`) runs int2, int3 and int4 group-wise weights: their values and integer zero points lie
  in [0, 15], so packed as nibbles they keep the same q, z and scales, hence the same dequantized weights (exact);
- "int8" (`x86.gemv_int8`) runs int8 group-wise weights;
- "vq" (`x86.gemv_vq`) runs vector-quantized weights (`VQWeights`: vq2, vq3) whose index widths and vector length
  its layout covers, a codeword gathered per vector; stacked linears keep a codebook each (`segments`).
Each entry gives its weights' test, its packer (named operands, in the kernel's order after x) and its PrimFunc.

A fused group (q|k|v, gate|up) is one call when its members share a kernel format and a grid (group size; VQ:
vector and index widths): their rows stacked into one weight, writing the whole buffer. Otherwise each member
is its own call writing its columns of the same buffer (the int kernels' `out_width` and `col`; the VQ kernel
has none, and a VQ artifact's slots are uniform), so the runtime's buffers and the kernels after the linears do
not change. o and down add into the residual (`accumulate`).

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
from ...ir.vq_weights import VQWeights
from ...runtime.decoder_tvm import LINEAR_SLOTS
from .x86.gemv_int4 import Int4GemvPlan, gemv_int4_func
from .x86.gemv_int8 import Int8GemvPlan, gemv_int8_func, pack_int8_gemv
from .x86.gemv_vq import VQGemvPlan, gemv_vq_func
from .x86.int4_groups import pack_int4_gemv
from .x86.vq_layout import check_vq_shape, pack_vq_gemv

# slot -> its members (the parameters under layers.<i>.), in the order their columns are stacked
SLOT_MEMBERS = {"qkv": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "o": ("self_attn.o_proj",),
                "gate_up": ("mlp.gate_proj", "mlp.up_proj"), "down": ("mlp.down_proj",)}
ACCUMULATE = frozenset({"o", "down"})  # add into the residual stream x
PROJECTIONS = tuple(p for slot in LINEAR_SLOTS for p in SLOT_MEMBERS[slot])


OPERANDS = ("w", "scale", "neg_zs")  # the int kernels' operands after x


def _groupwise_packer(pack: Callable[..., Any]) -> Callable[[list[GroupWiseWeights]], dict[str, np.ndarray]]:
    """The packer of a group-wise kernel (`pack_int4_gemv`, `pack_int8_gemv`): stacked rows, zero points or offsets."""
    def packed(weights: list[GroupWiseWeights]) -> dict[str, np.ndarray]:
        values, scale = np.concatenate([w.values for w in weights]), np.concatenate([w.scale for w in weights])
        if any(w.float_minimum for w in weights):
            result = pack(values, scale, None, weights[0].group, offset=np.concatenate([w.offset for w in weights]))
        else:
            result = pack(values, scale, np.concatenate([w.zero for w in weights]), weights[0].group)
        return dict(zip(OPERANDS, result.arrays(), strict=True))
    return packed


def _vq_operands(weights: VQWeights) -> tuple[str, ...]:
    stages = range(len(weights.stages))
    return ("row_scale", *(f"codebook{s}" for s in stages), *(f"indices{s}" for s in stages))


def _pack_vq(weights: list[VQWeights]) -> dict[str, np.ndarray]:
    return dict(zip(_vq_operands(weights[0]), pack_vq_gemv(weights).arrays(), strict=True))


@dataclass(frozen=True)
class KernelFormat:
    """A GEMV kernel for one family of weight formats: which weights it runs, their packing into its operands (by
    name, in the order the runtime passes them after x) and its PrimFunc for a `LinearFunc` at M rows. `bits`:
    the group-wise integer bit-widths it runs (none for a kernel of another family); `slices`: whether it can
    write a column slice of a wider output (`out_width`, `col`)."""

    bits: tuple[int, ...]
    runs: Callable[[object], bool]
    pack: Callable[[list[Any]], dict[str, np.ndarray]]
    func: Callable[[LinearFunc, int, int], tirx.PrimFunc]
    operands: Callable[[Any], tuple[str, ...]] = lambda _: OPERANDS  # `pack`'s names, from one member's weights
    slices: bool = True


def _int4_func(f: LinearFunc, m: int, threads: int) -> tirx.PrimFunc:
    return gemv_int4_func(Int4GemvPlan.of(m, f.K, f.N, f.group, threads, accumulate=f.accumulate,
                                          out_width=f.out_width))


def _int8_func(f: LinearFunc, m: int, threads: int) -> tirx.PrimFunc:
    return gemv_int8_func(Int8GemvPlan.of(m, f.K, f.N, f.group, threads, accumulate=f.accumulate,
                                          out_width=f.out_width))


def _vq_func(f: LinearFunc, m: int, threads: int) -> tirx.PrimFunc:
    assert f.vq is not None and f.out_width is None, "VQ linears are whole calls (no column slices)"
    v, bits, segments = f.vq
    return gemv_vq_func(VQGemvPlan.of(m, f.K, f.N, len(bits), v, bits, threads, accumulate=f.accumulate,
                                      segments=segments))


def _groupwise(bits: tuple[int, ...]) -> Callable[[object], bool]:
    return lambda w: isinstance(w, GroupWiseWeights) and w.bits in bits


def _vq_runs(w: object) -> bool:
    if not isinstance(w, VQWeights) or len({s.vector for s in w.stages}) != 1:
        return False
    try:
        check_vq_shape(w.in_features, w.shape[0], w.stages[0].vector, tuple(s.bits for s in w.stages))
    except LowbitError:
        return False
    return True


KERNELS: dict[str, KernelFormat] = {
    "int4": KernelFormat((2, 3, 4), _groupwise((2, 3, 4)), _groupwise_packer(pack_int4_gemv), _int4_func),
    "int8": KernelFormat((8,), _groupwise((8,)), _groupwise_packer(pack_int8_gemv), _int8_func),
    "vq": KernelFormat((), _vq_runs, _pack_vq, _vq_func, _vq_operands, slices=False),
}


def grid_of(weights: Any) -> tuple:
    """What stacked weights of one kernel must share to be one call: the group size, or VQ's vector length and
    index widths."""
    if isinstance(weights, VQWeights):
        return (weights.stages[0].vector, tuple(s.bits for s in weights.stages))
    return (weights.group,)


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
    vq: tuple[int, tuple[int, ...], tuple[int, ...]] | None = None  # VQ: vector, index bits, rows per codebook

    @property
    def name(self) -> str:
        grid = f"g{self.group}" if self.vq is None else (
            f"v{self.vq[0]}_b{'-'.join(map(str, self.vq[1]))}_s{'-'.join(map(str, self.vq[2]))}")
        return (f"{self.kernel}_k{self.K}_n{self.N}_{grid}" + ("_acc" if self.accumulate else "")
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
    operand_names: tuple[str, ...]  # the packed arrays `<operands>.<name>`, in the kernel's order after x

    def meta(self) -> dict[str, Any]:
        return {"function": self.function.name, "operands": self.operands, "col": self.col,
                "members": list(self.members), "operand_names": list(self.operand_names)}


def layer_calls(layer: int, weights: Mapping[str, Any]) -> dict[str, list[LinearCall]]:
    """The calls of block `layer`, per slot (`LINEAR_SLOTS`); `weights` must be ones `supports` accepts."""
    calls: dict[str, list[LinearCall]] = {}
    for slot in LINEAR_SLOTS:
        members = SLOT_MEMBERS[slot]
        ws = [weights[f"layers.{layer}.{p}.weight"] for p in members]
        accumulate = slot in ACCUMULATE
        if len({(kernel_of(w), grid_of(w)) for w in ws}) == 1:
            calls[slot] = [_call(ws, members, f"layers.{layer}.{slot}", accumulate, None, None)]
            continue
        width, col, calls[slot] = sum(w.shape[0] for w in ws), 0, []
        for p, w in zip(members, ws, strict=True):
            if not KERNELS[kernel_of(w)].slices:
                raise LowbitError(f"layers.{layer}.{p}: its {kernel_of(w)} kernel cannot write a column slice, and "
                                  f"the {slot} linears differ in format; quantize them alike")
            calls[slot].append(_call([w], (p,), f"layers.{layer}.{p.rsplit('.', 1)[1]}", accumulate, width, col))
            col += w.shape[0]
    return calls


def _call(ws: list[Any], members: tuple[str, ...], operands: str, accumulate: bool, out_width: int | None,
          col: int | None) -> LinearCall:
    kernel, w = kernel_of(ws[0]), ws[0]
    vq = (grid_of(w)[0], grid_of(w)[1], tuple(x.shape[0] for x in ws)) if kernel == "vq" else None
    f = LinearFunc(kernel, w.shape[1], sum(x.shape[0] for x in ws), getattr(w, "group", 0), accumulate, out_width, vq)
    return LinearCall(f, operands, col, members, KERNELS[kernel].operands(w))


def pack_calls(layer: int, calls: dict[str, list[LinearCall]], weights: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """The packed operands of a layer's calls, named `<operands>.<operand name>`."""
    out = {}
    for slot_calls in calls.values():
        for c in slot_calls:
            arrays = KERNELS[c.function.kernel].pack([weights[f"layers.{layer}.{p}.weight"] for p in c.members])
            out.update({f"{c.operands}.{name}": a for name, a in arrays.items()})
    return out


def linear_functions(calls: list[dict[str, list[LinearCall]]]) -> dict[str, dict[str, Any]]:
    """The distinct functions of all layers' calls, by name, with their parameters (META's "functions")."""
    return {c.function.name: asdict(c.function) for layer in calls for slot in layer.values() for c in slot}
