"""Sentences -> fixed-length token ids, with the `tokenizers` package and a model's tokenizer.json.

Part of the runtime, so it imports neither torch nor any lowbit module outside the runtime: an artifact
carries its tokenizer.json, and `lowbit.runtime` encodes text with just numpy and `tokenizers`.

Every batch is padded to one static ``seq_len`` (a compiled artifact has a fixed sequence length);
longer texts are cut to ``seq_len`` tokens, special tokens included, with a warning that counts them.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import LowbitError

TOKENIZER_FILE = "tokenizer.json"
DEFAULT_SEQ_LEN = 128  # the issue's default; MiniLM-L6's own tokenizer.json also truncates and pads to 128
MIN_SEQ_LEN = 2  # room for [CLS] and [SEP]
_PAD_TOKENS = ("[PAD]", "<pad>")
_INSTALL_HINT = "pip install tokenizers"


@dataclass(frozen=True)
class TokenBatch:
    """``input_ids`` and ``attention_mask``: int64 [batch, seq_len]; ``truncated``: how many texts were cut."""

    input_ids: np.ndarray
    attention_mask: np.ndarray
    truncated: int


def _warn(message: str) -> None:
    warnings.warn(message, UserWarning, stacklevel=3)  # the caller of encode()


class TextTokenizer:
    """A tokenizer.json, set to cut and pad every text to ``seq_len`` tokens."""

    def __init__(self, path: Path | str, seq_len: int = DEFAULT_SEQ_LEN) -> None:
        path = Path(path)
        if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < MIN_SEQ_LEN:
            raise LowbitError(f"seq_len must be an integer >= {MIN_SEQ_LEN}, got {seq_len!r}")
        try:
            from tokenizers import Tokenizer
        except ImportError as e:
            raise LowbitError(f"reading {path} needs the 'tokenizers' package; install it with: {_INSTALL_HINT}") from e
        if not path.is_file():
            raise LowbitError(f"{path}: no such file; a text model needs its {TOKENIZER_FILE} (Hugging Face "
                              f"tokenizers format): put the one of the same checkpoint in {path.parent}")
        try:
            tokenizer = Tokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises a bare Exception for bad JSON or an unknown model type
            raise LowbitError(f"{path}: not a valid {TOKENIZER_FILE} (Hugging Face tokenizers format): {e}") from e
        self.path = path
        self.seq_len = seq_len
        self.pad_id = self._pad_id(tokenizer)
        # The file's own settings (MiniLM's pads to 128) are replaced: padding is done here, to seq_len.
        tokenizer.no_padding()
        tokenizer.enable_truncation(max_length=seq_len)
        self._tokenizer = tokenizer

    @property
    def vocab_size(self) -> int:
        """Number of token ids, added tokens included (every id is below it)."""
        return int(self._tokenizer.get_vocab_size(with_added_tokens=True))

    def _pad_id(self, tokenizer: Any) -> int:
        padding = tokenizer.padding
        if padding is not None:
            return int(padding["pad_id"])
        for token in _PAD_TOKENS:
            token_id = tokenizer.token_to_id(token)
            if token_id is not None:
                return int(token_id)
        raise LowbitError(f"{self.path}: no padding token: the file sets no padding and has none of "
                          f"{', '.join(_PAD_TOKENS)} in its vocabulary")

    def encode(self, texts: Sequence[str], warn: Callable[[str], None] | None = None) -> TokenBatch:
        """Token ids and mask for `texts`, padded to seq_len; `warn` (default: warnings.warn) hears of truncation."""
        if isinstance(texts, str):
            raise LowbitError("expected a list of texts, got a single string; wrap it in a list")
        texts = list(texts)
        if not texts:
            raise LowbitError("no text to encode: the list of sentences is empty")
        bad = [i for i, t in enumerate(texts) if not isinstance(t, str)]
        if bad:
            raise LowbitError(f"texts must be strings; item(s) {bad[:10]} are not "
                              f"(the first is a {type(texts[bad[0]]).__name__})")
        encodings = self._tokenizer.encode_batch(texts)
        input_ids = np.full((len(texts), self.seq_len), self.pad_id, dtype=np.int64)
        attention_mask = np.zeros((len(texts), self.seq_len), dtype=np.int64)
        truncated = 0
        for row, encoding in enumerate(encodings):
            ids = encoding.ids
            input_ids[row, :len(ids)] = ids
            attention_mask[row, :len(ids)] = 1
            truncated += bool(encoding.overflowing)
        if truncated:
            (warn or _warn)(f"{truncated} of {len(texts)} text(s) were longer than seq_len {self.seq_len} tokens "
                            "and were truncated; pass a larger seq_len to keep more of them")
        return TokenBatch(input_ids, attention_mask, truncated)
