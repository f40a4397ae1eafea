"""The GEMM kernel: pointwise, general and grouped convs and dense layers, int8 or int4 weights.

Activations are packed (`im2col`) into int32 words, the weights are prepacked (`packing`) into the matching
words `[G, OC/8, words, 8]`, and a register-blocked micro-kernel broadcasts one activation word and multiplies
it into 8 output channels per vector:
- AVX2, int8 weights: int16 pairs, `vpmaddwd` (exact int16*int16 pair sums into int32); weights within |w| <= 64
  (`ir.weights.u8s8_pairs_exact`, all of them at `--bits 7`): bytes x' as for VNNI, `vpmaddubsw` (which cannot
  saturate on them) and `vpmaddwd` with ones, 32 products per two instructions rather than 16 per one (`byte_pairs`,
  1.2-1.25x on MiniLM's FFN GEMMs: `benchmarks/bench_byte_pairs.py`);
- VNNI, int8 weights: bytes x' (uint8 x; int8 x+128, with -128*sum_k w folded into the bias), `vpdpbusd` (u8*s8
  quads summed exactly into int32);
- int4 weights, unpacked in the kernel: per 8 K values `(v & 0x0F0F0F0F) - 8` and `((v >> 4) & ...) - 8` (int8
  bytes), then `vpdpbusd` with VNNI, else `vpmaddubsw` x' (u8) * w (s8) for both halves (pair sums in [-4080,
  3570], no saturation), `vpaddw` (|.| <= 8160) and `vpmaddwd` with ones into the int32 accumulators.
The requantize epilogue (and a fused residual add) runs on the accumulator tile (`epilogue`). Parallel loops are
chunked per thread (`num_threads` tasks) so the per-task accumulator scratch is allocated once per task.

`gemm_func` reads only its `GemmPlan`, which holds shapes and choices, never weight values: W32 and BIAS are
PrimFunc parameters like X. Attention's Q.K^T and A.V (two activation operands) have their own kernels,
`matmul.matmul_pairs` (AVX2: both operands packed at run time into these int16-pair words, the same register
tiles and requantize epilogue) and `matmul.matmul_nt` (VNNI, not wired in). Where a register tile's weights pass
16 KB (`GemmPlan.KCW`), each task sweeps K in chunks, its partial sums in a scratch buffer between chunks. What
still ties this GEMM to constant weights, and what reusing it needs:
- the weight words are packed in numpy (`packing.pack_gemm_weight`): a run-time operand needs a TIR pass that
  packs it into the same words (`packing.pack_k_major_vnni` is that layout from [G, N, K] values);
- int8 activations are fed as x + 128, and -128 * sum_k w is folded into BIAS in numpy: with a run-time operand
  that sum is a per-(batch, column) sum computed in the same packing pass;
- the float64 epilogue is chosen from `acc_bound(weight, ...)`: with a run-time operand, bound |acc| by
  K * max|x| * max|y| from the two dtypes instead;
- batch maps onto the G groups (each has its own packed operand and output columns), but the activation and
  output indexing assume channels-last rows ([M, G*K] in, [M, G*N] out), not [B, M, K] / [B, M, N].
"""

from __future__ import annotations

import functools

import numpy as np
from tvm import tirx
from tvm.script import tirx as T

from ....ir.weights import u8s8_pairs_exact
from ..kernel_api import Lut, Residual
from .epilogue import lut_vec, requantize_vec, residual_vec
from .im2col import View4, activation_macros
from .isa import PMADDUBSW, PMADDWD, VPDPBUSD, Isa, nib8
from .packing import VEC, pack_gemm_weight
from .plans import NUM_THREADS, ConvGeometry, Epilogue, GemmPlan
from .requant import (
    acc_bound,
    epilogue_constants,
    f64_requant_is_exact,
    fold_input_offset,
    multipliers,
    requant_arrays,
    residual_is_exact,
    residual_scales,
)


