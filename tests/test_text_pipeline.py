"""The text-model pipeline: named inputs, sentence files, a BERT-family directory as MODEL, bad input, and the
runtime's `encode` and `lowbit embed` on a real TVM library of a tiny sentence encoder (embedding + masked mean).

Everything runs on a tiny random BERT (hidden 8, one layer) with a 40-word tokenizer.json built here, so
nothing needs the MiniLM package.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner, Result
from safetensors.torch import save_file

from lowbit.cli.main import lowbit
from lowbit.errors import LowbitError
from lowbit.models.bert import BertConfig, BertEncoder
from lowbit.models.zoo import ZooEntry, ZooText, get_zoo_entry
from lowbit.pipeline.data import Inputs, check_disjoint, split_heldout
from lowbit.pipeline.prepare import Source, prepare
from lowbit.pipeline.progress import Progress
from lowbit.text.files import read_sentences

pytest.importorskip("tokenizers", reason="text models need the tokenizers package")

WORDS = ("the a cat dog sat on mat ran in park sun is hot cold day night bird sings tree green red blue sky "
         "water fish swims river big small house door opens closes man woman reads book").split()
SPECIAL = ("[PAD]", "[UNK]", "[CLS]", "[SEP]")
SEQ_LEN = 8
TINY = {"architectures": ["BertModel"], "model_type": "bert", "hidden_size": 8, "intermediate_size": 16,
        "num_attention_heads": 2, "num_hidden_layers": 1, "max_position_embeddings": 16,
        "vocab_size": len(SPECIAL) + len(WORDS), "type_vocab_size": 2}
CALIB = ["the cat sat on the mat", "a dog ran in the park", "the sun is hot", "the bird sings in a tree",
         "a fish swims in the river", "the man reads a book", "a big house", "the door opens"]
HELDOUT = ["the sky is blue", "a small red door", "the woman reads"]
LONG = "the cat sat on the mat in the park on a hot day"  # 14 words: longer than SEQ_LEN tokens


# --- a tiny BERT directory -------------------------------------------------------------------------


def write_tokenizer(path: Path) -> Path:
    """A BERT-style WordPiece tokenizer.json over WORDS: [CLS] words [SEP], [PAD] id 0."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors

    vocab = {token: i for i, token in enumerate((*SPECIAL, *WORDS))}
    tokenizer = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])])
    tokenizer.save(str(path))
    return path


def write_bert_dir(directory: Path, **changes: object) -> Path:
    config = {**TINY, **changes}
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(config))
    torch.manual_seed(0)
    state = BertEncoder(BertConfig.from_dict({**TINY}, "tiny")).state_dict()
    save_file({k: v.contiguous() for k, v in state.items()}, str(directory / "model.safetensors"))
    write_tokenizer(directory / "tokenizer.json")
    return directory


def write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(f"{line}\n" for line in lines), encoding="utf-8")
    return path


@pytest.fixture
def bert_dir(tmp_path: Path) -> Path:
    return write_bert_dir(tmp_path / "tiny-bert")


def quantize(*args: object) -> Result:
    return CliRunner().invoke(lowbit, ["quantize", *map(str, args), "--target", "none"])


