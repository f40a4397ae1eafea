"""Windowed perplexity (lowbit.text.perplexity) on models with known answers, and `lowbit eval`'s bad inputs."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from lowbit.cli.main import lowbit
from lowbit.errors import LowbitError
from lowbit.pipeline.progress import Progress
from lowbit.text.perplexity import bootstrap_interval, perplexity, token_nll, window_bounds

VOCAB = 50


def uniform(ids: np.ndarray) -> np.ndarray:
    return np.zeros((*ids.shape, VOCAB), dtype=np.float32)


def test_uniform_model_has_perplexity_vocab() -> None:
    result = perplexity(uniform, np.arange(1000) % VOCAB, window=100)
    assert result.perplexity == pytest.approx(VOCAB, rel=1e-12)
    assert result.windows == 10 and result.tokens == 10 * 99
    assert result.interval == pytest.approx((VOCAB, VOCAB), rel=1e-12)


def test_windows_score_tokens_two_to_n_from_an_empty_context() -> None:
    """A model that predicts "previous + 1" perfectly, except that nothing predicts a window's first token."""
    seen: list[int] = []

    def next_is_plus_one(ids: np.ndarray) -> np.ndarray:
        seen.append(ids.shape[1])
        logits = np.full((*ids.shape, VOCAB), -1e4, dtype=np.float32)
        logits[0, np.arange(ids.shape[1]), (ids[0] + 1) % VOCAB] = 0.0
        return logits

    ids = np.arange(23) % VOCAB
    result = perplexity(next_is_plus_one, ids, window=10)
    assert seen == [10, 10, 3]  # the last, shorter window is kept (>= 2 tokens)
    assert result.tokens == 9 + 9 + 2 and result.window_tokens == (9, 9, 2)
    assert result.perplexity == pytest.approx(1.0, abs=1e-9)
    assert window_bounds(21, 10) == [(0, 10), (10, 20)]  # a last window of one token has nothing to score
    assert window_bounds(23, 10, max_windows=2) == [(0, 10), (10, 20)]


def test_token_nll_is_log_softmax() -> None:
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((7, VOCAB)).astype(np.float32) * 30  # large: needs the max shift
    targets = rng.integers(0, VOCAB, 7)
    x = logits.astype(np.float64)
    expected = -(x[np.arange(7), targets] - np.log(np.exp(x).sum(-1)))
    np.testing.assert_allclose(token_nll(logits, targets), expected, rtol=1e-12)


def test_bootstrap_interval_brackets_the_estimate_and_narrows_with_more_windows() -> None:
    rng = np.random.default_rng(1)
    nll = rng.normal(3.0, 0.3, 200) * 100
    tokens = np.full(200, 100)
    low, high = bootstrap_interval(nll, tokens)
    ppl = np.exp(nll.sum() / tokens.sum())
    assert low < ppl < high
    low10, high10 = bootstrap_interval(nll[:10], tokens[:10])
    assert high10 - low10 > 2 * (high - low)


def test_progress_lines_and_bad_inputs() -> None:
    lines: list[str] = []
    progress = Progress(write=lines.append)
    with progress.steps_of("perplexity") as log:
        perplexity(uniform, np.arange(30) % VOCAB, window=10, log=log)
    assert any("window 3/3" in line for line in lines)
    with pytest.raises(LowbitError, match="window must be an integer >= 2"):
        perplexity(uniform, np.arange(30), window=1)
    with pytest.raises(LowbitError, match="has 1 token"):
        perplexity(uniform, np.arange(1))
    with pytest.raises(LowbitError, match="1-D integer"):
        perplexity(uniform, np.zeros((2, 3), dtype=np.int64))
    with pytest.raises(LowbitError, match=r"logits of shape \(1, 10\)"):
        perplexity(lambda ids: np.zeros(ids.shape), np.arange(30), window=10)
    with pytest.raises(LowbitError, match="non-finite"):
        perplexity(lambda ids: np.full((*ids.shape, VOCAB), np.nan), np.arange(30), window=10)


@pytest.mark.parametrize("content, args, message", [
    (None, [], "missing.txt: no such file"),
    (b"caf\xe9 latin-1", [], "not UTF-8 text"),
    (b"  \n\n ", [], "empty or blank"),
    (b"some text", ["--window", "1"], "window must be an integer >= 2"),
    (b"some text", ["--max-windows", "0"], "max_windows must be at least 1"),
])
def test_eval_cli_bad_text(tmp_path: Path, content: bytes | None, args: list[str], message: str) -> None:
    text = tmp_path / ("missing.txt" if content is None else "t.txt")
    if content is not None:
        text.write_bytes(content)
    # Checked before the model is loaded: this model does not exist, and the text error comes first.
    result = CliRunner().invoke(lowbit, ["eval", str(tmp_path / "none.gguf"), "--text", str(text), *args])
    assert result.exit_code == 2
    assert message in result.stderr and "Traceback" not in result.output


def test_eval_cli_bad_model(tmp_path: Path) -> None:
    text = tmp_path / "t.txt"
    text.write_text("some text", encoding="utf-8")
    cases = {"zoo:small_cnn": "zoo:small_cnn is not a decoder LLM", str(tmp_path): "not a decoder artifact",
             str(text): "not a .gguf file", str(tmp_path / "none.gguf"): "none.gguf: no such file"}
    for model, message in cases.items():
        result = CliRunner().invoke(lowbit, ["eval", model, "--text", str(text)])
        assert result.exit_code == 2, result.output
        assert message in result.stderr


def test_tokenizer_and_perplexity_import_without_torch() -> None:
    """The runtime's decoder tokenizer and the perplexity loop run without torch (a deployed artifact has none)."""
    code = ("import sys, lowbit.runtime.bpe_tokenizer, lowbit.text.perplexity; "
            "assert 'torch' not in sys.modules, 'torch was imported'")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
