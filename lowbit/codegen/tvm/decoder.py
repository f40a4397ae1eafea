"""A decoder LLM's TVM library: the kernels of one decode step (M = 1) and of a prefill chunk (M = CHUNK rows),
compiled into ``decoder.so``, and its weights packed into the kernels' layouts (``decoder_tvm.safetensors``).

`lowbit.runtime.decoder_tvm.TvmDecoder` calls the kernels layer by layer (a Python loop over preallocated
buffers; see there). Per layer at M rows:

    norm -> qkv (q|k|v: one GEMV, N = (heads + 2 kv_heads) head_dim, or one per format) -> rope_cache (q to Q, k
    and v into the cache) -> attention -> o (adds into the residual) -> norm -> gate_up (gate|up: one GEMV,
    N = 2 intermediate, or one per format) -> silu -> down (adds into the residual)

then the final norm of the last row and the LM head (int8 group-wise GEMV, the tied embedding's format).
Each block linear runs on the kernel of its own format (`decoder_linears`: int2/3/4 on the int4 GEMV, int8 on
the int8 GEMV, vq2/vq3 on the VQ GEMV), so mixed-precision plans and VQ artifacts run here too. The linears'
functions are named after their kernel and shapes (`decoder_linears.LinearFunc`), the others `<kernel>_<M>`;
META records which function each layer calls and on which operands. `supports` says which artifacts have kernels.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import tvm

from ...errors import LowbitError
from ...io import write_json
from ...ir.groupwise_weights import GroupWiseWeights
from ...runtime.decoder_tvm import LIBRARY, META, PACKED, TVM_DECODER_FORMAT
from .decoder_linears import (
    KERNELS,
    PROJECTIONS,
    SLOT_MEMBERS,
    LinearCall,
    grid_of,
    kernel_of,
    layer_calls,
    linear_functions,
    pack_calls,
)
from .target import parse_target, required_features, target_string
from .x86.decoder_ops import KEYS, attention_func, rmsnorm_func, rope_cache_func, silu_mul_func
from .x86.gemv_int8 import Int8GemvPlan, gemv_int8_func, pack_int8_gemv

CHUNK = 32  # prefill rows per call: a multiple of the GEMM's 4-row register tile
EMBEDDING_BITS = 8


@dataclass(frozen=True)
class DecoderShapes:
    """What the kernels are compiled for: the model's dimensions, the LM head's group, rows per prefill call."""

    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    vocab: int
    context: int
    eps: float
    embedding_group: int
    chunk: int
    threads: int

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @property
    def vocab_padded(self) -> int:
        """LM head rows as the int8 GEMV computes them: the vocabulary padded to whole vectors of 8."""
        return -(-self.vocab // 8) * 8

    @property
    def qkv(self) -> int:
        return (self.heads + 2 * self.kv_heads) * self.head_dim


def supports(config: dict[str, Any], weights: Mapping[str, object]) -> str | None:
    """Why the decoder has no TVM kernels (None when it has): the formats and shapes they cover."""
    layers = int(config["num_layers"])
    names = [f"layers.{i}.{p}.weight" for i in range(layers) for p in PROJECTIONS]
    missing = [n for n in names if weights.get(n) is None]
    if missing:
        return f"some block linears are not quantized ({missing[0]}, ...)"
    no_kernel = [n for n in names if kernel_of(weights[n]) is None]
    if no_kernel:
        w = weights[no_kernel[0]]
        return (f"{len(no_kernel)} block linears have no TVM kernel for their format ({no_kernel[0]}: "
                f"{getattr(w, 'name', type(w).__name__)}; the kernels run group-wise int2/3/4/8, and VQ with 1, 2, "
                "4 or 8-bit indices and vectors of 4 or 8)")
    for i in range(layers):
        for slot, members in SLOT_MEMBERS.items():
            ws = [weights[f"layers.{i}.{p}.weight"] for p in members]
            kinds = {(kernel_of(w), grid_of(w)) for w in ws}
            if len(kinds) > 1 and not all(KERNELS[k].slices for k, _ in kinds):
                return (f"layers.{i} {slot}: its linears differ in format ({', '.join(sorted(k for k, _ in kinds))}) "
                        "and the VQ kernel cannot write a column slice")
    embedding = weights.get("embed_tokens.weight")
    if embedding is None or embedding.bits != EMBEDDING_BITS or not config["tie_embeddings"]:
        return f"the TVM path needs a tied {EMBEDDING_BITS}-bit group-wise embedding / LM head"
    groups = sorted({weights[n].group for n in names if isinstance(weights[n], GroupWiseWeights)})
    hidden, heads = int(config["hidden_size"]), int(config["num_heads"])
    if hidden % 8 or int(config["intermediate_size"]) % 8 or hidden % heads or (hidden // heads) % 8 \
            or heads % int(config["num_kv_heads"]) or any(g % 8 for g in groups):
        return (f"the TVM kernels need hidden, intermediate and head sizes and the groups ({groups}) in multiples "
                "of 8")
    if int(config["context_length"]) % KEYS:
        return f"the TVM attention kernel needs a context length that is a multiple of {KEYS}"
    return None


def decoder_shapes(config: dict[str, Any], embedding_group: int, threads: int, chunk: int = CHUNK) -> DecoderShapes:
    return DecoderShapes(int(config["hidden_size"]), int(config["intermediate_size"]), int(config["num_heads"]),
                         int(config["num_kv_heads"]), int(config["vocab_size"]), int(config["context_length"]),
                         float(config["rms_norm_eps"]), embedding_group, chunk, threads)


def decoder_module(s: DecoderShapes, calls: list[dict[str, list[LinearCall]]]) -> tvm.IRModule:
    """Every kernel of a decode step (M = 1) and a prefill chunk (M = s.chunk): the layers' linear functions
    (`calls`, each distinct one once) named `<LinearFunc.name>_<M>`, the others `<kernel>_<M>`."""
    funcs = {"lm_head": gemv_int8_func(Int8GemvPlan.of(1, s.hidden, s.vocab_padded, s.embedding_group, s.threads))}
    linears = {c.function for layer in calls for slot in layer.values() for c in slot}
    for m in sorted({1, s.chunk}):
        funcs.update({
            f"norm_{m}": rmsnorm_func(m, m, s.hidden, s.eps),
            f"final_norm_{m}": rmsnorm_func(m, 1, s.hidden, s.eps),
            f"rope_cache_{m}": rope_cache_func(m, s.heads, s.kv_heads, s.head_dim, s.context),
            f"attention_{m}": attention_func(m, s.heads, s.kv_heads, s.head_dim, s.context, s.threads),
            f"silu_{m}": silu_mul_func(m, s.intermediate),
        })
        funcs.update({f"{f.name}_{m}": f.func(m, s.threads) for f in linears})
    return tvm.IRModule({name: f.with_attr("global_symbol", name) for name, f in funcs.items()})


def pack_decoder(config: dict[str, Any], weights: Mapping[str, Any], tensors: dict[str, np.ndarray],
                 calls: list[dict[str, list[LinearCall]]]) -> dict[str, np.ndarray]:
    """The packed arrays the runtime feeds the kernels: each layer's calls' operands (`decoder_linears.pack_calls`),
    `lm_head.<operand>` and the RMSNorm gains under their parameter names."""
    out: dict[str, np.ndarray] = {}
    for i, layer in enumerate(calls):
        out.update(pack_calls(i, layer, weights))
        for norm in ("input_layernorm.weight", "post_attention_layernorm.weight"):
            out[f"layers.{i}.{norm}"] = tensors[f"layers.{i}.{norm}"]
    e = weights["embed_tokens.weight"]
    pad = ((0, -len(e.values) % 8), (0, 0))  # zero rows (scale 0): logits the runtime drops
    head = pack_int8_gemv(np.pad(e.values, pad), np.pad(e.scale, pad), np.pad(e.zero, pad), e.group)
    out.update({"lm_head.w": head.w, "lm_head.scale": head.scale, "lm_head.neg_zs": head.neg_zs,
                "norm.weight": tensors["norm.weight"]})
    return {k: np.ascontiguousarray(v) for k, v in out.items()}


def build_decoder_library(directory: Path, config: dict[str, Any], weights: Mapping[str, Any],
                          tensors: dict[str, np.ndarray], target_spec: str = "llvm -mcpu=native",
                          chunk: int = CHUNK) -> dict[str, Any]:
    """Compile the kernels for `target_spec` and pack the weights into `directory` (LIBRARY, PACKED, META);
    returns META's content. LowbitError if the formats have no kernels (`supports`)."""
    from safetensors.numpy import save_file

    why = supports(config, weights)
    if why:
        raise LowbitError(f"no TVM decode kernels for this decoder: {why}; run it with the numpy runtime")
    target = parse_target(target_spec)
    shapes = decoder_shapes(config, weights["embed_tokens.weight"].group, int(target["num-cores"]), chunk)
    calls = [layer_calls(i, weights) for i in range(int(config["num_layers"]))]
    start = time.perf_counter()
    tvm.compile(decoder_module(shapes, calls), target=tvm.target.Target(target)).export_library(
        str(directory / LIBRARY))
    compile_s = time.perf_counter() - start
    save_file(pack_decoder(config, weights, tensors, calls), str(directory / PACKED))
    meta = {"format": TVM_DECODER_FORMAT, "tvm_version": tvm.__version__, "target": target,
            "target_string": target_string(target), "required_features": required_features(target),
            "shapes": dataclasses.asdict(shapes), "compile_s": round(compile_s, 1),
            "functions": linear_functions(calls),
            "layers": [{slot: [c.meta() for c in slot_calls] for slot, slot_calls in layer.items()}
                       for layer in calls]}
    write_json(directory / META, meta)
    return meta
