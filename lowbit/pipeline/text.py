"""Text models in the pipeline: which MODEL is one, its sentences, and their token ids as named inputs.

A text model is a Hugging Face-style directory of a BERT-family encoder (config.json, model.safetensors,
tokenizer.json), or a zoo model with text (`zoo:minilm_l6`). Its inputs are `input_ids` and `attention_mask`,
int64 [N, seq_len]; seq_len is static per artifact (`--seq-len`). Calibration and held-out text is a text
file with one sentence per line, a list of sentences given in Python, or the zoo's own. A sentence longer
than seq_len tokens is cut, with a warning: the compiled model cannot see more.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import LowbitError
from ..models.minilm import TextEncoder
from ..models.zoo import ZOO_PREFIX, ZooEntry
from ..runtime.tokenizer import TOKENIZER_FILE
from ..text.files import read_sentences
from .data import Inputs, check_disjoint, is_array_file, split_heldout

INPUT_NAMES = ("input_ids", "attention_mask")

# Calibration or held-out text: a file (one sentence per line), or the sentences themselves.
TextData = Path | str | Sequence[str]


@dataclass(frozen=True)
class TextModel:
    """What an artifact of a text model carries beside its graph: the tokenizer.json and the sequence length."""

    directory: Path  # the Hugging Face-style directory the model was loaded from
    seq_len: int
    vocab_size: int  # token ids are below it (the embedding table's rows)

    @property
    def tokenizer(self) -> Path:
        return self.directory / TOKENIZER_FILE

    def to_json(self) -> dict[str, object]:
        return {"tokenizer": TOKENIZER_FILE, "seq_len": self.seq_len, "vocab_size": self.vocab_size,
                "inputs": list(INPUT_NAMES)}


@dataclass(frozen=True)
class Sentences:
    texts: list[str]
    source: str


def text_model_directory(spec: str, entry: ZooEntry | None) -> Path | None:
    """The Hugging Face-style directory MODEL names (a folder, or a zoo text model's); None for other models."""
    if entry is not None:
        return entry.text.directory() if entry.text is not None else None
    path = Path(spec)
    return path if path.is_dir() else None


def _given_sentences(data: object, what: str) -> Sentences:
    if isinstance(data, np.ndarray):
        raise LowbitError(f"the {what} array: a text model takes sentences (a text file with one sentence per line, "
                          "or a list of strings), not an array")
    if isinstance(data, list | tuple):
        bad = [i for i, t in enumerate(data) if not isinstance(t, str)]
        if bad:
            raise LowbitError(f"the {what} sentences: item(s) {bad[:10]} are not strings")
        if not data:
            raise LowbitError(f"the {what} sentences: the list is empty; give at least one sentence")
        return Sentences(list(data), f"{len(data)} {what} sentences given in Python")
    path = Path(data)  # type: ignore[arg-type]
    if path.is_dir() or is_array_file(path):
        kind = "a folder" if path.is_dir() else "an array file"
        raise LowbitError(f"{path}: is {kind}, but a text model takes {what} text: a .txt file with one sentence "
                          "per line")
    texts = read_sentences(path, what)
    return Sentences(texts, f"{len(texts)} sentences in {path}")


def read_text_data(model: str, calib: TextData | None, heldout: TextData | None, entry: ZooEntry | None,
                   seed: int) -> tuple[Sentences, Sentences | None]:
    """Calibration and held-out sentences (None: split off the calibration text), before any tokenizing."""
    if calib is not None:
        calib_text = _given_sentences(calib, "calibration")
    elif entry is not None and entry.text is not None:
        calib_text = Sentences(entry.text.calibration(seed), f"{ZOO_PREFIX}{entry.name} calibration text, seed {seed}")
    else:
        raise LowbitError(f"{model}: calibration text is needed for a model outside the zoo: pass --calib FILE.txt "
                          "(one sentence per line)")
    heldout_text = None
    if heldout is not None:
        heldout_text = _given_sentences(heldout, "held-out")
    elif entry is not None and entry.text is not None:
        heldout_text = Sentences(entry.text.heldout(seed), f"{ZOO_PREFIX}{entry.name} held-out text, seed {seed}")
    if isinstance(calib, str | Path) and isinstance(heldout, str | Path) \
            and Path(calib).resolve() == Path(heldout).resolve():
        raise LowbitError(f"--calib and --eval are the same ({heldout}); held-out text must be disjoint from "
                          "calibration")
    return calib_text, heldout_text


def tokenize(encoder: TextEncoder, sentences: Sentences, warn: Callable[[str], None]) -> Inputs:
    """Sentences as `input_ids` and `attention_mask` at the encoder's seq_len; `warn` hears of truncation."""
    tokens = encoder.tokenizer.encode(sentences.texts, warn=lambda message: warn(f"{sentences.source}: {message}"))
    return Inputs({"input_ids": tokens.input_ids, "attention_mask": tokens.attention_mask}, sentences.source,
                  texts=tuple(sentences.texts))


def tokenize_text_data(encoder: TextEncoder, calib: Sentences, heldout: Sentences | None,
                       warn: Callable[[str], None]) -> tuple[Inputs, Inputs]:
    """Calibration and held-out inputs, disjoint (the last 20% of the calibration text when no held-out text)."""
    calib_inputs = tokenize(encoder, calib, warn)
    if heldout is None:
        return split_heldout(calib_inputs)
    heldout_inputs = tokenize(encoder, heldout, warn)
    check_disjoint(calib_inputs, heldout_inputs)
    return calib_inputs, heldout_inputs
