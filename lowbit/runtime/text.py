"""Sentences in, embeddings out: a text model's artifact tokenizes with the tokenizer.json it carries.

Part of the runtime (numpy and `tokenizers`; never torch). A text model takes `input_ids` and
`attention_mask`, int64 [batch, seq_len], and returns the mean-pooled embedding, float32 [batch, hidden].
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import LowbitError
from .tokenizer import TOKENIZER_FILE, TextTokenizer

TEXT_INPUTS = ("input_ids", "attention_mask")
EMBEDDING = "embedding"

# Runs the model on one compiled-size batch of token ids and mask, returning its embeddings.
Runner = Callable[[np.ndarray, np.ndarray], np.ndarray]


def is_text_model(inputs: list[dict[str, Any]]) -> bool:
    return sorted(i["name"] for i in inputs) == sorted(TEXT_INPUTS)


def text_tokenizer(artifact: Path, inputs: list[dict[str, Any]], recorded_seq_len: int | None = None) -> TextTokenizer:
    """The artifact's tokenizer.json, cutting and padding to the compiled sequence length.

    The sequence length is the compiled one (input_ids' second dimension); `recorded_seq_len`, the
    manifest's, must agree with it."""
    if not is_text_model(inputs):
        raise LowbitError(f"{artifact}: not a text model (its inputs are {[i['name'] for i in inputs]}, not "
                          f"{' and '.join(TEXT_INPUTS)}); encode() is for sentence encoders, use run()")
    shape = next(i["shape"] for i in inputs if i["name"] == TEXT_INPUTS[0])
    seq_len = int(shape[1])
    if recorded_seq_len is not None and recorded_seq_len != seq_len:
        raise LowbitError(f"{artifact}: the manifest's seq_len {recorded_seq_len} differs from the compiled "
                          f"model's {seq_len}; the artifact was modified: quantize the model again")
    path = artifact / TOKENIZER_FILE
    if not path.is_file():
        raise LowbitError(f"{path}: missing; a text model's artifact carries its {TOKENIZER_FILE}: quantize the "
                          "model again (or copy the model's own tokenizer.json there)")
    return TextTokenizer(path, seq_len)


def encode_texts(run: Runner, tokenizer: TextTokenizer, texts: Sequence[str], batch: int,
                 warn: Callable[[str], None] | None = None) -> np.ndarray:
    """Embeddings of `texts`, float32 [len(texts), hidden], run `batch` sentences at a time.

    The last batch is filled up with copies of its last sentence (an all-padding row would be a
    sentence of no tokens, which the model never saw in calibration); their embeddings are dropped.
    """
    tokens = tokenizer.encode(texts, warn=warn)
    ids, mask = tokens.input_ids, tokens.attention_mask
    n = len(ids)
    fill = -n % batch
    if fill:
        ids = np.concatenate([ids, np.repeat(ids[-1:], fill, axis=0)])
        mask = np.concatenate([mask, np.repeat(mask[-1:], fill, axis=0)])
    parts = [np.asarray(run(ids[i:i + batch], mask[i:i + batch])) for i in range(0, len(ids), batch)]
    out = np.concatenate(parts)[:n]
    if out.ndim != 2 or not np.issubdtype(out.dtype, np.floating):
        raise LowbitError(f"the model returned {out.dtype} of shape {out.shape}; a sentence encoder returns float "
                          "embeddings [batch, hidden]")
    return out.astype(np.float32, copy=False)
