"""Read a GGUF checkpoint (llama.cpp's format): validated metadata, float32 (dequantized) tensors and the vocabulary.

gguf_parse.py parses the container; the `gguf` package dequantizes the blocks (Q4_1, Q8_0, ...). Every failure
is a LowbitError naming the file: missing, not GGUF (wrong magic), truncated (the header or a tensor's data runs
past the end), an architecture lowbit does not model, missing metadata keys or tensors, tensors of the wrong
shape, and tensors lowbit would silently ignore.

Tensor names follow llama.cpp: ``token_embd``, ``output_norm``, ``output`` (absent when tied to the embedding) and
``blk.N.{attn_norm, attn_q, attn_k, attn_v, attn_output, ffn_norm, ffn_gate, ffn_up, ffn_down}``. Arrays come out
in PyTorch's layout, [out_features, in_features] for matrices. NOTE: llama.cpp's converter permutes the rows of
attn_q and attn_k for its rotary layout (dimensions 2i and 2i+1 of a head rotate together); they are kept as stored
and `lowbit.models.llama` rotates adjacent pairs to match.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import LowbitError
from ..runtime.bpe_tokenizer import Vocabulary
from .gguf_parse import parse_gguf
from .llama_config import LlamaConfig

SUPPORTED_ARCHITECTURES = ("llama",)


@dataclass(frozen=True)
class GgufCheckpoint:
    """A validated Llama GGUF: its config, float32 tensors by llama.cpp name, vocabulary, and every scalar metadata
    value (arrays such as the token list are left out)."""

    path: Path
    config: LlamaConfig
    tensors: Mapping[str, np.ndarray]
    vocabulary: Vocabulary
    metadata: Mapping[str, Any]
    tensor_types: Mapping[str, str]  # the stored quantization of each tensor (Q4_1, Q8_0, F32, ...)


def _array(metadata: Mapping[str, Any], key: str, path: Path) -> list[Any]:
    if key not in metadata:
        raise LowbitError(f"{path}: GGUF metadata lacks {key}; the decoder's tokenizer needs it")
    value = metadata[key]
    if not isinstance(value, (list, np.ndarray)):
        raise LowbitError(f"{path}: GGUF metadata {key} is not an array")
    return list(value)


def read_vocabulary(metadata: Mapping[str, Any], path: Path) -> Vocabulary:
    """The tokenizer fields (tokenizer.ggml.*) of a GGUF's metadata, validated."""
    missing = [k for k in ("tokenizer.ggml.model", "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id")
               if k not in metadata]
    if missing:
        raise LowbitError(f"{path}: GGUF metadata lacks {', '.join(missing)}; the decoder's tokenizer needs them")
    try:
        return Vocabulary(
            tokens=tuple(_array(metadata, "tokenizer.ggml.tokens", path)),
            merges=tuple(_array(metadata, "tokenizer.ggml.merges", path)),
            token_types=tuple(int(t) for t in _array(metadata, "tokenizer.ggml.token_type", path)),
            bos_id=int(metadata["tokenizer.ggml.bos_token_id"]),
            eos_id=int(metadata["tokenizer.ggml.eos_token_id"]),
            model=str(metadata["tokenizer.ggml.model"]),
            pre=str(metadata.get("tokenizer.ggml.pre", "default")),
            add_bos=bool(metadata.get("tokenizer.ggml.add_bos_token", False)),
        )
    except LowbitError as e:
        raise LowbitError(f"{path}: {e}") from None


def _expected_shapes(config: LlamaConfig) -> dict[str, tuple[int, ...]]:
    h, f, kv = config.hidden_size, config.intermediate_size, config.kv_dim
    shapes: dict[str, tuple[int, ...]] = {"token_embd.weight": (config.vocab_size, h), "output_norm.weight": (h,)}
    if not config.tie_embeddings:
        shapes["output.weight"] = (config.vocab_size, h)
    per_block = {"attn_norm": (h,), "attn_q": (h, h), "attn_k": (kv, h), "attn_v": (kv, h), "attn_output": (h, h),
                 "ffn_norm": (h,), "ffn_gate": (f, h), "ffn_up": (f, h), "ffn_down": (h, f)}
    for i in range(config.num_layers):
        for name, shape in per_block.items():
            shapes[f"blk.{i}.{name}.weight"] = shape
    return shapes


def read_gguf(path: Path | str) -> GgufCheckpoint:
    """Read, validate and dequantize a Llama-architecture GGUF (see the module docstring for what is checked)."""
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    path = Path(path)
    contents = parse_gguf(path)
    metadata = contents.metadata
    arch = metadata.get("general.architecture")
    if arch is None:
        raise LowbitError(f"{path}: GGUF metadata lacks general.architecture; is it a model checkpoint?")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise LowbitError(f"{path}: architecture {arch!r} is not modelled by lowbit; supported: "
                          f"{', '.join(SUPPORTED_ARCHITECTURES)}")
    vocabulary = read_vocabulary(metadata, path)
    by_name = {t.name: t for t in contents.tensors}
    config = LlamaConfig.from_gguf_metadata(metadata, len(vocabulary.tokens), "output.weight" not in by_name,
                                            str(path))
    expected = _expected_shapes(config)
    missing = [n for n in expected if n not in by_name]
    if missing:
        raise LowbitError(f"{path}: GGUF lacks tensor(s) {', '.join(missing[:8])}"
                          f"{' ...' if len(missing) > 8 else ''} for a {config.num_layers}-layer Llama")
    extra = [n for n in by_name if n not in expected]
    if extra:
        raise LowbitError(f"{path}: GGUF has tensor(s) lowbit's Llama does not model ({', '.join(extra[:8])}); "
                          "biases, rope_freqs and other variants are not supported")
    tensors: dict[str, np.ndarray] = {}
    types: dict[str, str] = {}
    for name, shape in expected.items():
        t = by_name[name]
        qtype = GGMLQuantizationType(t.type_id)
        raw = contents.tensor_bytes(t)
        try:
            array = dequantize(raw.reshape(*t.shape[:-1], -1), qtype)
        except NotImplementedError as e:
            raise LowbitError(f"{path}: tensor {name} is stored as {qtype.name}, which the gguf package cannot "
                              f"dequantize ({e})") from e
        array = np.array(array, dtype=np.float32, order="C")  # a copy: F32 tensors are views of the file buffer
        if array.shape != shape:
            raise LowbitError(f"{path}: tensor {name} has shape {array.shape}, expected {shape} from the metadata")
        if not np.isfinite(array).all():
            raise LowbitError(f"{path}: tensor {name} holds NaN or infinite values")
        array.flags.writeable = False
        tensors[name] = array
        types[name] = qtype.name
    scalars = {k: v for k, v in metadata.items() if not isinstance(v, (list, np.ndarray))}
    return GgufCheckpoint(path, config, tensors, vocabulary, scalars, types)
