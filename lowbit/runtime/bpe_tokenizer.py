"""A decoder's tokenizer from the vocabulary a GGUF file carries (byte-level BPE, ``tokenizer.ggml.model = gpt2``).

Part of the runtime, so it imports neither torch nor any lowbit module outside the runtime: an artifact can carry
the vocabulary (tokens, merges, token types) and rebuild the tokenizer with just `tokenizers`.

The pieces, as llama.cpp and Hugging Face build them for the GPT-2 family:
- model: BPE over the byte-to-unicode alphabet, ranks from the merge list (``"a b"`` strings in the GGUF);
- pre-tokenizer: the ``tokenizer.ggml.pre`` name selects it. ``smollm`` (and ``gpt-2``) split on the GPT-2 regex
  without a prefix space; ``smollm`` first splits every digit on its own;
- special tokens: the tokens of type CONTROL (3) match as whole strings before BPE (``<|im_start|>`` is one id);
  USER_DEFINED (4) tokens too, but as ordinary text on decoding;
- decoder: byte-level, so decode(encode(text)) == text for any text.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import LowbitError

BPE_MODEL = "gpt2"
# tokenizer.ggml.pre -> split digits one by one before the byte-level regex. Add a name here only after checking
# its regex against llama.cpp's (llama-vocab.cpp): a wrong pre-tokenizer silently changes the token stream.
PRE_TOKENIZERS = {"smollm": True, "gpt-2": False}
TOKEN_NORMAL, TOKEN_UNKNOWN, TOKEN_CONTROL, TOKEN_USER_DEFINED, TOKEN_UNUSED, TOKEN_BYTE = 1, 2, 3, 4, 5, 6
_INSTALL_HINT = "pip install tokenizers"


@dataclass(frozen=True)
class Vocabulary:
    """A GGUF's tokenizer fields: tokens (id order), merges ("a b"), token types, bos/eos ids, model and pre names."""

    tokens: tuple[str, ...]
    merges: tuple[str, ...]
    token_types: tuple[int, ...]
    bos_id: int
    eos_id: int
    model: str = BPE_MODEL
    pre: str = "smollm"
    add_bos: bool = False

    def __post_init__(self) -> None:
        n = len(self.tokens)
        if n == 0:
            raise LowbitError("the tokenizer vocabulary is empty")
        if len(self.token_types) != n:
            raise LowbitError(f"the tokenizer has {n} tokens but {len(self.token_types)} token types")
        if len(set(self.tokens)) != n:
            raise LowbitError("the tokenizer vocabulary repeats a token; every token string must be distinct")
        for name in ("bos_id", "eos_id"):
            value = getattr(self, name)
            if not 0 <= value < n:
                raise LowbitError(f"the tokenizer's {name} {value} is outside the vocabulary (0..{n - 1})")
        if self.model != BPE_MODEL:
            raise LowbitError(f"tokenizer model {self.model!r} is not supported; lowbit reads byte-level BPE "
                              f"({BPE_MODEL!r}) vocabularies only")
        if self.pre not in PRE_TOKENIZERS:
            raise LowbitError(f"pre-tokenizer {self.pre!r} is not supported; supported: {', '.join(PRE_TOKENIZERS)}")
        bad = next((m for m in self.merges if len(m.split(" ")) != 2), None)
        if bad is not None:
            raise LowbitError(f"tokenizer merge {bad!r} is not two tokens separated by one space")


class BpeTokenizer:
    """Text <-> token ids for a byte-level BPE `Vocabulary`; no BOS is added unless the vocabulary asks for it."""

    def __init__(self, vocab: Vocabulary) -> None:
        try:
            from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
        except ImportError as e:
            raise LowbitError(f"the decoder's tokenizer needs the 'tokenizers' package: {_INSTALL_HINT}") from e
        self.vocab = vocab
        ids = {token: i for i, token in enumerate(vocab.tokens)}
        merges = [tuple(m.split(" ")) for m in vocab.merges]
        missing = next((m for m in merges if m[0] not in ids or m[1] not in ids or "".join(m) not in ids), None)
        if missing is not None:
            raise LowbitError(f"tokenizer merge {' '.join(missing)!r} names a token that is not in the vocabulary")
        tokenizer = Tokenizer(models.BPE(vocab=ids, merges=merges, fuse_unk=False))
        # use_regex: the GPT-2 split (contractions, letters, digits, punctuation, spaces); no prefix space, as
        # tokenizer.ggml.add_space_prefix is false for these models.
        byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        if PRE_TOKENIZERS[vocab.pre]:
            tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
                [pre_tokenizers.Digits(individual_digits=True), byte_level])
        else:
            tokenizer.pre_tokenizer = byte_level
        tokenizer.decoder = decoders.ByteLevel()
        added = [AddedToken(vocab.tokens[i], special=t == TOKEN_CONTROL, normalized=False)
                 for i, t in enumerate(vocab.token_types) if t in (TOKEN_CONTROL, TOKEN_USER_DEFINED)]
        tokenizer.add_special_tokens([a for a in added if a.special])
        tokenizer.add_tokens([a for a in added if not a.special])
        self._tokenizer: Any = tokenizer
        self.special_ids = frozenset(i for i, t in enumerate(vocab.token_types) if t == TOKEN_CONTROL)

    @property
    def vocab_size(self) -> int:
        return len(self.vocab.tokens)

    @property
    def bos_id(self) -> int:
        return self.vocab.bos_id

    @property
    def eos_id(self) -> int:
        return self.vocab.eos_id

    def token_to_id(self, token: str) -> int | None:
        return self._tokenizer.token_to_id(token)

    def encode(self, text: str) -> np.ndarray:
        """Token ids of `text`, int64 [n]; a BOS first only if the GGUF sets add_bos_token."""
        if not isinstance(text, str):
            raise LowbitError(f"expected a string to tokenize, got a {type(text).__name__}")
        ids = self._tokenizer.encode(text, add_special_tokens=False).ids
        if self.vocab.add_bos:
            ids = [self.vocab.bos_id, *ids]
        return np.asarray(ids, dtype=np.int64)

    def decode(self, ids: Sequence[int] | np.ndarray, skip_special: bool = False) -> str:
        """The text of token ids; control tokens are kept unless `skip_special`."""
        ids = [int(i) for i in np.asarray(ids, dtype=np.int64).reshape(-1)]
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise LowbitError(f"token id(s) {bad[:5]} are outside the vocabulary (0..{self.vocab_size - 1})")
        return self._tokenizer.decode(ids, skip_special_tokens=skip_special)
