"""The register tile the group-wise GEMVs share (`gemv_int4`, `gemv_int8`), as a TVMScript macro.

For one tile of NV output vectors (8 lanes each) and `mr` rows of x starting at m0: per group, `group_dot`
(the kernel's `unpack` of its value width) sums q * x into KS partial sums per accumulator; `fold` adds
them and folds the group into the accumulators with two FMAs, + scale * dot and + (-zero * scale) * sum(x of the
group) (SX); the last group may be short (LW words). The tile then stores (or, with `p.accumulate`, adds) its
outputs at column `col` of Y. `p` is either kernel's plan: it has NV, KS, NG, GW, LW and accumulate.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from tvm.script import tirx as T

from .int4_groups import LANES

FMA = "llvm.fma.v8f32"


def group_tile(p: Any, per_word: int, unpack: Callable[[Any, Any], Any]) -> Any:
    """The `tile(XS, W, SCALE, NEG_ZS, SX, Y, gacc, acc, m0, mr, t, col)` macro of plan `p` for weights of
    `per_word` values per int32 word, `unpack(word, j)` giving value j of each lane as float32x8 (the kernel's
    scaled unpack: x is prescaled to match)."""
    NV, GW, KS = p.NV, p.GW, p.KS

    @T.macro
    def group_dot(XS, W, gacc, m0, mr, t, g, nw):
        for a in T.unroll(mr * NV * KS):
            gacc[T.ramp(a * LANES, 1, LANES)] = T.broadcast(T.float32(0), LANES)
        for kq in T.serial(nw):
            for j in T.unroll(per_word):
                for v in T.unroll(NV):
                    for r in T.unroll(mr):
                        gacc[T.ramp(((r * NV + v) * KS + j % KS) * LANES, 1, LANES)] = T.call_llvm_pure_intrin(
                            "float32x8", FMA, unpack(W[t * NV + v, g * GW + kq, T.ramp(0, 1, LANES)], j),
                            T.broadcast(XS[m0 + r, g * p.group + kq * per_word + j], LANES),
                            gacc[T.ramp(((r * NV + v) * KS + j % KS) * LANES, 1, LANES)])

    @T.macro
    def fold(SCALE, NEG_ZS, SX, gacc, acc, m0, mr, t, g):
        for r in T.unroll(mr):
            for v in T.unroll(NV):
                for h in T.unroll(1, KS):
                    gacc[T.ramp((r * NV + v) * KS * LANES, 1, LANES)] = (
                        gacc[T.ramp((r * NV + v) * KS * LANES, 1, LANES)]
                        + gacc[T.ramp(((r * NV + v) * KS + h) * LANES, 1, LANES)])
                acc[T.ramp((r * NV + v) * LANES, 1, LANES)] = T.call_llvm_pure_intrin(
                    "float32x8", FMA, NEG_ZS[t * NV + v, g, T.ramp(0, 1, LANES)], T.broadcast(SX[m0 + r, g], LANES),
                    T.call_llvm_pure_intrin("float32x8", FMA, SCALE[t * NV + v, g, T.ramp(0, 1, LANES)],
                                            gacc[T.ramp((r * NV + v) * KS * LANES, 1, LANES)],
                                            acc[T.ramp((r * NV + v) * LANES, 1, LANES)]))

    @T.macro
    def tile(XS, W, SCALE, NEG_ZS, SX, Y, gacc, acc, m0, mr, t, col):
        for r in T.unroll(mr):
            for v in T.unroll(NV):
                acc[T.ramp((r * NV + v) * LANES, 1, LANES)] = T.broadcast(T.float32(0), LANES)
        for g in T.serial(p.NG - 1):
            group_dot(XS, W, gacc, m0, mr, t, g, GW)
            fold(SCALE, NEG_ZS, SX, gacc, acc, m0, mr, t, g)
        group_dot(XS, W, gacc, m0, mr, t, p.NG - 1, p.LW)
        fold(SCALE, NEG_ZS, SX, gacc, acc, m0, mr, t, p.NG - 1)
        for r in T.unroll(mr):
            for v in T.unroll(NV):
                if p.accumulate:
                    Y[m0 + r, T.ramp(col + (t * NV + v) * LANES, 1, LANES)] = (
                        Y[m0 + r, T.ramp(col + (t * NV + v) * LANES, 1, LANES)]
                        + acc[T.ramp((r * NV + v) * LANES, 1, LANES)])
                else:
                    Y[m0 + r, T.ramp(col + (t * NV + v) * LANES, 1, LANES)] = acc[T.ramp((r * NV + v) * LANES, 1,
                                                                                         LANES)]

    return tile
