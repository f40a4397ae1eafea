"""A weight-quantized decoder artifact, run: `load(DIR).generate(prompt, max_new_tokens=N)`.

Generation runs on the artifact's TVM kernels where it has them (`decoder_tvm`, built at quantize time) and TVM
runs here; otherwise, or with backend="numpy", on the numpy decoder below, which is also the reference the TVM
kernels are checked against.

No torch here (the runtime's rule): the artifact's quantized weights (group-wise or VQ) are dequantized once at
load (a W8A8 artifact's linears instead run `lowbit.ir.token_int8`'s integer product), and a float32 numpy Llama
(RMSNorm, adjacent-pair RoPE as llama.cpp's layout needs, grouped-query attention over a KV cache, SiLU-gated
MLP, tied LM head) prefills the prompt and decodes one token at a time. It computes what
`lowbit.models.llama.LlamaDecoder` computes with the same weights, to float32 rounding (tests check).
`lowbit quantize` writes the artifact (`lowbit.pipeline.decoder`, which documents its files).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import LowbitError
from ..ir.groupwise_weights import GroupWiseWeights
from ..ir.token_int8 import Int8TokenLinear
from ..ir.weight_formats import QuantizedWeights, stored_weights
from .bpe_tokenizer import BpeTokenizer, Vocabulary
from .loader import DECODER_KIND, MANIFEST, read_manifest, verify_manifest

DECODER_VERSION = 1
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "weights.safetensors"
VOCABULARY_FILE = "vocabulary.json"
_CONFIG_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads",
                "context_length", "rope_theta", "rms_norm_eps", "tie_embeddings")


@dataclass(frozen=True)
class DecoderFiles:
    """What a decoder artifact holds: its config (LlamaConfig's fields), vocabulary, weights (parameter name ->
    its stored format, or a float32 array) and the bits of its linears' activations (0: float; 8: W8A8)."""

    config: dict[str, Any]
    vocabulary: Vocabulary
    weights: dict[str, QuantizedWeights | np.ndarray]
    activation_bits: int = 0

    @property
    def parameters(self) -> dict[str, np.ndarray]:
        """Every parameter in float32, quantized weights dequantized."""
        return {name: w if isinstance(w, np.ndarray) else w.dequantize() for name, w in self.weights.items()}


def is_decoder_artifact(directory: Path) -> bool:
    try:
        return read_manifest(directory).get("kind") == DECODER_KIND
    except LowbitError:
        return False


def verify_decoder_files(directory: Path) -> None:
    """Raise LowbitError unless DIR is a decoder artifact whose files match its manifest."""
    if not is_decoder_artifact(directory):
        raise LowbitError(f"{directory}: not a decoder artifact (no {MANIFEST} of kind {DECODER_KIND!r}); write one "
                          "with `lowbit quantize zoo:smollm2_135m -o DIR`")
    problems = verify_manifest(directory)
    if problems:
        raise LowbitError(f"{directory}: the files do not match {MANIFEST}: {'; '.join(problems)}")
    version = read_manifest(directory).get("version")
    if version != DECODER_VERSION:
        raise LowbitError(f"{directory}: decoder artifact version {version!r}; this lowbit reads version "
                          f"{DECODER_VERSION}: quantize the model again")


def read_decoder_artifact(directory: str | Path, weights: bool = True) -> DecoderFiles:
    """Check a decoder artifact's files against its manifest, then read them (the parameters only if `weights`);
    a LowbitError says what is wrong."""
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    directory = Path(directory)
    verify_decoder_files(directory)
    try:
        config = json.loads((directory / CONFIG_FILE).read_text())
        vocabulary = Vocabulary(**{k: tuple(v) if isinstance(v, list) else v
                                   for k, v in json.loads((directory / VOCABULARY_FILE).read_text()).items()})
        arrays = load_file(str(directory / WEIGHTS_FILE)) if weights else {}
    except (OSError, TypeError, ValueError, SafetensorError) as e:
        raise LowbitError(f"{directory}: cannot read the artifact: {e}") from e
    missing = [k for k in _CONFIG_KEYS if k not in config]
    if missing:
        raise LowbitError(f"{directory / CONFIG_FILE}: lacks {', '.join(missing)}")
    activation_bits = read_manifest(directory).get("weights", {}).get("activation_bits", 0)
    if activation_bits not in (0, 8):
        raise LowbitError(f"{directory / MANIFEST}: activation_bits {activation_bits!r}; this lowbit runs 0 or 8")
    return DecoderFiles(config, vocabulary, stored_weights(arrays, str(directory / WEIGHTS_FILE)), activation_bits)