def assert_refused(result: Result, out: Path, *needles: str) -> None:
    """Exit 2 with `error: ...` naming every needle, no traceback, and nothing written (not even a temp dir)."""
    assert result.exit_code == 2, result.output
    assert "\nerror: " in f"\n{result.stderr}" and "Traceback" not in result.output, result.output
    for needle in needles:
        assert needle in result.stderr, f"{needle!r} not in {result.stderr!r}"
    assert not out.exists()
    assert [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")] == []


# --- Inputs of named arrays ------------------------------------------------------------------------


def _named(n: int, seq: int = 4, offset: int = 0) -> dict[str, np.ndarray]:
    ids = np.arange(offset, offset + n * seq, dtype=np.int64).reshape(n, seq)
    return {"input_ids": ids, "attention_mask": np.ones((n, seq), np.int64)}


def test_inputs_hold_named_arrays() -> None:
    texts = tuple(f"sentence {i}" for i in range(10))
    inputs = Inputs(_named(10), "ten sentences", texts=texts)
    assert inputs.named and len(inputs) == 10 and inputs.noun == "sentence"
    assert inputs.describe_photos() == "each sentence independent"
    assert list(inputs.feed(["attention_mask", "input_ids"])) == ["attention_mask", "input_ids"]
    with pytest.raises(LowbitError, match=r"holds inputs \['input_ids', 'attention_mask'\], but the model takes"):
        inputs.feed(["input_ids"])
    with pytest.raises(LowbitError, match="a text model's inputs are named arrays"):
        inputs.x  # noqa: B018

    part = inputs.select(slice(2, 5), "three")
    assert part.texts == texts[2:5] and np.array_equal(part.data["input_ids"], inputs.data["input_ids"][2:5])
    calib, held = split_heldout(inputs)
    assert (len(calib), len(held)) == (8, 2) and held.texts == texts[8:]
    assert "last 2 of 10 sentences" in held.source
    check_disjoint(calib, held)
    with pytest.raises(LowbitError, match="1 of the 2 held-out samples"):
        check_disjoint(calib, Inputs({k: a[7:9] for k, a in inputs.data.items()}, "overlapping"))
    # The digest covers every array: a different mask is different data.
    other = Inputs({**inputs.data, "attention_mask": np.zeros((10, 4), np.int64)}, "masked")
    assert other.digest() != inputs.digest() and other.sample_digests()[0] != inputs.sample_digests()[0]

    with pytest.raises(ValueError, match="same number of samples"):
        Inputs({"input_ids": np.zeros((3, 4)), "attention_mask": np.zeros((2, 4))}, "ragged")
    with pytest.raises(ValueError, match="2 texts for 10 samples"):
        Inputs(_named(10), "bad", texts=("a", "b"))


def test_image_inputs_keep_their_behaviour() -> None:
    x = np.arange(6 * 3, dtype=np.float32).reshape(6, 3, 1, 1)
    inputs = Inputs(x, "x.npy", np.array([0, 0, 1, 1, 2, 2]))
    assert not inputs.named and inputs.x is x and inputs.data is x and inputs.feed(["input"])["input"] is x
    assert inputs.describe_photos() == "3 photos" and inputs.noun == "sample"
    import hashlib

    assert inputs.digest() == hashlib.sha256(x.tobytes()).hexdigest()  # the manifest's hash, as before


def test_text_check_inputs() -> None:
    from lowbit.pipeline.checks import CHECK_INPUTS, MIN_RANDOM, text_check_inputs

    held = _named(10, seq=6)
    held["attention_mask"][:, 4:] = 0
    inputs = text_check_inputs(held, vocab_size=50, seq_len=6, seed=1)
    ids, mask = inputs.data["input_ids"], inputs.data["attention_mask"]
    assert len(inputs) == CHECK_INPUTS and ids.dtype == mask.dtype == np.int64 and ids.shape == (CHECK_INPUTS, 6)
    np.testing.assert_array_equal(ids[:10], held["input_ids"])
    np.testing.assert_array_equal(mask[:10], held["attention_mask"])
    random_ids, random_mask = ids[10:], mask[10:]
    assert random_ids.min() >= 0 and random_ids.max() < 50 and len(np.unique(random_ids)) > 40
    lengths = random_mask.sum(1)
    # Every mask is a prefix of at least one token; the last half are full length, the first of many lengths.
    assert np.array_equal(random_mask, (np.arange(6) < lengths[:, None]).astype(np.int64)) and lengths.min() >= 1
    assert (lengths[-inputs.saturating:] == 6).all() and len(set(lengths[:inputs.random].tolist())) > 3
    assert inputs.describe() == f"{CHECK_INPUTS} inputs (10 held-out, 27 random, 27 full-length)"
    assert inputs.to_json() == {"total": CHECK_INPUTS, "heldout": 10, "random": 27, "full_length": 27}
    many = text_check_inputs(_named(100, seq=6), vocab_size=50, seq_len=6)
    assert len(many) == 100 + MIN_RANDOM and many.random + many.saturating == MIN_RANDOM
    alone = text_check_inputs(None, vocab_size=50, seq_len=6)  # `lowbit compile`: no held-out tokens at hand
    assert (alone.heldout, len(alone)) == (0, CHECK_INPUTS) and alone.data["input_ids"].shape == (CHECK_INPUTS, 6)


# --- sentence files --------------------------------------------------------------------------------


def test_read_sentences(tmp_path: Path) -> None:
    path = tmp_path / "s.txt"
    path.write_bytes("\ufeffFirst one.\r\n\n  Second one.  \n".encode())
    assert read_sentences(path, "calibration") == ["First one.", "Second one."]
    assert read_sentences(path, "input", keep_blank=True) == ["First one.", "", "Second one."]
    path.write_text("\n  \n")
    with pytest.raises(LowbitError, match=r"s.txt: no sentences \(the file is empty or blank\)"):
        read_sentences(path, "calibration")
    path.write_bytes(b"caf\xe9\n")
    with pytest.raises(LowbitError, match="s.txt: not UTF-8 text"):
        read_sentences(path, "calibration")
    path.write_bytes(b"PK\x03\x04\x00\x00")  # a zip archive, say
    with pytest.raises(LowbitError, match="NUL bytes"):
        read_sentences(path, "calibration")
    with pytest.raises(LowbitError, match="absent.txt: no such file"):
        read_sentences(tmp_path / "absent.txt", "calibration")


# --- the zoo ---------------------------------------------------------------------------------------


def test_zoo_text_entry() -> None:
    entry = get_zoo_entry("zoo:minilm_l6")
    assert entry.text is not None and entry.calibration is None and entry.heldout is None
    assert entry.input_shape == (1, 128)
    text = ZooText(directory=Path, calibration=lambda s: ["a"], heldout=lambda s: ["b"])
    with pytest.raises(ValueError, match="exactly one"):
        ZooEntry(name="both", description="", build=torch.nn.Identity, input_shape=(1, 4), text=text,
                 calibration=lambda s: np.zeros((1, 4)), heldout=lambda s: np.zeros((1, 4)))
    with pytest.raises(ValueError, match="exactly one"):
        ZooEntry(name="neither", description="", build=torch.nn.Identity, input_shape=(1, 4))


# --- prepare: a BERT-family directory as MODEL -----------------------------------------------------


def test_prepare_tokenizes_sentences_and_captures_the_encoder(bert_dir: Path, tmp_path: Path) -> None:
    lines: list[str] = []
    calib = write_lines(tmp_path / "calib.txt", [*CALIB, LONG])
    prepared = prepare(Source(str(bert_dir), calib, HELDOUT, seq_len=SEQ_LEN), Progress(write=lines.append))
    graph = prepared.graph
    assert graph.inputs == ["input_ids", "attention_mask"] and len(graph.layers) == 6
    assert prepared.text is not None and prepared.text.seq_len == SEQ_LEN
    assert prepared.text.tokenizer == bert_dir / "tokenizer.json"
    ids, mask = prepared.calib.data["input_ids"], prepared.calib.data["attention_mask"]
    assert ids.shape == mask.shape == (len(CALIB) + 1, SEQ_LEN) and ids.dtype == mask.dtype == np.int64
    assert prepared.calib.texts == (*CALIB, LONG) and prepared.heldout.texts == tuple(HELDOUT)
    # "the cat sat on the mat": [CLS] 6 words [SEP], no padding; "the sun is hot": 6 tokens, 2 of padding.
    assert mask.sum(1).tolist()[:3] == [8, 8, 6] and ids[2, 6:].tolist() == [0, 0]
    # Too long: cut to SEQ_LEN with a warning, not an error; it still ends with [SEP].
    assert ids[-1, -1] == 3 and mask[-1].all()
    log = "".join(lines)
    assert "warning: 9 sentences in" in log and "1 of 9 text(s) were longer than seq_len 8 tokens" in log
    assert f"calibration: 9 sentences (each sentence independent), 9 sentences in {calib}" in log
    # The captured float graph runs on the tokens as the torch model does.
    from lowbit.quantizer.graph import run_graph

    feed = {k: torch.from_numpy(a) for k, a in prepared.heldout.data.items()}
    got = run_graph(graph, feed)[graph.outputs[0]]
    from lowbit.models.minilm import load_text_encoder

    with torch.no_grad():
        want = load_text_encoder(bert_dir, SEQ_LEN).model(feed["input_ids"], feed["attention_mask"])
    assert got.shape == (3, 8) and torch.allclose(got, want, atol=1e-5)


def test_prepare_splits_held_out_text_off_the_calibration_file(bert_dir: Path, tmp_path: Path) -> None:
    calib = write_lines(tmp_path / "calib.txt", [*CALIB, *HELDOUT, "the sky"])
    prepared = prepare(Source(str(bert_dir), calib, seq_len=SEQ_LEN), Progress(write=lambda _: None))
    assert (len(prepared.calib), len(prepared.heldout)) == (10, 2)
    assert prepared.heldout.texts == ("the woman reads", "the sky")


# --- bad input: each a clear error naming the file and the fix, and nothing written ---------------


def test_missing_tokenizer(bert_dir: Path, tmp_path: Path) -> None:
    (bert_dir / "tokenizer.json").unlink()
    out = tmp_path / "out"
    result = quantize(bert_dir, "-o", out, "--calib", write_lines(tmp_path / "c.txt", CALIB))
    assert_refused(result, out, f"{bert_dir / 'tokenizer.json'}: no such file",
                   f"put the one of the same checkpoint in {bert_dir}")


@pytest.mark.parametrize(("changes", "needle"), [
    ({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}, "model_type 'gpt2' is not supported"),
    ({"architectures": ["LlamaForCausalLM"]}, "architectures ['LlamaForCausalLM'] is not supported"),
])
def test_unsupported_architecture(tmp_path: Path, changes: dict, needle: str) -> None:
    model = write_bert_dir(tmp_path / "model", **changes)
    out = tmp_path / "out"
    result = quantize(model, "-o", out, "--calib", write_lines(tmp_path / "c.txt", CALIB))
    assert_refused(result, out, f"{model / 'config.json'}: {needle}", "BERT")


def test_empty_calibration_text(bert_dir: Path, tmp_path: Path) -> None:
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    out = tmp_path / "out"
    assert_refused(quantize(bert_dir, "-o", out, "--calib", empty), out,
                   f"{empty}: no sentences (the file is empty or blank); give calibration text with one sentence "
                   "per line")
    empty.write_text("")
    assert_refused(quantize("zoo:minilm_l6", "-o", out, "--calib", empty), out, f"{empty}: no sentences")
    assert_refused(quantize(bert_dir, "-o", out, "--calib", write_lines(tmp_path / "c.txt", CALIB),
                            "--eval", empty), out, f"{empty}: no sentences", "held-out text")


def test_other_text_model_mistakes(bert_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    calib = write_lines(tmp_path / "c.txt", CALIB)
    assert_refused(quantize(bert_dir, "-o", out), out, "calibration text is needed", "--calib FILE.txt")
    array = tmp_path / "x.npy"
    np.save(array, np.zeros((2, 8), np.int64))
    assert_refused(quantize(bert_dir, "-o", out, "--calib", array), out,
                   f"{array}: is an array file, but a text model takes calibration text")
    assert_refused(quantize(bert_dir, "-o", out, "--calib", calib, "--seq-len", "32"), out,
                   "seq_len 32 exceeds the model's max_position_embeddings 16")
    assert_refused(quantize(bert_dir, "-o", out, "--calib", calib, "--eval", calib), out,
                   "--calib and --eval are the same")
    assert_refused(quantize(bert_dir, "-o", out, "--calib", calib, "--factory", "m:f"), out, "drop --factory")
    assert_refused(quantize("zoo:small_cnn", "-o", out, "--seq-len", "64"), out,
                   "--seq-len 64: zoo:small_cnn is not a text model")
    assert_refused(quantize("zoo:small_cnn", "-o", out, "--calib", calib), out,
                   "unknown calibration data format '.txt'", "for text models")
    result = quantize(bert_dir, "-o", out, "--calib", calib, "--seq-len", "1")
    assert result.exit_code == 2 and "'--seq-len': 1 is not in the range x>=2" in result.stderr and not out.exists()


# --- the runtime: encode() and `lowbit embed` on a compiled text model ------------------------------

BATCH = 4
HIDDEN = 6


@pytest.fixture(scope="module")
def text_artifact(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, np.ndarray]:
    """A real artifact layout whose TVM library is a tiny sentence encoder: the masked mean of table rows.

    Its embedding of a sentence is the mean of `table[id]` over the sentence's tokens, so the expected
    output is one line of numpy; compiled at batch BATCH and seq_len SEQ_LEN."""
    tvm = pytest.importorskip("tvm")
    from tvm import relax

    from lowbit.pipeline.artifact import file_hashes
    from lowbit.runtime.loader import TVM_FORMAT, sha256_file

    directory = tmp_path_factory.mktemp("artifact")
    out = directory / "tvm"
    out.mkdir()
    vocab = len(SPECIAL) + len(WORDS)
    table = np.random.default_rng(0).standard_normal((vocab, HIDDEN)).astype(np.float32)
    bb = relax.BlockBuilder()
    ids = relax.Var("input_ids", relax.TensorType((BATCH, SEQ_LEN), "int64"))
    mask = relax.Var("attention_mask", relax.TensorType((BATCH, SEQ_LEN), "int64"))
    weights = relax.Var("p0", relax.TensorType((vocab, HIDDEN), "float32"))
    with bb.function("main", [ids, mask, weights]):
        with bb.dataflow():
            rows = bb.emit(relax.op.take(weights, ids, axis=0, mode="clip"))
            m = bb.emit(relax.op.astype(mask, "float32"))
            total = bb.emit(relax.op.sum(relax.op.multiply(rows, relax.op.expand_dims(m, axis=[2])), axis=[1]))
            count = bb.emit(relax.op.sum(m, axis=[1], keepdims=True))
            result = bb.emit_output(relax.op.divide(total, count))
        bb.emit_func_output(result)
    tvm.compile(bb.get(), target=tvm.target.Target({"kind": "llvm"})).export_library(str(out / "model.so"))
    np.savez(out / "params.npz", p0=table)
    inputs = [{"name": n, "shape": [BATCH, SEQ_LEN], "dtype": "int64"} for n in ("input_ids", "attention_mask")]
    meta = {"format": TVM_FORMAT, "target": {"kind": "llvm"}, "target_string": "llvm", "required_features": [],
            "inputs": inputs, "outputs": [{"name": "embedding", "shape": [BATCH, HIDDEN], "dtype": "float32"}],
            "params": ["p0"], "files": {n: sha256_file(out / n) for n in ("model.so", "params.npz")}}
    (out / "tvm.json").write_text(json.dumps(meta))
    write_tokenizer(directory / "tokenizer.json")
    manifest = {"text": {"tokenizer": "tokenizer.json", "seq_len": SEQ_LEN}, "files": file_hashes(directory)}
    (directory / "manifest.json").write_text(json.dumps(manifest))
    return directory, table


def expected_embeddings(artifact: Path, table: np.ndarray, texts: list[str]) -> np.ndarray:
    """The tiny encoder in numpy: the mean of the table rows of each sentence's tokens."""
    from lowbit.runtime.tokenizer import TextTokenizer

    tokens = TextTokenizer(artifact / "tokenizer.json", SEQ_LEN).encode(texts, warn=lambda _: None)
    mask = tokens.attention_mask[..., None]
    return (table[tokens.input_ids] * mask).sum(1) / mask.sum(1)


def test_encode_tokenizes_pads_and_runs_the_compiled_model(text_artifact: tuple[Path, np.ndarray]) -> None:
    from lowbit.runtime import load

    directory, table = text_artifact
    model = load(directory)
    texts = [*HELDOUT, "the dog", LONG]  # 5 sentences: two compiled batches, the second filled up
    heard: list[str] = []
    got = model.encode(texts, warn=heard.append)
    assert got.shape == (5, HIDDEN) and got.dtype == np.float32
    np.testing.assert_allclose(got, expected_embeddings(directory, table, texts), rtol=0, atol=1e-6)
    assert heard == ["1 of 5 text(s) were longer than seq_len 8 tokens and were truncated; pass a larger seq_len "
                     "to keep more of them"]
    # One sentence alone gives the row it had in the batch: the filling copies never leak into a result.
    np.testing.assert_allclose(model.encode(["the dog"]), got[3:4], rtol=0, atol=1e-6)
    # run() takes the integer inputs by name; float token ids are refused.
    ids = np.zeros((BATCH, SEQ_LEN), np.int64)
    with pytest.raises(LowbitError, match="'input_ids': expected integer .int64. data, got float32"):
        model.run(input_ids=ids.astype(np.float32), attention_mask=ids + 1)
    assert model.run(input_ids=ids, attention_mask=ids + 1).shape == (BATCH, HIDDEN)
    assert model.benchmark(repeats=2, warmup=1)["runs"] == 2


def test_encode_refuses_a_damaged_artifact(text_artifact: tuple[Path, np.ndarray], tmp_path: Path) -> None:
    import shutil

    from lowbit.runtime import load

    directory = tmp_path / "copy"
    shutil.copytree(text_artifact[0], directory)
    tokenizer = directory / "tokenizer.json"
    tokenizer.write_text(tokenizer.read_text().replace('"sun"', '"moon"'))
    with pytest.raises(LowbitError, match="tokenizer.json: missing, or its sha256 does not match"):
        load(directory)
    tokenizer.unlink()
    model = load(directory, verify=False)
    with pytest.raises(LowbitError, match="tokenizer.json: missing; a text model's artifact carries its"):
        model.encode(["the sun"])
    manifest = json.loads((directory / "manifest.json").read_text())
    manifest["text"]["seq_len"] = 16
    (directory / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(LowbitError, match="seq_len 16 differs from the compiled model's 8"):
        load(directory, verify=False).encode(["the sun"])
    from lowbit.runtime.text import text_tokenizer

    with pytest.raises(LowbitError, match=r"not a text model \(its inputs are \['input'\]"):
        text_tokenizer(directory, [{"name": "input", "shape": [1, 3, 8, 8], "dtype": "float32"}])


def test_embed_command(text_artifact: tuple[Path, np.ndarray], tmp_path: Path) -> None:
    directory, table = text_artifact
    text = tmp_path / "in.txt"
    text.write_text(f"the cat sat\n\n{LONG}\n", encoding="utf-8")
    out = tmp_path / "emb.npy"
    result = CliRunner().invoke(lowbit, ["embed", str(directory), "--text", str(text), "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert "3 sentences (1 blank line embedded as empty text)" in result.stdout
    assert f"warning: {text}: 1 of 3 text(s) were longer than seq_len 8" in result.stderr
    got = np.load(out)
    want = expected_embeddings(directory, table, ["the cat sat", "", LONG])
    assert got.shape == (3, HIDDEN) and np.allclose(got, want, atol=1e-6)  # row i is line i, the blank one too

    empty = tmp_path / "empty.txt"
    empty.write_text("")
    again = tmp_path / "again.npy"
    result = CliRunner().invoke(lowbit, ["embed", str(directory), "--text", str(empty), "-o", str(again)])
    assert result.exit_code == 2 and f"error: {empty}: no sentences" in result.stderr
    assert not again.exists() and [p for p in tmp_path.iterdir() if p.name.startswith(".again")] == []


def test_run_and_bench_on_a_text_model(text_artifact: tuple[Path, np.ndarray], tmp_path: Path) -> None:
    directory, _ = text_artifact
    np.save(tmp_path / "x.npy", np.zeros((BATCH, SEQ_LEN), np.float32))
    result = CliRunner().invoke(lowbit, ["run", str(directory), "--input", str(tmp_path / "x.npy")])
    assert result.exit_code == 2 and "a text model (inputs input_ids and attention_mask)" in result.stderr
    assert f"lowbit embed {directory} --text FILE" in result.stderr
    result = CliRunner().invoke(lowbit, ["bench", str(directory), "--against", "none", "--repeats", "2",
                                         "--rounds", "1"])
    assert result.exit_code == 0, result.output
    bench = json.loads(result.stdout)
    assert bench["batch"] == BATCH and bench["latency_ms"]["tvm"] > 0


def test_encode_needs_no_torch(text_artifact: tuple[Path, np.ndarray]) -> None:
    directory, table = text_artifact
    # torch made unimportable (TVM imports it when it can, and does without it when it cannot).
    script = ("import json, sys; sys.modules['torch'] = None; import lowbit.runtime as rt; "
              f"e = rt.load({str(directory)!r}).encode(['the sun is hot']); print(json.dumps(e.tolist())); "
              "heavy = [m for m in ('onnx', 'onnxruntime', 'safetensors', 'click', 'scipy') if m in sys.modules]; "
              "assert not heavy, heavy")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                          cwd=Path(__file__).resolve().parents[1])
    assert proc.returncode == 0, proc.stderr
    got = np.array(json.loads(proc.stdout))
    np.testing.assert_allclose(got, expected_embeddings(directory, table, ["the sun is hot"]), atol=1e-6)


# --- the whole quantize of a text model ------------------------------------------------------------


def test_quantize_a_text_model_with_smoothing(bert_dir: Path, tmp_path: Path) -> None:
    """A BERT directory through the whole pipeline: an integer-only model.int.onnx bit-exact with the reference,
    the embedding scored by cosine, SmoothQuant's groups reported, the output named `embedding`."""
    out = tmp_path / "art"
    calib = write_lines(tmp_path / "calib.txt", CALIB * 2)
    heldout = write_lines(tmp_path / "heldout.txt", HELDOUT)
    result = quantize(bert_dir, "-o", out, "--calib", calib, "--eval", heldout, "--seq-len", SEQ_LEN,
                      "--smooth", "auto")
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    assert report["onnxruntime"]["model.int.onnx"]["bit_exact"] and report["integer_only"]
    cosine = report["fidelity"]["cosine"]
    assert cosine["samples"] == len(HELDOUT) and cosine["min"] <= cosine["mean"] <= 1.0
    assert report["fidelity"]["top1_agreement"] is None and report["fidelity"]["output"] == "embedding"
    groups = report["smoothing"]["groups"]
    assert groups and {"tensor", "outliers_before", "outliers_after", "applied"} <= set(groups[0])
    markdown = (out / "report.md").read_text()
    assert "embedding cosine FP32 vs quantized" in markdown and "## SmoothQuant" in markdown
    assert (out / "tokenizer.json").is_file()
