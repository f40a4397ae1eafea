"""A decoder LLM's TVM library: the kernels of one decode step (M = 1) and of a prefill chunk (M = CHUNK rows),
compiled into ``decoder.so``, and its weights packed into the kernels' layouts (``decoder_tvm.safetensors``).

`lowbit.runtime.decoder_tvm.TvmDecoder` calls the kernels layer by layer (a Python loop over preallocated
buffers, 9 calls per layer; see there). Per layer at M rows:

    norm -> qkv (int4 GEMV, q|k|v fused, N = (heads + 2 kv_heads) head_dim) -> rope_cache (q to Q, k and v into
    the cache) -> attention -> o (int4, adds into the residual) -> norm -> gate_up (int4, N = 2 intermediate)
    -> silu -> down (int4, adds into the residual)

then the final norm of the last row and the LM head (int8 group-wise GEMV, the tied embedding's format).
Functions are named `<kernel>_<M>`. Only int4 block linears and an int8 embedding have kernels here; other
formats run on the numpy runtime (`supports` says which).
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
from .target import parse_target, required_features, target_string
from .x86.decoder_ops import KEYS, attention_func, rmsnorm_func, rope_cache_func, silu_mul_func
from .x86.gemv_int4 import Int4GemvPlan, gemv_int4_func
from .x86.gemv_int8 import Int8GemvPlan, gemv_int8_func, pack_int8_gemv
from .x86.int4_groups import pack_int4_gemv

CHUNK = 32  # prefill rows per call: a multiple of the GEMM's 4-row register tile
LINEAR_BITS, EMBEDDING_BITS = 4, 8
PROJECTIONS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
               "mlp.up_proj", "mlp.down_proj")


@dataclass(frozen=True)
class DecoderShapes:
    """What the kernels are compiled for: the model's dimensions, the linears' group, rows per prefill call."""

    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    vocab: int
    context: int
    eps: float
    group: int
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
    linears = [weights.get(f"layers.{i}.{p}.weight") for i in range(layers) for p in PROJECTIONS]
    if any(w is None for w in linears):
        return "some block linears are not group-wise integers"
    if not all(isinstance(w, GroupWiseWeights) for w in linears):
        return "the block linears are vector-quantized (no TVM VQ kernels yet)"
    embedding = weights.get("embed_tokens.weight")
    if embedding is None or embedding.bits != EMBEDDING_BITS or not config["tie_embeddings"]:
        return f"the TVM path needs a tied {EMBEDDING_BITS}-bit group-wise embedding / LM head"
    formats = {(w.bits, w.group) for w in linears}
    if len(formats) != 1 or next(iter(formats))[0] != LINEAR_BITS:
        return f"the TVM kernels cover int{LINEAR_BITS} block linears of one group size, not {sorted(formats)}"
    hidden, heads = int(config["hidden_size"]), int(config["num_heads"])
    if hidden % 8 or int(config["intermediate_size"]) % 8 or hidden % heads or (hidden // heads) % 8 \
            or heads % int(config["num_kv_heads"]) or next(iter(formats))[1] % 8:
        return "the TVM kernels need hidden, intermediate and head sizes and the group in multiples of 8"
    if int(config["context_length"]) % KEYS:
        return f"the TVM attention kernel needs a context length that is a multiple of {KEYS}"
    return None


def decoder_shapes(config: dict[str, Any], group: int, embedding_group: int, threads: int,
                   chunk: int = CHUNK) -> DecoderShapes:
    return DecoderShapes(int(config["hidden_size"]), int(config["intermediate_size"]), int(config["num_heads"]),
                         int(config["num_kv_heads"]), int(config["vocab_size"]), int(config["context_length"]),
                         float(config["rms_norm_eps"]), group, embedding_group, chunk, threads)


def decoder_module(s: DecoderShapes) -> tvm.IRModule:
    """Every kernel of a decode step (M = 1) and a prefill chunk (M = s.chunk), named `<kernel>_<M>`."""
    funcs = {"lm_head": gemv_int8_func(Int8GemvPlan.of(1, s.hidden, s.vocab_padded, s.embedding_group, s.threads))}
    for m in sorted({1, s.chunk}):
        def int4(k: int, n: int, accumulate: bool = False, m: int = m) -> Any:
            return gemv_int4_func(Int4GemvPlan.of(m, k, n, s.group, s.threads, accumulate=accumulate))

        funcs.update({
            f"norm_{m}": rmsnorm_func(m, m, s.hidden, s.eps),
            f"final_norm_{m}": rmsnorm_func(m, 1, s.hidden, s.eps),
            f"qkv_{m}": int4(s.hidden, s.qkv),
            f"rope_cache_{m}": rope_cache_func(m, s.heads, s.kv_heads, s.head_dim, s.context),
            f"attention_{m}": attention_func(m, s.heads, s.kv_heads, s.head_dim, s.context, s.threads),
            f"o_{m}": int4(s.hidden, s.hidden, accumulate=True),
            f"gate_up_{m}": int4(s.hidden, 2 * s.intermediate),
            f"silu_{m}": silu_mul_func(m, s.intermediate),
            f"down_{m}": int4(s.intermediate, s.hidden, accumulate=True),
        })
    return tvm.IRModule({name: f.with_attr("global_symbol", name) for name, f in funcs.items()})


def _rows(*weights: GroupWiseWeights) -> dict[str, np.ndarray]:
    """The int4 kernel's operands for the weights' rows stacked (one GEMV computes them all)."""
    values, scale = np.concatenate([w.values for w in weights]), np.concatenate([w.scale for w in weights])
    if any(w.float_minimum for w in weights):
        offset = np.concatenate([w.offset for w in weights])
        packed = pack_int4_gemv(values, scale, None, weights[0].group, offset=offset)
    else:
        packed = pack_int4_gemv(values, scale, np.concatenate([w.zero for w in weights]), weights[0].group)
    return {"w": packed.w, "scale": packed.scale, "neg_zs": packed.neg_zs}


def pack_decoder(config: dict[str, Any], weights: dict[str, GroupWiseWeights],
                 tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The packed arrays the runtime feeds the kernels, named `layers.<i>.<qkv|o|gate_up|down>.<operand>`,
    `lm_head.<operand>` and the RMSNorm gains under their parameter names."""
    out: dict[str, np.ndarray] = {}
    for i in range(int(config["num_layers"])):
        w = {p: weights[f"layers.{i}.{p}.weight"] for p in PROJECTIONS}
        groups = {"qkv": _rows(w["self_attn.q_proj"], w["self_attn.k_proj"], w["self_attn.v_proj"]),
                  "o": _rows(w["self_attn.o_proj"]), "gate_up": _rows(w["mlp.gate_proj"], w["mlp.up_proj"]),
                  "down": _rows(w["mlp.down_proj"])}
        out.update({f"layers.{i}.{name}.{k}": a for name, ops in groups.items() for k, a in ops.items()})
        for norm in ("input_layernorm.weight", "post_attention_layernorm.weight"):
            out[f"layers.{i}.{norm}"] = tensors[f"layers.{i}.{norm}"]
    e = weights["embed_tokens.weight"]
    pad = ((0, -len(e.values) % 8), (0, 0))  # zero rows (scale 0): logits the runtime drops
    head = pack_int8_gemv(np.pad(e.values, pad), np.pad(e.scale, pad), np.pad(e.zero, pad), e.group)
    out.update({"lm_head.w": head.w, "lm_head.scale": head.scale, "lm_head.neg_zs": head.neg_zs,
                "norm.weight": tensors["norm.weight"]})
    return {k: np.ascontiguousarray(v) for k, v in out.items()}


