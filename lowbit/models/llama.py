"""lowbit's Llama decoder: RMSNorm, rotary grouped-query attention, SiLU-gated MLP, tied LM head; a KV cache.

`LlamaDecoder.forward(input_ids, cache=None)` is a causal prefill without a cache; with a `KVCache` the new tokens
are appended to it and attend over everything cached (incremental decoding). Both give the same logits for the
same tokens (tests/test_llama.py checks prefill against token-by-token decoding).

Weights come from a GGUF (`load_llama_gguf`), dequantized to float32. Rotary layout: llama.cpp's converter permutes
the rows of q and k so that dimensions 2i and 2i+1 of each head form a rotating pair (ggml's "normal" RoPE), not
i and i + head_dim/2 as in Hugging Face's rotate_half. The weights are kept as stored and `apply_rope` rotates
adjacent pairs, so the two layouts give identical attention scores (the tests compare with a rotate_half reference
on un-permuted weights).

Module names follow Hugging Face's Llama (embed_tokens, layers.N.self_attn.q_proj, ..., mlp.down_proj, norm,
lm_head) so that the quantizer sees ordinary nn.Linear layers; lm_head shares its weight with embed_tokens.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from ..errors import LowbitError
from ..quantizer.weight_smoothing import SmoothFold, gqa_channels
from ..runtime.bpe_tokenizer import BpeTokenizer
from .gguf_file import GgufCheckpoint, read_gguf
from .llama_config import LlamaConfig

__all__ = ["KVCache", "LlamaConfig", "LlamaDecoder", "LoadedDecoder", "apply_rope", "decoder_logits_fn",
           "load_gguf_weights", "load_llama_gguf"]


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def rope_tables(length: int, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of position * theta^(-2i/head_dim), float64 [length, head_dim/2] (rounded once, on use)."""
    inv_freq = theta ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    angles = torch.arange(length, dtype=torch.float64)[:, None] * inv_freq[None, :]
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent pairs (x[2i], x[2i+1]) of x [..., t, head_dim] by the angles of cos/sin [t, head_dim/2]."""
    pairs = x.unflatten(-1, (-1, 2))
    x0, x1 = pairs[..., 0], pairs[..., 1]
    return torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1).flatten(-2)


class KVCache:
    """Keys and values of every layer for the tokens seen so far, [batch, kv_heads, length, head_dim] each.

    `LlamaDecoder.forward` appends to it; `length` counts the cached positions (the next token's position).
    """

    def __init__(self, config: LlamaConfig, batch: int = 1) -> None:
        self.config = config
        self.batch = batch
        self.keys: list[torch.Tensor | None] = [None] * config.num_layers
        self.values: list[torch.Tensor | None] = [None] * config.num_layers
        self.length = 0

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append this step's k, v for `layer`; return all cached keys and values of that layer."""
        old_k, old_v = self.keys[layer], self.values[layer]
        if old_k is not None and old_v is not None:
            k, v = torch.cat((old_k, k), dim=2), torch.cat((old_v, v), dim=2)
        self.keys[layer], self.values[layer] = k, v
        return k, v


class Attention(nn.Module):
    def __init__(self, config: LlamaConfig, index: int) -> None:
        super().__init__()
        self.index = index
        self.num_heads, self.num_kv_heads, self.head_dim = config.num_heads, config.num_kv_heads, config.head_dim
        h = config.hidden_size
        self.q_proj = nn.Linear(h, h, bias=False)
        self.k_proj = nn.Linear(h, config.kv_dim, bias=False)
        self.v_proj = nn.Linear(h, config.kv_dim, bias=False)
        self.o_proj = nn.Linear(h, h, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, past: int,
                cache: KVCache | None) -> torch.Tensor:
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(self.index, k, v)
        # Grouped-query: query head h reads KV head h // (num_heads / num_kv_heads), as llama.cpp and HF do.
        group = self.num_heads // self.num_kv_heads
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        scores = (q @ k.transpose(-1, -2)) * self.head_dim ** -0.5
        total = k.shape[2]
        # Query i sits at position past + i and sees keys 0..past + i.
        future = torch.arange(total, device=x.device)[None, :] > torch.arange(past, past + t, device=x.device)[:, None]
        scores = scores.masked_fill(future, float("-inf"))
        out = scores.softmax(dim=-1) @ v
        return self.o_proj(out.transpose(1, 2).reshape(b, t, -1))


class MLP(nn.Module):
    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class LlamaBlock(nn.Module):
    def __init__(self, config: LlamaConfig, index: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, index)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, past: int,
                cache: KVCache | None) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, past, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaDecoder(nn.Module):
    """A Llama decoder; `forward(input_ids [b, t] int64, cache=None)` -> logits [b, t, vocab] in the model's dtype
    (float32 unless cast, e.g. `.double()` for a float64 reference)."""

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(LlamaBlock(config, i) for i in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        cos, sin = rope_tables(config.context_length, config.head_dim, config.rope_theta)
        # float64, not saved: cast to the activations' dtype on use, so .double() gets exact tables.
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    def new_cache(self, batch: int = 1) -> KVCache:
        return KVCache(self.config, batch)

    def forward(self, input_ids: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        if input_ids.dim() != 2 or input_ids.dtype != torch.int64:
            raise LowbitError(f"LlamaDecoder: input_ids must be int64 [batch, tokens], got {input_ids.dtype} "
                              f"{tuple(input_ids.shape)}")
        b, t = input_ids.shape
        past = 0 if cache is None else cache.length
        if cache is not None and (cache.batch != b or cache.config != self.config):
            raise LowbitError(f"LlamaDecoder: the KV cache (batch {cache.batch}) was not made for this input (batch "
                              f"{b}) and model; make one with model.new_cache(batch)")
        if past + t > self.config.context_length:
            raise LowbitError(f"LlamaDecoder: {past} cached + {t} new tokens exceed the context length "
                              f"{self.config.context_length}; shorten the prompt or the text window")
        x = self.embed_tokens(input_ids)
        cos = self.rope_cos[past:past + t].to(x.dtype)
        sin = self.rope_sin[past:past + t].to(x.dtype)
        for layer in self.layers:
            x = layer(x, cos, sin, past, cache)
        if cache is not None:
            cache.length = past + t
        return self.lm_head(self.norm(x))


def smoothing_folds(block: nn.Module) -> list[SmoothFold]:
    """Where a block's linears can be smoothed before rounding (`quantizer.weight_smoothing`): q/k/v's inputs
    into the attention RMSNorm, o_proj's into v_proj's rows (one scale per KV channel, shared by the query heads
    that read it), gate/up's into the MLP RMSNorm, down_proj's into up_proj's rows (silu(gate) * up is linear in
    up). Not q/k's outputs: RoPE mixes channel pairs, so a per-channel scale would not commute with it."""
    if not isinstance(block, LlamaBlock):
        raise LowbitError(f"smoothing_folds: a LlamaBlock was expected, got {type(block).__name__}")
    a, m, i = block.self_attn, block.mlp, block.self_attn.index
    return [SmoothFold(f"layers.{i}.attn_in", (a.q_proj, a.k_proj, a.v_proj), block.input_layernorm),
            SmoothFold(f"layers.{i}.attn_out", (a.o_proj,), a.v_proj,
                       gqa_channels(a.num_heads, a.num_kv_heads, a.head_dim)),
            SmoothFold(f"layers.{i}.mlp_in", (m.gate_proj, m.up_proj), block.post_attention_layernorm),
            SmoothFold(f"layers.{i}.mlp_out", (m.down_proj,), m.up_proj)]


def _block_names(i: int) -> dict[str, str]:
    return {f"blk.{i}.attn_norm.weight": f"layers.{i}.input_layernorm.weight",
            f"blk.{i}.attn_q.weight": f"layers.{i}.self_attn.q_proj.weight",
            f"blk.{i}.attn_k.weight": f"layers.{i}.self_attn.k_proj.weight",
            f"blk.{i}.attn_v.weight": f"layers.{i}.self_attn.v_proj.weight",
            f"blk.{i}.attn_output.weight": f"layers.{i}.self_attn.o_proj.weight",
            f"blk.{i}.ffn_norm.weight": f"layers.{i}.post_attention_layernorm.weight",
            f"blk.{i}.ffn_gate.weight": f"layers.{i}.mlp.gate_proj.weight",
            f"blk.{i}.ffn_up.weight": f"layers.{i}.mlp.up_proj.weight",
            f"blk.{i}.ffn_down.weight": f"layers.{i}.mlp.down_proj.weight"}


def gguf_to_module_names(config: LlamaConfig) -> dict[str, str]:
    """llama.cpp tensor name -> `LlamaDecoder` parameter name."""
    names = {"token_embd.weight": "embed_tokens.weight", "output_norm.weight": "norm.weight"}
    if not config.tie_embeddings:
        names["output.weight"] = "lm_head.weight"
    for i in range(config.num_layers):
        names.update(_block_names(i))
    return names


def load_gguf_weights(model: LlamaDecoder, checkpoint: GgufCheckpoint) -> None:
    """Copy a checkpoint's float32 tensors into `model` (of the same config)."""
    if model.config != checkpoint.config:
        raise LowbitError(f"{checkpoint.path}: the checkpoint's config {checkpoint.config} is not the model's "
                          f"{model.config}")
    params = dict(model.named_parameters())
    with torch.no_grad():
        for gguf_name, module_name in gguf_to_module_names(model.config).items():
            params[module_name].copy_(torch.from_numpy(checkpoint.tensors[gguf_name].copy()))  # copy: read-only array


class LoadedDecoder(NamedTuple):
    """A decoder in eval mode and its tokenizer (unpacks as ``model, tokenizer = load_llama_gguf(path)``)."""

    model: LlamaDecoder
    tokenizer: BpeTokenizer


def load_llama_gguf(path: Path | str) -> LoadedDecoder:
    """The decoder (float32, dequantized weights, eval mode) and tokenizer of a Llama GGUF."""
    checkpoint = read_gguf(path)
    tokenizer = BpeTokenizer(checkpoint.vocabulary)
    model = LlamaDecoder(checkpoint.config)
    load_gguf_weights(model, checkpoint)
    return LoadedDecoder(model.eval(), tokenizer)


def decoder_logits_fn(model: nn.Module) -> Callable[[np.ndarray], np.ndarray]:
    """ids int64 [1, t] -> float32 logits [1, t, vocab] with `model` (no cache, no gradients), for perplexity."""
    def logits(ids: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return model(torch.from_numpy(np.ascontiguousarray(ids, dtype=np.int64))).float().numpy()
    return logits
