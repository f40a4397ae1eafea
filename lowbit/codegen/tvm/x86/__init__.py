"""Fast, bit-exact int8 / int4-weight CPU kernels (TVM TIR) for x86: AVX2, plus VNNI where the target has it.

Public entry points
-------------------
``conv2d_nhwc(...)`` and ``dense(...)`` (the `kernel_api` interface, plus ``num_threads``, ``vnni``,
``avx512``, ``residual`` and, for dense, ``lut``) return ``(prim_func, constants)``. The PrimFunc parameters are
``(x, *constants, out)``; ``constants`` are numpy arrays (prepacked weights, bias, requantization parameters)
the caller passes as-is.

Semantics (the contract)::

    acc[n,oh,ow,oc] = bias[oc] + sum_{kh,kw,ic in group}
                      int32(x[n, oh*sh-pt+kh*dh, ow*sw-pl+kw*dw, g*ICg+ic]) * int32(w[oc,ic,kh,kw])
    y = clip((int64(acc) * mantissa[oc] + ((1 << shift[oc]) >> 1)) >> shift[oc], qmin, qmax)

with out-of-range input positions reading 0.  If ``mantissa`` is None the output is ``acc`` (int32).

Modules
-------
- `plans`: the frozen plans (geometry, tiles, choices) every kernel reads; `isa`: instruction-set features and
  the LLVM intrinsics; `packing`: operand layouts and numpy weight packers (no TVM);
- `requant`: the requantizer's constants and exactness checks (no TVM); `epilogue`: it as TIR, fused on the
  accumulator tile (exact int64 lanes, or float64 where `f64_requant_is_exact`; a residual add in float64 where
  `residual_is_exact`, its multipliers per channel or not; a table lookup on the requantized value);
- `gemm` + `im2col`: pointwise, general and grouped convs, dense; `depthwise`: depthwise convs;
- `layers`: `conv2d_nhwc` and `dense`, which pick the kernel family;
- `matmul`: batched 8-bit matmuls of two run-time tensors (attention): `matmul_pairs` a @ b on AVX2 (int16 pairs,
  vpmaddwd, with the requantize epilogue, operands and result read and written through permutes), wired into
  the encoder; `matmul_nt` a @ b^T with VNNI, not wired yet;
- `gemv_int4` + `int4_groups`: float32 activations times group-wise asymmetric INT4 weights (decoder linears:
  GEMV at batch 1, a row-tiled GEMM for prefill), its layout and numpy packer `pack_int4_gemv`; `gemv_int8`: its
  8-bit sibling (a tied LM head, int8 linears); `decoder_ops`: RMSNorm, RoPE + KV-cache write, attention over
  the cache, SiLU * up. Wired into a decoder artifact's ``decoder.so`` by `lowbit.codegen.tvm.decoder`;
- `gemv_vq` + `vq_layout`: float32 activations times vector-quantized weights (`VQWeights`, vq2 / vq3: a codeword
  gathered per vector and FMA'd against x; stacked linears with a codebook each), its layout and numpy packer
  `pack_vq_gemv`.

Importing this package does not import TVM: `packing`, `requant` and the names below that come from them load
alone; `conv2d_nhwc`, `dense`, `matmul_pairs` and `matmul_nt` import the TIR builders when first used.
"""

from __future__ import annotations

from typing import Any

from .requant import acc_bound, f64_requant_is_exact, residual_is_exact

__all__ = ["NUM_THREADS", "acc_bound", "conv2d_nhwc", "dense", "f64_requant_is_exact", "matmul_nt",
           "matmul_pairs", "residual_is_exact"]


def __getattr__(name: str) -> Any:
    """The TVM-dependent names, imported on first use (PEP 562)."""
    if name in ("conv2d_nhwc", "dense"):
        from . import layers

        return getattr(layers, name)
    if name in ("matmul_nt", "matmul_pairs"):
        from . import matmul

        return getattr(matmul, name)
    if name == "NUM_THREADS":
        from .plans import NUM_THREADS

        return NUM_THREADS
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
