"""`LlamaConfig`: the shape of a Llama-architecture decoder, read from GGUF metadata and validated on creation.

Apart from llama.py so that reading a GGUF (gguf_file.py) needs neither torch nor the model.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

from ..errors import LowbitError


@dataclass(frozen=True)
class LlamaConfig:
    """RMSNorm, rotary (RoPE) grouped-query attention and a SiLU-gated MLP; embeddings tied unless `tie_embeddings`
    is False (then the GGUF has its own output.weight)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    context_length: int
    rope_theta: float
    rms_norm_eps: float
    tie_embeddings: bool = True

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if f.type == "int" and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise LowbitError(f"Llama config: {f.name} must be a positive integer, got {value!r}")
        if not (self.rope_theta > 0 and self.rms_norm_eps > 0):
            raise LowbitError(f"Llama config: rope_theta ({self.rope_theta}) and rms_norm_eps ({self.rms_norm_eps}) "
                              "must be positive")
        if self.hidden_size % self.num_heads:
            raise LowbitError(f"Llama config: hidden_size {self.hidden_size} is not a multiple of num_heads "
                              f"{self.num_heads}")
        if self.num_heads % self.num_kv_heads:
            raise LowbitError(f"Llama config: num_heads {self.num_heads} is not a multiple of num_kv_heads "
                              f"{self.num_kv_heads} (grouped-query attention shares each KV head among query heads)")
        if self.head_dim % 2:
            raise LowbitError(f"Llama config: head_dim {self.head_dim} is odd; rotary embeddings rotate pairs")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def kv_dim(self) -> int:
        return self.num_kv_heads * self.head_dim

    @classmethod
    def from_gguf_metadata(cls, metadata: Mapping[str, Any], vocab_size: int, tie_embeddings: bool,
                           where: str) -> LlamaConfig:
        """The config from a GGUF's ``llama.*`` keys; `where` (the file) names the source in errors.

        Required keys are those llama.cpp needs for this architecture; a missing one is a LowbitError listing
        every missing key. Features lowbit does not model (partial rotary, RoPE scaling) are refused by name.
        """
        arch = "llama"
        keys = {"hidden_size": "embedding_length", "intermediate_size": "feed_forward_length",
                "num_layers": "block_count", "num_heads": "attention.head_count",
                "num_kv_heads": "attention.head_count_kv", "context_length": "context_length",
                "rope_theta": "rope.freq_base", "rms_norm_eps": "attention.layer_norm_rms_epsilon"}
        missing = [f"{arch}.{k}" for k in keys.values() if f"{arch}.{k}" not in metadata]
        if missing:
            raise LowbitError(f"{where}: GGUF metadata lacks {', '.join(missing)}; a Llama checkpoint needs them "
                              "(re-convert it with llama.cpp's convert_hf_to_gguf.py)")
        values = {name: metadata[f"{arch}.{key}"] for name, key in keys.items()}
        try:
            for name in ("hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads",
                         "context_length"):
                values[name] = int(values[name])
            values["rope_theta"] = float(values["rope_theta"])
            values["rms_norm_eps"] = float(values["rms_norm_eps"])
        except (TypeError, ValueError) as e:
            raise LowbitError(f"{where}: a numeric Llama metadata value is not a number: {e}") from e
        declared = metadata.get(f"{arch}.vocab_size")
        if declared is not None and int(declared) != vocab_size:
            raise LowbitError(f"{where}: {arch}.vocab_size is {declared} but the tokenizer has {vocab_size} tokens")
        config = cls(vocab_size=vocab_size, tie_embeddings=tie_embeddings, **values)
        rope_dims = metadata.get(f"{arch}.rope.dimension_count")
        if rope_dims is not None and int(rope_dims) != config.head_dim:
            raise LowbitError(f"{where}: {arch}.rope.dimension_count is {rope_dims}, not the head size "
                              f"{config.head_dim}; partial rotary embeddings are not supported")
        scaling = metadata.get(f"{arch}.rope.scaling.type")
        if scaling not in (None, "none"):
            raise LowbitError(f"{where}: RoPE scaling {scaling!r} is not supported (lowbit models plain RoPE)")
        return config