def build_decoder_library(directory: Path, config: dict[str, Any], weights: dict[str, GroupWiseWeights],
                          tensors: dict[str, np.ndarray], target_spec: str = "llvm -mcpu=native",
                          chunk: int = CHUNK) -> dict[str, Any]:
    """Compile the kernels for `target_spec` and pack the weights into `directory` (LIBRARY, PACKED, META);
    returns META's content. LowbitError if the formats have no kernels (`supports`)."""
    from safetensors.numpy import save_file

    why = supports(config, weights)
    if why:
        raise LowbitError(f"no TVM decode kernels for this decoder: {why}; run it with the numpy runtime")
    target = parse_target(target_spec)
    linear = weights["layers.0.self_attn.q_proj.weight"]
    shapes = decoder_shapes(config, linear.group, weights["embed_tokens.weight"].group, int(target["num-cores"]),
                            chunk)
    start = time.perf_counter()
    tvm.compile(decoder_module(shapes), target=tvm.target.Target(target)).export_library(str(directory / LIBRARY))
    compile_s = time.perf_counter() - start
    save_file(pack_decoder(config, weights, tensors), str(directory / PACKED))
    meta = {"format": TVM_DECODER_FORMAT, "tvm_version": tvm.__version__, "target": target,
            "target_string": target_string(target), "required_features": required_features(target),
            "shapes": dataclasses.asdict(shapes), "compile_s": round(compile_s, 1)}
    write_json(directory / META, meta)
    return meta
