"""Text with human similarity labels, and plain text for calibration, read from gensim's test data.

The gensim 4.4.0 wheel ships ``gensim/test/test_data/``; its folder is found with
``importlib.util.find_spec`` and its files are read as text. gensim itself is never imported.

- Lee-50 (Lee, Pincombe & Welsh 2005): ``lee.cor`` holds 50 short news documents, one per line;
  ``similarities0-1.txt`` is a 50x50 matrix of mean human similarity ratings (0..1), of which
  only the upper triangle is filled (diagonal 1, below it 0): 1225 document pairs.
- WordSim-353 (``wordsim353.tsv``) and SimLex-999 (``simlex999.txt``): ``word1<TAB>word2<TAB>score``
  lines, scores 0..10, after ``#`` comment lines.
- Calibration text: sentences of ``lee_background.cor``, 300 other news documents from the same
  source as Lee-50 (none of the 50 is among them). It is not an evaluation set.
- Held-out text: the 200 movie-review sentences of ``pang_lee_polarity.cor`` (Pang & Lee; the
  ``__label__pos``/``__label__neg`` prefix is dropped). Another source, so disjoint from both.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from ..errors import LowbitError
from ..io import packaged_path

GENSIM_PACKAGE = "gensim"
GENSIM_VERSION = "4.4.0"
_INSTALL_HINT = f"pip install --no-deps {GENSIM_PACKAGE}=={GENSIM_VERSION}"
_TEST_DATA = Path("test") / "test_data"

LEE_DOCUMENTS = "lee.cor"
LEE_SIMILARITIES = "similarities0-1.txt"
LEE_BACKGROUND = "lee_background.cor"
WORDSIM353 = "wordsim353.tsv"
SIMLEX999 = "simlex999.txt"
POLARITY = "pang_lee_polarity.cor"
# The files are not all UTF-8: lee.cor has a cp1252 pound sign, pang_lee_polarity.cor cp1252 dashes and accents.
_ENCODINGS = {LEE_DOCUMENTS: "cp1252", POLARITY: "cp1252"}

LEE_SIZE = 50
LEE_BACKGROUND_DOCUMENTS = 300
POLARITY_SIZE = 200
WORD_PAIR_SIZES = {WORDSIM353: 353, SIMLEX999: 999}
WORD_SCORE_RANGE = (0.0, 10.0)
# Calibration sentences shorter than this many words are mostly datelines and quote fragments.
MIN_CALIBRATION_WORDS = 5
# A sentence ends at . ! or ? (optionally inside a closing quote) followed by space and a capital, digit or quote.
_SENTENCE_END = re.compile(r"(?:(?<=[.!?])|(?<=[.!?][\"']))\s+(?=[\"'A-Z0-9])")
_POLARITY_LABEL = re.compile(r"__label__(pos|neg) ")


def gensim_test_data() -> Path:
    """The folder of gensim's test data; a LowbitError with the install command if gensim is absent."""
    return packaged_path(GENSIM_PACKAGE, _TEST_DATA, "the text evaluation data (only the files of the gensim "
                         "wheel's test data are read)", _INSTALL_HINT)


def _read(name: str, folder: Path | None = None) -> tuple[Path, str]:
    path = (folder or gensim_test_data()) / name
    try:
        return path, path.read_text(encoding=_ENCODINGS.get(name, "utf-8"))
    except FileNotFoundError:
        raise LowbitError(f"{path}: missing; reinstall gensim with: {_INSTALL_HINT} --force-reinstall") from None
    except (OSError, UnicodeDecodeError) as e:
        raise LowbitError(f"{path}: cannot read it as text ({e}); is it the file gensim {GENSIM_VERSION} ships?") from e


def _documents(name: str, expected: int, folder: Path | None) -> tuple[str, ...]:
    path, text = _read(name, folder)
    docs = tuple(line.strip() for line in text.splitlines())
    if len(docs) != expected or not all(docs):
        empty = sum(not d for d in docs)
        raise LowbitError(f"{path}: expected {expected} non-empty documents, one per line; found {len(docs)} "
                          f"lines ({empty} empty). Is it the file gensim {GENSIM_VERSION} ships?")
    return docs