@dataclass(frozen=True)
class Generation:
    """A generated continuation: its text and ids, and how long prefill and decoding took."""

    text: str
    token_ids: tuple[int, ...]
    prompt_tokens: int
    prefill_s: float
    decode_steps: int  # one-token forward passes after the prefill
    decode_s: float

    @property
    def tokens_per_s(self) -> float:
        """Decode speed: one-token forward passes (with sampling) per second."""
        return self.decode_steps / self.decode_s if self.decode_steps and self.decode_s > 0 else 0.0


BACKENDS = ("auto", "tvm", "numpy")


class DecoderModel:
    """A loaded decoder artifact: `generate(prompt, ...)`, and `logits(ids)` with numpy.

    `backend` "tvm" runs generation on the artifact's compiled kernels (`decoder_tvm`), "numpy" on float32
    weights dequantized at load, "auto" (the default) on TVM where the artifact has its library and TVM imports."""

    def __init__(self, directory: str | Path, backend: str = "auto") -> None:
        if backend not in BACKENDS:
            raise LowbitError(f"backend {backend!r}: choose one of {', '.join(BACKENDS)}")
        self.directory = Path(directory)
        if backend == "auto":
            backend = "tvm" if _tvm_usable(self.directory) else "numpy"
        self.backend = backend
        files = read_decoder_artifact(directory, weights=backend == "numpy")
        self.config = files.config
        self.tokenizer = BpeTokenizer(files.vocabulary)
        c = self.config
        self.heads, self.kv_heads = int(c["num_heads"]), int(c["num_kv_heads"])
        self.head_dim = int(c["hidden_size"]) // self.heads
        self.eps, self.context = float(c["rms_norm_eps"]), int(c["context_length"])
        if backend == "tvm":
            from .decoder_tvm import LIBRARY, TvmDecoder, has_tvm_library

            if not has_tvm_library(self.directory):
                raise LowbitError(f"{self.directory}: no {LIBRARY} (TVM decode kernels); quantize with TVM "
                                  "installed, or use backend='numpy'")
            self.tvm: TvmDecoder | None = TvmDecoder(self.directory)
            return
        self.tvm = None
        self.activation_bits = files.activation_bits
        stored = files.weights

        def tensor(name: str) -> np.ndarray:
            w = stored[name]
            return w if isinstance(w, np.ndarray) else w.dequantize()

        def linear(name: str) -> Callable[[np.ndarray], np.ndarray]:
            w = stored[name]
            if self.activation_bits:
                if not isinstance(w, GroupWiseWeights):
                    raise LowbitError(f"{self.directory / WEIGHTS_FILE}: {name} of a W8A8 artifact is not int8")
                return Int8TokenLinear(w)
            transposed = tensor(name).T.copy()  # [in, out] once: x @ w reads it row by row
            return lambda x: x @ transposed

        try:
            self.embedding = tensor("embed_tokens.weight")
            self.lm_head = self.embedding if c["tie_embeddings"] else tensor("lm_head.weight")
            self.final_norm = tensor("norm.weight")
            self.layers = [{name: (linear if "proj" in name else tensor)(f"layers.{i}.{name}")
                            for name in ("input_layernorm.weight", "self_attn.q_proj.weight",
                                         "self_attn.k_proj.weight", "self_attn.v_proj.weight",
                                         "self_attn.o_proj.weight", "post_attention_layernorm.weight",
                                         "mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight")}
                           for i in range(int(c["num_layers"]))]
        except KeyError as e:
            raise LowbitError(f"{self.directory / WEIGHTS_FILE}: no tensor {e}; the file is incomplete") from None
        inv_freq = float(c["rope_theta"]) ** (-np.arange(0, self.head_dim, 2, dtype=np.float64) / self.head_dim)
        angles = np.arange(self.context, dtype=np.float64)[:, None] * inv_freq[None, :]
        self._cos, self._sin = np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)

    def new_cache(self) -> list[list[np.ndarray]]:
        """Per layer [keys, values], each [kv_heads, positions, head_dim]; positions grow as tokens are fed."""
        empty = np.zeros((self.kv_heads, 0, self.head_dim), np.float32)
        return [[empty, empty] for _ in self.layers]

    def logits(self, ids: np.ndarray, cache: list[list[np.ndarray]] | None = None) -> np.ndarray:
        """float32 logits [t, vocab] of token ids [t], after the `cache`'s tokens (which it extends)."""
        self._need_numpy()
        ids = np.asarray(ids, np.int64).reshape(-1)
        cache = self.new_cache() if cache is None else cache
        past = cache[0][0].shape[1]
        if past + len(ids) > self.context:
            raise LowbitError(f"{past} cached + {len(ids)} new tokens exceed the context length {self.context}")
        x = self.embedding[ids]
        cos, sin = self._cos[past:past + len(ids)], self._sin[past:past + len(ids)]
        for layer, kv in zip(self.layers, cache, strict=True):
            x = x + self._attention(self._norm(x, layer["input_layernorm.weight"]), layer, kv, cos, sin, past)
            h = self._norm(x, layer["post_attention_layernorm.weight"])
            gate = layer["mlp.gate_proj.weight"](h)
            x = x + layer["mlp.down_proj.weight"](gate / (1 + np.exp(-gate)) * layer["mlp.up_proj.weight"](h))
        return self._norm(x, self.final_norm) @ self.lm_head.T

    def generate(self, prompt: str, max_new_tokens: int = 64, temperature: float = 0.0, top_p: float = 1.0,
                 seed: int = 0, stream: Callable[[str], object] | None = None) -> Generation:
        """Continue `prompt`: greedy by default, else sampled at `temperature` from the smallest set of tokens
        whose probability reaches `top_p`. Stops at the end-of-text token. `stream` hears each new piece of text."""
        if max_new_tokens < 1:
            raise LowbitError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
        if temperature < 0 or not 0 < top_p <= 1:
            raise LowbitError(f"temperature must be >= 0 and top_p in (0, 1], got {temperature} and {top_p}")
        ids = self.tokenizer.encode(prompt)
        if len(ids) == 0:
            raise LowbitError("the prompt is empty; give some text to continue")
        if len(ids) + max_new_tokens > self.context:
            raise LowbitError(f"the prompt has {len(ids)} tokens; with {max_new_tokens} new ones that exceeds the "
                              f"context length {self.context}: shorten the prompt or lower --max-new-tokens")
        rng = np.random.default_rng(seed)
        session = self.tvm or _NumpySession(self)
        t0 = time.perf_counter()
        logits = session.prefill(ids)
        prefill_s = time.perf_counter() - t0
        out: list[int] = []
        shown, steps = "", 0
        t1 = time.perf_counter()
        while True:
            token = _pick(logits, temperature, top_p, rng)
            if token == self.tokenizer.eos_id:
                break
            out.append(token)
            if stream is not None:
                text = self.tokenizer.decode(out, skip_special=True)
                if not text.endswith("\ufffd"):  # else a multi-byte character is still incomplete
                    stream(text[len(shown):])
                    shown = text
            if len(out) == max_new_tokens:
                break
            logits = session.step(token)
            steps += 1
        decode_s = time.perf_counter() - t1
        text = self.tokenizer.decode(out, skip_special=True)
        if stream is not None and text != shown:
            stream(text[len(shown):])
        return Generation(text, tuple(out), len(ids), prefill_s, steps, decode_s)

    def _need_numpy(self) -> None:
        if self.tvm is not None:
            raise LowbitError("logits() runs the numpy runtime; load the model with backend='numpy'")

    def _norm(self, x: np.ndarray, gain: np.ndarray) -> np.ndarray:
        return x / np.sqrt((x * x).mean(-1, keepdims=True) + self.eps) * gain

    def _attention(self, x: np.ndarray, layer: dict[str, np.ndarray], kv: list[np.ndarray], cos: np.ndarray,
                   sin: np.ndarray, past: int) -> np.ndarray:
        t, d = len(x), self.head_dim
        q = _rope(layer["self_attn.q_proj.weight"](x).reshape(t, self.heads, d).transpose(1, 0, 2), cos, sin)
        k = _rope(layer["self_attn.k_proj.weight"](x).reshape(t, self.kv_heads, d).transpose(1, 0, 2), cos, sin)
        v = layer["self_attn.v_proj.weight"](x).reshape(t, self.kv_heads, d).transpose(1, 0, 2)
        kv[0], kv[1] = np.concatenate([kv[0], k], axis=1), np.concatenate([kv[1], v], axis=1)
        group = self.heads // self.kv_heads  # query head h reads KV head h // group
        keys, values = np.repeat(kv[0], group, axis=0), np.repeat(kv[1], group, axis=0)
        scores = q @ keys.transpose(0, 2, 1) * np.float32(d ** -0.5)
        future = np.arange(keys.shape[1])[None, :] > np.arange(past, past + t)[:, None]
        scores = np.where(future, -np.inf, scores)
        scores = np.exp(scores - scores.max(-1, keepdims=True))
        attended = (scores / scores.sum(-1, keepdims=True)) @ values
        return layer["self_attn.o_proj.weight"](attended.transpose(1, 0, 2).reshape(t, -1))