@functools.cache  # one parse per distinct plan: layers of one shape share the kernel (`lower` adds it once)
def gemm_func(p: GemmPlan) -> tirx.PrimFunc:
    """The PrimFunc (X, [SKIP,] W32, BIAS, ALO, AHI, MANT, C1, SH, C2, MD, OUT) of plan `p`."""
    geo, lay, ep = p.geo, p.layout, p.epilogue
    pad_copy, pack_rows, pack_activations = activation_macros(p)

    def tile_coords(t):
        nrb = max(p.NRB, 1)  # (no full row blocks: never called)
        g = t // (nrb * p.NCT)
        r = t % (nrb * p.NCT)
        if p.rows_outer:
            return g, r // p.NCT * p.MR, r % p.NCT
        return g, r % nrb * p.MR, r // nrb

    def requantized(accv, R, ch, m, col):
        """Output row m, columns col.. (8 channels, constants at ch..): requantized, then the fused add or
        table lookup if any."""
        y = requantize_vec(accv, R, ch, ep.qmin, ep.qmax, ep.f64, p.isa.avx512)
        if ep.lut is not None:
            return lut_vec(y, R[7], col, ep.lut)
        if ep.residual is None:
            return y
        return residual_vec(y, T.Cast("float64x8", R[7][m, T.ramp(col, 1, VEC)]), R[8][T.ramp(ch, 1, VEC)],
                            R[9][T.ramp(ch, 1, VEC)], ep.residual, p.isa.avx512)

    def x_bytes(XP32, g, m, q):
        """Activation word q of row m, broadcast to every lane as the u8 operand: bytes x' (see the plan's x_flip)."""
        word = XP32[g, m, q]
        if p.x_flip:
            word = T.bitwise_xor(word, T.int32(-0x7F7F7F80))  # 0x80808080: +128 per byte
        return T.reinterpret("int8x32", T.broadcast(word, VEC))

    def dpbusd(accv, x, w_bytes):
        """accv + the sums of 4 u8*s8 products per int32 lane, exact (vpdpbusd)."""
        return T.call_llvm_pure_intrin("int32x8", VPDPBUSD, accv, x, w_bytes)

    def quad_sums(accv, x, w_bytes):
        """accv + the sums of 4 u8*s8 products per int32 lane, exact: vpdpbusd, or on AVX2 (`byte_pairs`,
        weights that cannot saturate) PMADDUBSW's pair sums, then PMADDWD with ones."""
        if p.isa.vnni:
            return dpbusd(accv, x, w_bytes)
        pairs = T.call_llvm_pure_intrin("int16x16", PMADDUBSW, x, w_bytes)
        return accv + T.call_llvm_pure_intrin("int32x8", PMADDWD, pairs, T.broadcast(T.int16(1), 16))

    @T.macro
    def kstep4_vnni(XP32, W32, acc, g, m0, cv0, mr, nv, q):
        for r in T.unroll(mr):
            for v in T.unroll(nv):
                acc[T.ramp((r * nv + v) * VEC, 1, VEC)] = dpbusd(
                    dpbusd(
                        acc[T.ramp((r * nv + v) * VEC, 1, VEC)],
                        x_bytes(XP32, g, m0 + r, 2 * q),
                        nib8(W32[g, cv0 + v, q, T.ramp(0, 1, VEC)], 0),
                    ),
                    x_bytes(XP32, g, m0 + r, 2 * q + 1),
                    nib8(W32[g, cv0 + v, q, T.ramp(0, 1, VEC)], 1),
                )

    @T.macro
    def kstep4(XP32, W32, acc, g, m0, cv0, mr, nv, q):
        for r in T.unroll(mr):
            for v in T.unroll(nv):
                acc[T.ramp((r * nv + v) * VEC, 1, VEC)] = acc[
                    T.ramp((r * nv + v) * VEC, 1, VEC)
                ] + T.call_llvm_pure_intrin(
                    "int32x8",
                    PMADDWD,
                    T.call_llvm_pure_intrin(
                        "int16x16",
                        PMADDUBSW,
                        x_bytes(XP32, g, m0 + r, 2 * q),
                        nib8(W32[g, cv0 + v, q, T.ramp(0, 1, VEC)], 0),
                    )
                    + T.call_llvm_pure_intrin(
                        "int16x16",
                        PMADDUBSW,
                        x_bytes(XP32, g, m0 + r, 2 * q + 1),
                        nib8(W32[g, cv0 + v, q, T.ramp(0, 1, VEC)], 1),
                    ),
                    T.broadcast(T.int16(1), 16),
                )

    @T.macro
    def store(R, OUT, acc, accs, g, m0, cv0, mr, nv, partial):
        for r in T.unroll(mr):
            for v in T.unroll(nv - 1 if partial else nv):
                if ep.requant:
                    OUT[m0 + r, T.ramp(g * p.OCg + (cv0 + v) * VEC, 1, VEC)] = T.Cast(
                        ep.out_vec,
                        requantized(
                            acc[T.ramp((r * nv + v) * VEC, 1, VEC)], R, g * lay.OCBP + (cv0 + v) * VEC, m0 + r,
                            g * p.OCg + (cv0 + v) * VEC,
                        ),
                    )
                else:
                    OUT[m0 + r, T.ramp(g * p.OCg + (cv0 + v) * VEC, 1, VEC)] = acc[T.ramp((r * nv + v) * VEC, 1, VEC)]
            if partial:
                if ep.requant:
                    acc[T.ramp((r * nv + nv - 1) * VEC, 1, VEC)] = requantize_vec(
                        acc[T.ramp((r * nv + nv - 1) * VEC, 1, VEC)],
                        R,
                        g * lay.OCBP + (cv0 + nv - 1) * VEC,
                        ep.qmin,
                        ep.qmax,
                        ep.f64,
                        p.isa.avx512,
                    )
                for ln in T.unroll(p.LAST_LANES):
                    OUT[m0 + r, g * p.OCg + (cv0 + nv - 1) * VEC + ln] = T.Cast(
                        ep.out_dtype, accs[(r * nv + nv - 1) * VEC + ln]
                    )

    @T.macro
    def micro(XP32, W32, BIAS, R, OUT, acc, accs, g, m0, cv0, mr, nv, partial, ACCB, slot, kc):
        # words [kc * KCW, min((kc + 1) * KCW, WK)) of K; partial sums kept in ACCB[slot] between chunks
        for r in T.unroll(mr):
            for v in T.unroll(nv):
                if p.NKC == 1:
                    acc[T.ramp((r * nv + v) * VEC, 1, VEC)] = BIAS[T.ramp(g * lay.OCBP + (cv0 + v) * VEC, 1, VEC)]
                elif kc == 0:
                    acc[T.ramp((r * nv + v) * VEC, 1, VEC)] = BIAS[T.ramp(g * lay.OCBP + (cv0 + v) * VEC, 1, VEC)]
                else:
                    acc[T.ramp((r * nv + v) * VEC, 1, VEC)] = ACCB[slot, T.ramp((r * nv + v) * VEC, 1, VEC)]
        if p.wbits == 4:
            for q in T.serial(kc * p.KCW, T.min((kc + 1) * p.KCW, lay.KQ2)):
                if p.isa.vnni:
                    kstep4_vnni(XP32, W32, acc, g, m0, cv0, mr, nv, q)
                else:
                    kstep4(XP32, W32, acc, g, m0, cv0, mr, nv, q)
        elif p.byte_words:
            for q in T.serial(kc * p.KCW, T.min((kc + 1) * p.KCW, lay.KQ)):
                for r in T.unroll(mr):
                    for v in T.unroll(nv):
                        acc[T.ramp((r * nv + v) * VEC, 1, VEC)] = quad_sums(
                            acc[T.ramp((r * nv + v) * VEC, 1, VEC)],
                            x_bytes(XP32, g, m0 + r, q),
                            T.reinterpret("int8x32", W32[g, cv0 + v, q, T.ramp(0, 1, VEC)]),
                        )
        else:
            for kp in T.serial(kc * p.KCW, T.min((kc + 1) * p.KCW, lay.KP)):
                for r in T.unroll(mr):
                    for v in T.unroll(nv):
                        acc[T.ramp((r * nv + v) * VEC, 1, VEC)] = acc[
                            T.ramp((r * nv + v) * VEC, 1, VEC)
                        ] + T.call_llvm_pure_intrin(
                            "int32x8",
                            PMADDWD,
                            T.reinterpret("int16x16", T.broadcast(XP32[g, m0 + r, kp], VEC)),
                            T.reinterpret("int16x16", W32[g, cv0 + v, kp, T.ramp(0, 1, VEC)]),
                        )
        if p.NKC > 1:
            if kc < p.NKC - 1:
                for r in T.unroll(mr):
                    for v in T.unroll(nv):
                        ACCB[slot, T.ramp((r * nv + v) * VEC, 1, VEC)] = acc[T.ramp((r * nv + v) * VEC, 1, VEC)]
            else:
                store(R, OUT, acc, accs, g, m0, cv0, mr, nv, partial)
        else:
            store(R, OUT, acc, accs, g, m0, cv0, mr, nv, partial)

    @T.macro
    def row_block(XP32, W32, BIAS, R, OUT, acc, accs, g, m0, ct, mr, ACCB, slot, kc):
        if p.NV_TAIL == 0:
            if p.LAST_LANES == VEC:
                micro(XP32, W32, BIAS, R, OUT, acc, accs, g, m0, ct * p.NV, mr, p.NV, False, ACCB, slot, kc)
            else:
                if ct < p.NCT_FULL - 1:
                    micro(XP32, W32, BIAS, R, OUT, acc, accs, g, m0, ct * p.NV, mr, p.NV, False, ACCB, slot, kc)
                else:
                    micro(XP32, W32, BIAS, R, OUT, acc, accs, g, m0, ct * p.NV, mr, p.NV, True, ACCB, slot, kc)
        else:
            if ct < p.NCT_FULL:
                micro(XP32, W32, BIAS, R, OUT, acc, accs, g, m0, ct * p.NV, mr, p.NV, False, ACCB, slot, kc)
            else:
                micro(XP32, W32, BIAS, R, OUT, acc, accs, g, m0, p.NCT_FULL * p.NV, mr, p.NV_TAIL,
                      p.LAST_LANES != VEC, ACCB, slot, kc)


    @T.macro
    def body(X, W32, BIAS, R, OUT):
        XP32A = T.alloc_buffer(p.XP_SHAPE, "int32")
        XD32 = T.decl_buffer((p.G, p.M, lay.XW), "int32", data=X.data)
        XP32 = T.meta_var(XD32 if p.x_direct else XP32A)
        Ov = T.decl_buffer((p.M, geo.OC), ep.out_dtype, data=OUT.data)
        XS = T.decl_buffer((geo.N, geo.H, geo.W, geo.C), p.x_dtype, data=X.data)
        XF = T.decl_buffer((geo.N * geo.H * geo.W * geo.C,), p.x_dtype, data=X.data)
        XPADF = T.alloc_buffer((p.XPAD_SIZE,), p.x_dtype)
        # the [N, H, W, C] input im2col reads
        SRC = T.meta_var(View4(XPADF, geo.HP, geo.WP, geo.C) if p.use_xpad else XS)
        if p.use_xpad:
            pad_copy(XF, XPADF)
        pack_activations(X, XF, XPADF, SRC, XP32, XP32A)
        # ---- GEMM over register tiles, the MR_TAIL rows' tiles last; one accumulator scratch per task ----
        for tid in T.parallel(p.num_threads):
            acc = T.alloc_buffer((p.MR * p.NV * VEC,), "int32", scope="local")
            accs = T.meta_var(acc)
            ACCB = T.alloc_buffer((p.CH if p.NKC > 1 else 1, p.MR * p.NV * VEC), "int32")  # sums between K chunks
            if p.pack_in_tasks:
                pack_rows(XF, XPADF, XP32A, T.min(tid * p.RB * p.MR, p.M), T.min((tid + 1) * p.RB * p.MR, p.M))
            for kc in T.serial(p.NKC):
                for ti in T.serial(p.CH):
                    if tid * p.CH + ti < p.TOT:
                        gi, m0, ct = T.meta_var(tile_coords(tid * p.CH + ti))
                        row_block(XP32, W32, BIAS, R, Ov, acc, accs, gi, m0, ct, p.MR, ACCB, ti, kc)
                    elif tid * p.CH + ti < p.TOT + p.TOT_T:
                        row_block(XP32, W32, BIAS, R, Ov, acc, accs, (tid * p.CH + ti - p.TOT) // p.NCT,
                                  p.NRB * p.MR, (tid * p.CH + ti - p.TOT) % p.NCT, p.MR_TAIL, ACCB, ti, kc)

    # TVMScript signatures are fixed: the fused-add variant adds SKIP, MY and MS, the fused-lut one TABLE
    if ep.lut is not None:

        @T.prim_func(private=True)
        def func(
            X: T.Buffer(p.x_buf_shape, p.x_dtype),
            W32: T.Buffer((p.G, lay.OCB, lay.WK, VEC), "int32"),
            BIAS: T.Buffer((p.NP,), "int32"),
            ALO: T.Buffer((p.NP,), "int32"),
            AHI: T.Buffer((p.NP,), "int32"),
            MANT: T.Buffer((p.NP + VEC,), "int32"),
            C1: T.Buffer((p.NP,), "int64"),
            SH: T.Buffer((p.NP,), "int64"),
            C2: T.Buffer((p.NP,), "int32"),
            MD: T.Buffer((p.NP,), "float64"),
            TABLE: T.Buffer((ep.lut.size,), ep.lut.dtype),
            OUT: T.Buffer(p.out_shape, ep.out_dtype),
        ):
            T.func_attr({"tirx.noalias": True})
            R = T.meta_var((ALO, AHI, MANT, C1, SH, C2, MD, TABLE))
            body(X, W32, BIAS, R, OUT)

    elif ep.residual is None:

        @T.prim_func(private=True)
        def func(
            X: T.Buffer(p.x_buf_shape, p.x_dtype),
            W32: T.Buffer((p.G, lay.OCB, lay.WK, VEC), "int32"),
            BIAS: T.Buffer((p.NP,), "int32"),
            ALO: T.Buffer((p.NP,), "int32"),
            AHI: T.Buffer((p.NP,), "int32"),
            MANT: T.Buffer((p.NP + VEC,), "int32"),
            C1: T.Buffer((p.NP,), "int64"),
            SH: T.Buffer((p.NP,), "int64"),
            C2: T.Buffer((p.NP,), "int32"),
            MD: T.Buffer((p.NP,), "float64"),
            OUT: T.Buffer(p.out_shape, ep.out_dtype),
        ):
            T.func_attr({"tirx.noalias": True})
            R = T.meta_var((ALO, AHI, MANT, C1, SH, C2, MD))
            body(X, W32, BIAS, R, OUT)

    else:

        @T.prim_func(private=True)
        def func(
            X: T.Buffer(p.x_buf_shape, p.x_dtype),
            SKIP: T.Buffer(p.out_shape, ep.residual.skip_dtype),
            W32: T.Buffer((p.G, lay.OCB, lay.WK, VEC), "int32"),
            BIAS: T.Buffer((p.NP,), "int32"),
            ALO: T.Buffer((p.NP,), "int32"),
            AHI: T.Buffer((p.NP,), "int32"),
            MANT: T.Buffer((p.NP + VEC,), "int32"),
            C1: T.Buffer((p.NP,), "int64"),
            SH: T.Buffer((p.NP,), "int64"),
            C2: T.Buffer((p.NP,), "int32"),
            MD: T.Buffer((p.NP,), "float64"),
            MY: T.Buffer((p.NP,), "float64"),
            MS: T.Buffer((p.NP,), "float64"),
            OUT: T.Buffer(p.out_shape, ep.out_dtype),
        ):
            T.func_attr({"tirx.noalias": True})
            SKIPv = T.decl_buffer((p.M, geo.OC), ep.residual.skip_dtype, data=SKIP.data)
            R = T.meta_var((ALO, AHI, MANT, C1, SH, C2, MD, SKIPv, MY, MS))
            body(X, W32, BIAS, R, OUT)

    return func


