"""`lowbit quantize` of a decoder LLM (weight-only, group-wise) on a tiny GGUF: the artifact, its loader, the CLI.

The tiny GGUF and its vocabulary come from test_llama.py; the quantize path reports on zoo:smollm2_135m's
evaluation texts and calibrates on its calibration text (files of the gensim wheel), in 64-token windows.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.numpy import load_file
from test_llama import tiny_vocabulary, write_gguf  # pytest puts tests/ on the path (no package there)

from lowbit.cli.main import lowbit
from lowbit.errors import LowbitError
from lowbit.ir.groupwise_weights import GroupWiseWeights
from lowbit.models.llama import load_llama_gguf
from lowbit.pipeline.decoder import (
    EMBEDDING,
    MANIFEST,
    WEIGHTS_FILE,
    calibration_windows,
    leading_tokens,
    load_decoder_artifact,
    round_decoder,
)
from lowbit.quantizer.weight_only import WeightOnlyConfig
from lowbit.runtime import DecoderModel, load
from lowbit.runtime.bpe_tokenizer import BpeTokenizer

CALIBRATION = "The quick brown fox jumps over the lazy dog. " * 40
try:
    import tvm  # noqa: F401

    TVM = True
except ImportError:
    TVM = False


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    write_gguf(path)
    return path


@pytest.fixture(scope="module")
def artifact(tiny_gguf: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    calib = tmp_path_factory.mktemp("text") / "calib.txt"
    calib.write_text(CALIBRATION)
    out = tmp_path_factory.mktemp("out") / "tiny-int4"
    result = CliRunner().invoke(lowbit, ["quantize", str(tiny_gguf), "-o", str(out), "--weights", "int4",
                                         "--group", "16", "--rounding", "gptq", "--calib", str(calib)])
    assert result.exit_code == 0, result.output
    return out


def test_artifact_holds_the_rounded_model(tiny_gguf: Path, artifact: Path) -> None:
    manifest = json.loads((artifact / MANIFEST).read_text())
    assert manifest["kind"] == "decoder" and manifest["weights"]["bits"] == 4 and manifest["weights"]["group"] == 16
    assert manifest["weights"]["rounding"] == "gptq" and manifest["weights"]["act_order"]
    assert manifest["weights"]["smooth"]  # the decoder default
    report = json.loads((artifact / "report.json").read_text())
    assert set(report["perplexity"]) == {"lee", "enwiki"}
    assert len(report["smoothing"]["folds"]) == 4 * 2  # four folds per block, two blocks
    assert all(np.isfinite(p["ratio"]) for p in report["perplexity"].values())
    # The same rounding applied here gives the same model the artifact loads, logits bit for bit.
    model, tokenizer = load_llama_gguf(tiny_gguf)
    config = WeightOnlyConfig(bits=4, group=16, rounding="gptq", act_order=True, smooth=True)
    weights = round_decoder(model, tokenizer, config, CALIBRATION, window=model.config.context_length)
    loaded, loaded_tokenizer = load_decoder_artifact(artifact)
    ids = torch.from_numpy(tokenizer.encode("the cat sat on the mat, then the dog")[None, :])
    with torch.inference_mode():
        assert torch.equal(model(ids), loaded(ids))
    assert loaded_tokenizer.encode("some text 123").tolist() == tokenizer.encode("some text 123").tolist()
    assert weights[EMBEDDING].bits == 8
    # Every block linear is stored group-wise, and nothing else is.
    assert {k for k in weights if k != EMBEDDING} == {f"{n}.weight" for n, m in model.layers.named_modules(
        prefix="layers") if isinstance(m, torch.nn.Linear)}
    assert all(isinstance(w, GroupWiseWeights) and w.bits == 4 for k, w in weights.items() if k != EMBEDDING)


def test_eval_reads_an_artifact(artifact: Path, tmp_path: Path) -> None:
    text = tmp_path / "text.txt"
    text.write_text("The rain in Spain stays mainly in the plain. " * 10)
    result = CliRunner().invoke(lowbit, ["eval", str(artifact), "--text", str(text), "--window", "32"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.output[result.output.index("{"):])
    assert out["windows"] >= 2 and np.isfinite(out["perplexity"])


def test_tampered_artifact_is_refused(artifact: Path, tmp_path: Path) -> None:
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(artifact, copy)
    data = bytearray((copy / WEIGHTS_FILE).read_bytes())
    data[-1] ^= 0xFF
    (copy / WEIGHTS_FILE).write_bytes(bytes(data))
    with pytest.raises(LowbitError, match="sha256 mismatch"):
        load_decoder_artifact(copy)
    with pytest.raises(LowbitError, match="not a decoder artifact"):
        load_decoder_artifact(tmp_path)


def test_bad_options_are_refused(tiny_gguf: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    result = runner.invoke(lowbit, ["quantize", str(tiny_gguf), "-o", str(tmp_path / "a"), "--seq-len", "32"])
    assert result.exit_code != 0 and "--seq-len" in result.output and "weight-only" in result.output
    result = runner.invoke(lowbit, ["quantize", "zoo:small_cnn", "-o", str(tmp_path / "b"), "--weights", "int4"])
    assert result.exit_code != 0 and "decoder LLMs" in result.output
    result = runner.invoke(lowbit, ["quantize", str(tiny_gguf), "-o", str(tmp_path / "c"), "--weights", "int5"])
    assert result.exit_code != 0
    result = runner.invoke(lowbit, ["quantize", str(tiny_gguf), "-o", str(tmp_path / "d"), "--smooth", "0.5"])
    assert result.exit_code != 0 and "auto or none" in result.output
    result = runner.invoke(lowbit, ["quantize", "zoo:small_cnn", "-o", str(tmp_path / "e"), "--zero-point", "float"])
    assert result.exit_code != 0 and "decoder LLMs" in result.output
    assert not any(tmp_path.iterdir())  # nothing written half-way


def test_calibration_windows() -> None:
    tokenizer = BpeTokenizer(tiny_vocabulary())
    windows = calibration_windows(tokenizer, CALIBRATION, windows=3, window=50)
    assert len(windows) == 3 and all(w.shape == (1, 50) and w.dtype == torch.int64 for w in windows)
    assert len(calibration_windows(tokenizer, "a short text", window=512)) == 1
    with pytest.raises(LowbitError, match="calibration text has 1 token"):
        calibration_windows(tokenizer, "a")


def test_numpy_runtime_matches_the_torch_model(artifact: Path) -> None:
    runtime = load(artifact, backend="numpy")
    assert isinstance(runtime, DecoderModel)
    model, tokenizer = load_decoder_artifact(artifact)
    ids = tokenizer.encode("the theme of the thin thing")
    with torch.inference_mode():
        expected = model(torch.from_numpy(ids[None, :]))[0].numpy()
    got = runtime.logits(ids)
    assert np.abs(got - expected).max() <= 1e-4 * np.abs(expected).max()
    # Prefill, then one token at a time through the KV cache: the same logits.
    cache = runtime.new_cache()
    steps = [runtime.logits(ids[:5], cache)] + [runtime.logits(ids[i:i + 1], cache) for i in range(5, len(ids))]
    np.testing.assert_allclose(np.concatenate(steps), got, rtol=0, atol=1e-4 * np.abs(got).max())


def test_float_minimum_artifact_runs_in_the_runtime(tiny_gguf: Path, tmp_path: Path) -> None:
    out = tmp_path / "fmin"
    result = CliRunner().invoke(lowbit, ["quantize", str(tiny_gguf), "-o", str(out), "--weights", "int4", "--group",
                                         "16", "--rounding", "nearest", "--zero-point", "float"])
    assert result.exit_code == 0, result.output
    arrays = load_file(str(out / WEIGHTS_FILE))
    assert "layers.0.mlp.up_proj.weight.mins" in arrays and "layers.0.mlp.up_proj.weight.qzeros" not in arrays
    report = json.loads((out / "report.json").read_text())
    assert "float min" in report["weights"]
    if TVM:  # the int4 kernel takes the float minimums as its per-group offsets; checked at build time
        from lowbit.pipeline.decoder import TVM_TOLERANCE

        assert report["tvm"]["check"]["relative"] <= TVM_TOLERANCE
    model, tokenizer = load_decoder_artifact(out)
    ids = tokenizer.encode("the theme of the thin thing")
    with torch.inference_mode():
        expected = model(torch.from_numpy(ids[None, :]))[0].numpy()
    got = load(out, backend="numpy").logits(ids)
    assert np.abs(got - expected).max() <= 1e-4 * np.abs(expected).max()


def test_generate(artifact: Path) -> None:
    runtime = load(artifact)
    assert runtime.backend == ("tvm" if TVM else "numpy")  # the artifact has TVM kernels where TVM is installed
    pieces: list[str] = []
    greedy = runtime.generate("the", max_new_tokens=8, stream=pieces.append)
    assert "".join(pieces) == greedy.text and 1 <= len(greedy.token_ids) <= 8
    assert greedy.token_ids == runtime.generate("the", max_new_tokens=8).token_ids
    # Greedy continues with the argmax of the logits after the prompt.
    numpy_runtime = load(artifact, backend="numpy")
    assert greedy.token_ids[0] == int(np.argmax(numpy_runtime.logits(runtime.tokenizer.encode("the"))[-1]))
    a = runtime.generate("the", max_new_tokens=8, temperature=1.0, top_p=0.9, seed=3)
    assert a.token_ids == runtime.generate("the", max_new_tokens=8, temperature=1.0, top_p=0.9, seed=3).token_ids
    with pytest.raises(LowbitError, match="exceeds the context length"):
        runtime.generate("the " * 40, max_new_tokens=30)
    result = CliRunner().invoke(lowbit, ["generate", str(artifact), "--prompt", "the", "--max-new-tokens", "4"])
    assert result.exit_code == 0, result.output
    assert "tokens/s" in result.output


def test_leading_tokens_are_those_of_the_whole_text() -> None:
    tokenizer = BpeTokenizer(tiny_vocabulary())
    text = "the thin theme, then 12345 things. " * 200
    whole = tokenizer.encode(text)
    for n in (1, 50, 700):
        assert leading_tokens(tokenizer, text, n).tolist() == whole[:n].tolist()
    assert leading_tokens(tokenizer, text, 10**6).tolist() == whole.tolist()


@pytest.mark.skipif(not TVM, reason="the TVM decode kernels need apache-tvm")
def test_tvm_runtime_matches_the_numpy_runtime(artifact: Path) -> None:
    """A prefill of one 32-row chunk and 6 single rows, then decode steps: the TVM logits against numpy's at
    every position fed (tolerance: the build-time check's, relative to the largest |logit|)."""
    from lowbit.pipeline.decoder import TVM_TOLERANCE
    from lowbit.runtime.decoder_tvm import tvm_decode_runner

    report = json.loads((artifact / "report.json").read_text())
    assert report["tvm"]["check"]["relative"] <= TVM_TOLERANCE and report["tvm"]["chunk"] == 32
    runner = tvm_decode_runner(artifact)
    numpy_runtime = load(artifact, backend="numpy")
    ids = np.random.default_rng(1).integers(0, numpy_runtime.config["vocab_size"], 50)
    expected = numpy_runtime.logits(ids)
    got = [runner.prefill(ids[:38])] + [runner.step(int(t)) for t in ids[38:]]
    np.testing.assert_allclose(np.stack(got), expected[37:], rtol=0, atol=TVM_TOLERANCE * np.abs(expected).max())
    again = runner.prefill(ids[:5])  # a new sequence overwrites the cache
    np.testing.assert_allclose(again, expected[4], rtol=0, atol=TVM_TOLERANCE * np.abs(expected).max())
    with pytest.raises(LowbitError, match="exceed the context length"):
        runner.prefill(np.zeros(65, np.int64))


@pytest.mark.skipif(not TVM, reason="the TVM decode kernels need apache-tvm")
def test_tvm_check_refuses_wrong_kernels(artifact: Path, tmp_path: Path) -> None:
    """The build-time check catches kernels that compute something else (here: one layer's packed q/k/v scales
    doubled, the manifest rehashed so that only the check can notice)."""
    import shutil

    from safetensors.numpy import load_file, save_file

    from lowbit.pipeline.artifact import file_hashes
    from lowbit.pipeline.decoder import check_tvm_decoder
    from lowbit.runtime.decoder_tvm import PACKED

    copy = tmp_path / "copy"
    shutil.copytree(artifact, copy)
    arrays = load_file(str(copy / PACKED))
    arrays["layers.1.qkv.scale"] = arrays["layers.1.qkv.scale"] * 2
    save_file(arrays, str(copy / PACKED))
    manifest = json.loads((copy / MANIFEST).read_text())
    manifest["files"] = file_hashes(copy)
    (copy / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(LowbitError, match="disagree with the numpy runtime"):
        check_tvm_decoder(copy)