@dataclass(frozen=True)
class Lee50:
    """The 50 documents and their human similarity matrix (upper triangle, 0..1)."""

    documents: tuple[str, ...]
    similarities: np.ndarray

    def pairs(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(i, j, human score) of the 1225 pairs i < j."""
        i, j = np.triu_indices(LEE_SIZE, k=1)
        return i, j, self.similarities[i, j]


def read_lee50(folder: Path | None = None) -> Lee50:
    """Lee-50, validated: 50 documents and a 50x50 upper-triangular matrix, diagonal 1, ratings in [0, 1]."""
    documents = _documents(LEE_DOCUMENTS, LEE_SIZE, folder)
    path, text = _read(LEE_SIMILARITIES, folder)
    try:
        rows = [[float(v) for v in line.split()] for line in text.splitlines() if line.strip()]
        matrix = np.array(rows, dtype=np.float64)
    except ValueError as e:
        raise LowbitError(f"{path}: expected a {LEE_SIZE}x{LEE_SIZE} matrix of numbers: {e}") from e
    if matrix.shape != (LEE_SIZE, LEE_SIZE):
        raise LowbitError(f"{path}: expected a {LEE_SIZE}x{LEE_SIZE} matrix, got rows of lengths "
                          f"{sorted({len(r) for r in rows})} ({len(rows)} rows)")
    upper = matrix[np.triu_indices(LEE_SIZE, k=1)]
    if not (np.all(np.diag(matrix) == 1.0) and np.all(np.tril(matrix, -1) == 0.0)
            and np.all((upper >= 0.0) & (upper <= 1.0))):
        raise LowbitError(f"{path}: expected the upper triangle of a similarity matrix (diagonal 1, zeros below it, "
                          "ratings in [0, 1])")
    matrix.flags.writeable = False
    return Lee50(documents, matrix)


@dataclass(frozen=True)
class WordPairs:
    """A word-similarity set: word pairs and their mean human scores (0..10)."""

    name: str
    first: tuple[str, ...]
    second: tuple[str, ...]
    scores: np.ndarray

    def words(self) -> list[str]:
        """Every distinct word, sorted (each needs one embedding)."""
        return sorted(set(self.first) | set(self.second))


def read_word_pairs(name: str, folder: Path | None = None) -> WordPairs:
    """WordSim-353 (``wordsim353.tsv``) or SimLex-999 (``simlex999.txt``), validated."""
    if name not in WORD_PAIR_SIZES:
        raise LowbitError(f"unknown word-similarity file {name!r}; known: {', '.join(WORD_PAIR_SIZES)}")
    path, text = _read(name, folder)
    first: list[str] = []
    second: list[str] = []
    scores: list[float] = []
    low, high = WORD_SCORE_RANGE
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.startswith("#"):
            continue
        fields = line.split("\t")
        try:
            score = float(fields[2]) if len(fields) == 3 else float("nan")
        except ValueError:
            score = float("nan")
        if not (len(fields) == 3 and fields[0].strip() and fields[1].strip() and low <= score <= high):
            raise LowbitError(f"{path}:{number}: expected 'word1<TAB>word2<TAB>score' with a score in "
                              f"[{low:g}, {high:g}], got {line!r}")
        first.append(fields[0].strip())
        second.append(fields[1].strip())
        scores.append(score)
    if len(scores) != WORD_PAIR_SIZES[name]:
        raise LowbitError(f"{path}: expected {WORD_PAIR_SIZES[name]} word pairs, found {len(scores)}")
    return WordPairs(name, tuple(first), tuple(second), np.array(scores, dtype=np.float64))


def split_sentences(document: str) -> list[str]:
    """Sentences of one document (a plain rule, good enough for news text)."""
    return [s.strip() for s in _SENTENCE_END.split(document) if s.strip()]


def background_documents() -> tuple[str, ...]:
    """The 300 news documents of lee_background.cor, in file order."""
    return _documents(LEE_BACKGROUND, LEE_BACKGROUND_DOCUMENTS, None)


@lru_cache(maxsize=1)
def background_sentences() -> tuple[str, ...]:
    """Every distinct sentence of at least MIN_CALIBRATION_WORDS words in lee_background.cor, in file order."""
    documents = background_documents()
    return tuple(dict.fromkeys(  # dict: drop repeats, keep order
        s for doc in documents for s in split_sentences(doc) if len(s.split()) >= MIN_CALIBRATION_WORDS
    ))


def calibration_sentences(n: int, seed: int = 0) -> list[str]:
    """`n` distinct news sentences from ``lee_background.cor``, chosen by `seed` (the same seed, the same list)."""
    pool = background_sentences()
    if not 1 <= n <= len(pool):
        raise LowbitError(f"asked for {n} calibration sentences; {LEE_BACKGROUND} has {len(pool)}")
    rng = np.random.default_rng(np.random.SeedSequence([seed, 1]))
    return [pool[i] for i in rng.choice(len(pool), n, replace=False)]


@lru_cache(maxsize=1)
def _polarity_sentences() -> tuple[str, ...]:
    path, text = _read(POLARITY)
    lines = [line for line in text.splitlines() if line.strip()]
    bad = [n for n, line in enumerate(lines, 1) if not _POLARITY_LABEL.match(line)]
    if len(lines) != POLARITY_SIZE or bad:
        raise LowbitError(f"{path}: expected {POLARITY_SIZE} lines starting '__label__pos ' or '__label__neg '; "
                          f"found {len(lines)} lines, {len(bad)} without a label")
    return tuple(_POLARITY_LABEL.sub("", line, count=1).strip() for line in lines)


def heldout_sentences(n: int = POLARITY_SIZE, seed: int = 0) -> list[str]:
    """`n` of the 200 movie-review sentences of ``pang_lee_polarity.cor``; all 200 (in file order) by default."""
    pool = _polarity_sentences()
    if not 1 <= n <= len(pool):
        raise LowbitError(f"asked for {n} held-out sentences; {POLARITY} has {len(pool)}")
    if n == len(pool):
        return list(pool)
    rng = np.random.default_rng(np.random.SeedSequence([seed, 2]))
    return [pool[i] for i in sorted(rng.choice(len(pool), n, replace=False))]