def gemm_conv(x_shape: tuple[int, ...], x_dtype: str, weight: np.ndarray, stride: tuple[int, int],
              padding: tuple[int, int, int, int], dilation: tuple[int, int], groups: int, bias: np.ndarray,
              mantissa: np.ndarray | None, shift: np.ndarray | None, qmin: int, qmax: int, out_dtype: str,
              out_shape: tuple[int, ...] | None = None, x_buf_shape: tuple[int, ...] | None = None, wbits: int = 8,
              num_threads: int = NUM_THREADS, isa: Isa | None = None,
              residual: Residual | None = None,
              lut: tuple[Lut, np.ndarray] | None = None) -> tuple[tirx.PrimFunc, list[np.ndarray]] | None:
    """A GEMM-shaped conv's (PrimFunc, constants); None where `residual` or `lut` (its kind and flat table; the
    PrimFunc then takes the table after MD) cannot be fused exactly: each needs whole vectors of channels and
    one group, the residual also `residual_is_exact`, the lut a table that every requantized y indexes."""
    geo = ConvGeometry.of(x_shape, weight.shape, stride, padding, dilation)
    G = int(groups)
    if geo.C != geo.ICg * G or geo.OC % G:
        raise ValueError("inconsistent groups / channels")
    OCg = geo.OC // G
    requant = mantissa is not None
    if not requant:
        out_dtype = "int32"
    f64 = f64_requant_is_exact(mantissa, shift, qmin, qmax, acc_bound(weight, bias, x_dtype))
    whole = G == 1 and OCg % VEC == 0 and requant
    if residual is not None and not (whole and residual_is_exact(residual, (int(qmin), int(qmax)))
                                     and all(len(m) in (1, geo.OC) for m in (multipliers(residual.y_multiplier),
                                                                             multipliers(residual.skip_multiplier)))):
        return None
    if lut is not None and not (whole and residual is None and lut_fits(lut[0], geo.OC, int(qmin), int(qmax))):
        return None
    isa = isa or Isa()
    plan = GemmPlan(geo=geo, G=G, x_dtype=x_dtype, x_buf_shape=tuple(x_buf_shape or (geo.N, geo.H, geo.W, geo.C)),
                    out_shape=tuple(out_shape or (geo.N, geo.OH, geo.OW, geo.OC)),
                    epilogue=Epilogue(requant, int(qmin), int(qmax), lut[0].dtype if lut else out_dtype, f64,
                                      residual, lut[0] if lut else None), isa=isa,
                    wbits=wbits, num_threads=num_threads,
                    byte_pairs=wbits == 8 and not isa.vnni and u8s8_pairs_exact(weight))
    func = gemm_func(plan)
    lay = plan.layout
    w32 = pack_gemm_weight(weight, lay)
    if lay.byte_x:  # x' = x + 128 for int8 inputs: -128 * sum_k w goes into the bias
        bias = fold_input_offset(bias, weight, x_dtype, geo.OC)
        bias = ((bias + (1 << 31)) % (1 << 32) - (1 << 31)).astype(np.int32)

    # per-group channel padding: group g's channels live at [g*OCBP, g*OCBP+OCg)
    def regroup(a: np.ndarray) -> np.ndarray:
        return np.asarray(a).reshape(G, OCg)

    lists = [epilogue_constants(requant_arrays(regroup(bias)[g], None if mantissa is None else regroup(mantissa)[g],
                                               None if shift is None else regroup(shift)[g], qmin, qmax, OCg,
                                               lay.OCBP), requant)
             for g in range(G)]
    consts = [w32]
    for i in range(len(lists[0])):
        parts = [lst[i] for lst in lists]
        if i == 3:  # mant has VEC trailing pad per group: drop it between groups
            parts = [p_[: lay.OCBP] for p_ in parts] + [np.zeros(VEC, np.int32)]
        consts.append(np.ascontiguousarray(np.concatenate(parts)))
    if residual is not None:
        consts += residual_scales(residual, geo.OC, lay.OCBP)
    if lut is not None:
        consts.append(np.ascontiguousarray(lut[1].reshape(-1)))
    return func, consts


def lut_fits(lut: Lut, channels: int, qmin: int, qmax: int) -> bool:
    """Whether every y in [qmin, qmax] of every channel indexes inside the flat table."""
    return (qmin + lut.offset >= 0 and qmax + lut.offset < (lut.row or lut.size)
            and lut.row * (channels - 1) + qmax + lut.offset < lut.size)