class _NumpySession:
    """`DecoderModel.logits` with its cache, behind the interface of `TvmDecoder` (prefill, then steps)."""

    def __init__(self, model: DecoderModel) -> None:
        self.model, self.cache = model, model.new_cache()

    def prefill(self, ids: np.ndarray) -> np.ndarray:
        self.cache = self.model.new_cache()
        return self.model.logits(ids, self.cache)[-1]

    def step(self, token: int) -> np.ndarray:
        return self.model.logits(np.array([token]), self.cache)[-1]


def _tvm_usable(directory: Path) -> bool:
    """Whether DIR has TVM kernels that this machine can run (TVM importable, the CPU's features)."""
    from .decoder_tvm import has_tvm_library, read_tvm_meta

    if not has_tvm_library(directory):
        return False
    try:
        import tvm  # noqa: F401

        read_tvm_meta(directory)
    except (ImportError, LowbitError):
        return False
    return True


def _rope(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """Rotate adjacent pairs (x[2i], x[2i+1]) of x [heads, t, head_dim] (llama.cpp's q/k layout)."""
    x0, x1 = x[..., 0::2], x[..., 1::2]
    out = np.empty_like(x)
    out[..., 0::2], out[..., 1::2] = x0 * cos - x1 * sin, x0 * sin + x1 * cos
    return out


def _pick(logits: np.ndarray, temperature: float, top_p: float, rng: np.random.Generator) -> int:
    if temperature == 0:
        return int(np.argmax(logits))
    z = logits.astype(np.float64) / temperature
    probs = np.exp(z - z.max())
    probs /= probs.sum()
    order = np.argsort(-probs)
    keep = order[: int(np.searchsorted(np.cumsum(probs[order]), top_p)) + 1]
    return int(rng.choice(keep, p=probs[keep] / probs[keep].sum()))
