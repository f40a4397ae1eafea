"""lowbit's own BERT encoder: a validated config from a Hugging Face config.json, weights from safetensors.

The module keeps Hugging Face's parameter names (``embeddings.word_embeddings.weight``,
``encoder.layer.N.attention.self.query.weight``, ...) so a BERT checkpoint loads with a strict
key and shape check, without depending on `transformers`.

``forward(input_ids, attention_mask)`` returns the mean-pooled sentence embedding (before any
normalization), as sentence-transformers' mean pooling does. It is written with plain ops only
(embedding, slicing, linear, matmul, softmax, layer_norm, erf GELU, add, mul, sum, div) and no
data-dependent control flow, so ``torch.export`` traces it at a static sequence length and the
capture into lowbit's IR can go op by op (the attention mask's chains fuse into the masked softmax
and the masked mean that read it).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import LowbitError

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
SUPPORTED_MODEL_TYPES = ("bert",)
SUPPORTED_ACTIVATIONS = ("gelu",)  # Hugging Face's "gelu" is the exact erf form, which I-BERT approximates
SUPPORTED_POSITION_EMBEDDINGS = ("absolute",)
# Checkpoint keys that the encoder does not use: HF's position-id buffer (positions are 0..seq-1 here)
# and the [CLS] pooler, which mean pooling replaces.
IGNORED_KEYS = ("embeddings.position_ids",)
IGNORED_PREFIXES = ("pooler.",)
# Task-head checkpoints (BertForMaskedLM, ...) nest the encoder under this prefix.
ENCODER_PREFIX = "bert."
# Added to the attention scores of padding keys. exp(-10000) underflows to exactly 0 in float32 and float64
# (anything below about -745 does), so padding gets zero weight; and unlike finfo.min it cannot overflow to -inf
# when added to a score, and stays small enough for an integer add once the graph is quantized.
MASK_BIAS = -10000.0

_INT_KEYS = (
    "vocab_size",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "intermediate_size",
    "max_position_embeddings",
    "type_vocab_size",
)


@dataclass(frozen=True, kw_only=True)
class BertConfig:
    """The shape of a BERT encoder; checked on creation, so a BertConfig always builds a model."""

    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    max_position_embeddings: int
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    hidden_act: str = "gelu"
    position_embedding_type: str = "absolute"

    def __post_init__(self) -> None:
        for key in _INT_KEYS:
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{key} must be a positive integer, got {value!r}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not a multiple of num_attention_heads "
                             f"{self.num_attention_heads}")
        eps = self.layer_norm_eps
        if isinstance(eps, bool) or not isinstance(eps, int | float) or not 0 < eps < 1:
            raise ValueError(f"layer_norm_eps must be a number in (0, 1), got {eps!r}")
        if self.hidden_act not in SUPPORTED_ACTIVATIONS:
            raise ValueError(f"hidden_act {self.hidden_act!r} is not supported; supported: "
                             f"{', '.join(SUPPORTED_ACTIVATIONS)}")
        if self.position_embedding_type not in SUPPORTED_POSITION_EMBEDDINGS:
            raise ValueError(f"position_embedding_type {self.position_embedding_type!r} is not supported; "
                             f"supported: {', '.join(SUPPORTED_POSITION_EMBEDDINGS)}")

    @property
    def head_size(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @classmethod
    def from_dict(cls, raw: dict[str, Any], where: str) -> BertConfig:
        """Build from a parsed config.json; every problem is a LowbitError naming `where` and the key."""
        model_type = raw.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise LowbitError(f"{where}: model_type {model_type!r} is not supported; lowbit's encoder supports "
                              f"model_type {', '.join(map(repr, SUPPORTED_MODEL_TYPES))} (BERT family)")
        architectures = raw.get("architectures", [])
        if not isinstance(architectures, list) or not all(
            isinstance(a, str) and a.startswith("Bert") for a in architectures
        ):
            raise LowbitError(f"{where}: architectures {architectures!r} is not supported; expected BERT "
                              "architectures (BertModel, BertForMaskedLM, ...)")
        for key, bad in (("is_decoder", True), ("add_cross_attention", True)):
            if raw.get(key, False) == bad:
                raise LowbitError(f"{where}: {key} is {bad}; lowbit's BERT is an encoder without cross-attention")
        missing = [key for key in _INT_KEYS if key not in raw]
        if missing:
            raise LowbitError(f"{where}: missing key(s) {', '.join(missing)}; a BERT config.json needs "
                              f"{', '.join(_INT_KEYS)}")
        fields = {key: raw[key] for key in _INT_KEYS}
        for key in ("layer_norm_eps", "hidden_act", "position_embedding_type"):
            if key in raw:
                fields[key] = raw[key]
        try:
            return cls(**fields)
        except ValueError as e:
            raise LowbitError(f"{where}: {e}") from e

    @classmethod
    def from_file(cls, path: Path) -> BertConfig:
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise LowbitError(f"{path}: no such file; a BERT model directory needs its {CONFIG_FILE}") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise LowbitError(f"{path}: not a readable JSON file: {e}") from e
        if not isinstance(raw, dict):
            raise LowbitError(f"{path}: expected a JSON object, got {type(raw).__name__}")
        return cls.from_dict(raw, str(path))


class BertEmbeddings(nn.Module):
    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        seq_len = input_ids.shape[1]
        # Positions 0..seq-1 and token type 0 (single sentences) are constant rows: slices, not lookups.
        x = self.word_embeddings(input_ids) + self.position_embeddings.weight[:seq_len]
        x = x + self.token_type_embeddings.weight[0]
        return self.LayerNorm(x)


class BertSelfAttention(nn.Module):
    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.head_size = config.head_size
        self.query = nn.Linear(config.hidden_size, config.hidden_size)
        self.key = nn.Linear(config.hidden_size, config.hidden_size)
        self.value = nn.Linear(config.hidden_size, config.hidden_size)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        batch, seq, _ = x.shape
        return x.reshape(batch, seq, self.num_heads, self.head_size).transpose(1, 2)

    def forward(self, x: torch.Tensor, mask_bias: torch.Tensor) -> torch.Tensor:
        batch, seq, hidden = x.shape
        q, k, v = self._heads(self.query(x)), self._heads(self.key(x)), self._heads(self.value(x))
        scores = torch.matmul(q, k.transpose(-1, -2)) * (1.0 / math.sqrt(self.head_size))
        probs = torch.softmax(scores + mask_bias, dim=-1)
        return torch.matmul(probs, v).transpose(1, 2).reshape(batch, seq, hidden)


class BertSelfOutput(nn.Module):
    def __init__(self, config: BertConfig, width: int) -> None:
        super().__init__()
        self.dense = nn.Linear(width, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dense(x) + residual)


class BertAttention(nn.Module):
    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.self = BertSelfAttention(config)
        self.output = BertSelfOutput(config, config.hidden_size)

    def forward(self, x: torch.Tensor, mask_bias: torch.Tensor) -> torch.Tensor:
        return self.output(self.self(x, mask_bias), x)


class BertIntermediate(nn.Module):
    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.intermediate_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.dense(x))  # the erf form (approximate="none"), as HF's "gelu"


class BertLayer(nn.Module):
    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.attention = BertAttention(config)
        self.intermediate = BertIntermediate(config)
        self.output = BertSelfOutput(config, config.intermediate_size)

    def forward(self, x: torch.Tensor, mask_bias: torch.Tensor) -> torch.Tensor:
        x = self.attention(x, mask_bias)
        return self.output(self.intermediate(x), x)


class BertEncoderLayers(nn.Module):
    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.layer = nn.ModuleList(BertLayer(config) for _ in range(config.num_hidden_layers))

    def forward(self, x: torch.Tensor, mask_bias: torch.Tensor) -> torch.Tensor:
        for layer in self.layer:
            x = layer(x, mask_bias)
        return x


class BertEncoder(nn.Module):
    """BERT encoder + mean pooling: (input_ids, attention_mask) int64 [batch, seq] -> float32 [batch, hidden]."""

    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.config = config
        self.embeddings = BertEmbeddings(config)
        self.encoder = BertEncoderLayers(config)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        mask = attention_mask.to(torch.float32)
        # [batch, 1, 1, seq]: the same bias for every head and every query row.
        mask_bias = ((1.0 - mask) * MASK_BIAS)[:, None, None, :]
        hidden = self.encoder(self.embeddings(input_ids), mask_bias)
        summed = (hidden * mask[:, :, None]).sum(dim=1)
        # A row of all padding would divide by 0; clamp as sentence-transformers does (its sum is then 0 too).
        count = torch.clamp(mask.sum(dim=1, keepdim=True), min=1e-9)
        return summed / count


def _is_ignored(key: str) -> bool:
    return key in IGNORED_KEYS or key.startswith(IGNORED_PREFIXES)


def load_bert_weights(model: BertEncoder, path: Path) -> None:
    """Load `path` (safetensors) into `model`, checking every key and shape first.

    Keys may carry a ``bert.`` prefix (task-head checkpoints); the pooler and position-id buffer are ignored.
    Any other missing, unexpected or misshaped tensor is a LowbitError that lists them all.
    """
    from safetensors import SafetensorError, safe_open

    if not path.is_file():
        raise LowbitError(f"{path}: no such file; a BERT model directory needs its {WEIGHTS_FILE}")
    try:
        with safe_open(str(path), framework="pt") as f:
            names = list(f.keys())
            renamed = {name.removeprefix(ENCODER_PREFIX): name for name in names}
            expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
            missing = sorted(set(expected) - set(renamed))
            unexpected = sorted(k for k in set(renamed) - set(expected) if not _is_ignored(k))
            shapes = {k: tuple(f.get_slice(renamed[k]).get_shape()) for k in expected if k in renamed}
            wrong = sorted(f"{k} {shapes[k]} (expected {expected[k]})" for k in shapes if shapes[k] != expected[k])
            problems = [f"{label}: {', '.join(items)}" for label, items in
                        (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)) if items]
            if problems:
                raise LowbitError(f"{path}: the weights do not match the BERT encoder of its config.json "
                                  f"({model.config.num_hidden_layers} layers, hidden {model.config.hidden_size}); "
                                  + "; ".join(problems))
            state = {k: f.get_tensor(renamed[k]) for k in expected}
    except (SafetensorError, OSError) as e:
        raise LowbitError(f"{path}: not a valid safetensors file (corrupt or truncated?): {e}") from e
    not_float = sorted(f"{k} ({t.dtype})" for k, t in state.items() if not t.is_floating_point())
    if not_float:
        raise LowbitError(f"{path}: expected floating-point weights; got {', '.join(not_float)}")
    model.load_state_dict({k: t.to(torch.float32) for k, t in state.items()}, strict=True)


def load_bert_encoder(directory: Path) -> BertEncoder:
    """A BERT encoder in eval mode from a Hugging Face-style directory (config.json + model.safetensors)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise LowbitError(f"{directory}: not a directory; expected a Hugging Face-style model directory "
                          f"({CONFIG_FILE}, {WEIGHTS_FILE}, tokenizer.json)")
    config = BertConfig.from_file(directory / CONFIG_FILE)
    model = BertEncoder(config)
    load_bert_weights(model, directory / WEIGHTS_FILE)
    return model.eval()
