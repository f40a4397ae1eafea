"""A decoder artifact's TVM kernels, run: `TvmDecoder(DIR).prefill(ids)` then `.step(token)`, logits out.

The artifact's ``decoder.so`` (built at quantize time by `lowbit.codegen.tvm.decoder`, which documents the
kernels) and ``decoder_tvm.safetensors`` (the weights in the kernels' layouts) are loaded with the TVM runtime
alone (no torch, no compiler). Activations, the KV cache (per layer: keys [kv_heads, head_dim, context], values
[kv_heads, context, head_dim]) and the
scratch of attention are allocated once; Python calls the kernels layer by layer (5 calls per layer and one per
linear call: 4 when q|k|v and gate|up are fused, up to 7 for a mixed plan), which costs a few microseconds per
call. Which function each layer's linears call, on which packed operands and into which columns, META says
(`lowbit.codegen.tvm.decoder_linears`). The embedding lookup dequantizes the token's row of the tied int8 LM head in
numpy. Logits agree with the numpy runtime (`DecoderModel`) to float32 rounding: the kernels sum in other orders
and fold zero points as q * s + (-z * s).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import LowbitError
from .loader import host_features, use_threads

LIBRARY = "decoder.so"
PACKED = "decoder_tvm.safetensors"
META = "decoder_tvm.json"
TVM_DECODER_FORMAT = "lowbit-tvm-decoder-v2"  # v2: per-linear functions and calls listed in META
LANES = 8
LINEAR_SLOTS = ("qkv", "o", "gate_up", "down")  # a block's linears in the order they run, by output buffer


def has_tvm_library(directory: Path) -> bool:
    return (directory / LIBRARY).is_file() and (directory / META).is_file()


def read_tvm_meta(directory: Path) -> dict[str, Any]:
    """DIR/decoder_tvm.json, checked against this CPU (its files' hashes are the manifest's business)."""
    path = directory / META
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise LowbitError(f"{path}: cannot read: {e}") from e
    if not isinstance(meta, dict) or meta.get("format") != TVM_DECODER_FORMAT:
        raise LowbitError(f"{path}: not a {TVM_DECODER_FORMAT} description; quantize the model again")
    missing = sorted(set(meta["required_features"]) - set(host_features()))
    if missing:
        raise LowbitError(f"{directory / LIBRARY} was compiled for {meta['target_string']!r}, which uses "
                          f"{', '.join(missing)}, and this CPU lacks them; run with the numpy runtime "
                          "(backend='numpy') or quantize again on this machine")
    return meta


def embedding_rows(w: np.ndarray, scale: np.ndarray, neg_zs: np.ndarray, ids: np.ndarray, group: int) -> np.ndarray:
    """Rows `ids` of the int8 LM head, dequantized from the GEMV's layout (w int32 [N / 8, K / 4, 8]: a lane's
    words, read as little-endian bytes, are its row of q): float32 [len(ids), K]."""
    ob, lane = ids // LANES, ids % LANES
    q = np.ascontiguousarray(w[ob, :, lane]).view(np.uint8).astype(np.float32)
    cols = np.arange(q.shape[1]) // group
    return q * scale[ob, :, lane][:, cols] + neg_zs[ob, :, lane][:, cols]


class TvmDecoder:
    """The compiled decode step and prefill of DIR: `prefill(ids)` starts a sequence, `step(token)` extends it;
    both return the float32 logits [vocab] of the last position."""

    def __init__(self, directory: str | Path, threads: int | None = None) -> None:
        """Load DIR's kernels; `threads` sizes TVM's pool (default: the cores the kernels were compiled for, which
        is also how many tasks each parallel kernel splits into)."""
        import tvm
        from safetensors.numpy import load_file

        directory = Path(directory)
        meta = read_tvm_meta(directory)
        self.shapes = s = meta["shapes"]
        use_threads(threads or int(s["threads"]))
        try:
            library = tvm.runtime.load_module(str(directory / LIBRARY))
            arrays = load_file(str(directory / PACKED))
        except Exception as e:  # TVM and safetensors raise several types for a damaged file
            raise LowbitError(f"{directory}: cannot load the TVM decoder ({LIBRARY}, {PACKED}): {e}") from e
        self.context, self.chunk = int(s["context"]), int(s["chunk"])
        rows = sorted({1, self.chunk})
        try:
            self._fn = {name: library[name] for name in (
                "lm_head", *(f"{k}_{m}" for m in rows for k in ("norm", "final_norm", "rope_cache", "attention",
                                                                  "silu")),
                *(f"{f}_{m}" for m in rows for f in meta["functions"]))}
        except (AttributeError, KeyError) as e:  # TVM raises AttributeError for a missing function
            raise LowbitError(f"{directory / LIBRARY} lacks a function {META} names ({e}); quantize again") from e

        def t(a: np.ndarray) -> Any:
            return tvm.runtime.tensor(np.ascontiguousarray(a))

        def operands(prefix: str, names: list[str] = ["w", "scale", "neg_zs"]) -> list[Any]:  # noqa: B006
            return [t(arrays[f"{prefix}.{k}"]) for k in names]

        self._layers = []
        for i, spec in enumerate(meta["layers"]):
            p = f"layers.{i}"
            packed = {c["operands"]: operands(c["operands"], c["operand_names"]) for slot in LINEAR_SLOTS
                      for c in spec[slot]}
            # per row count, per slot: (function, operands, () or (first output column,)) of each call
            calls = {m: {slot: [(self._fn[f"{c['function']}_{m}"], packed[c["operands"]],
                                 () if c["col"] is None else (int(c["col"]),)) for c in spec[slot]]
                         for slot in LINEAR_SLOTS} for m in rows}
            self._layers.append({"in_norm": t(arrays[f"{p}.input_layernorm.weight"]),
                                 "post_norm": t(arrays[f"{p}.post_attention_layernorm.weight"]), "calls": calls})
        self._head = operands("lm_head")
        self._final_norm = t(arrays["norm.weight"])
        self._embedding = [arrays[f"lm_head.{k}"] for k in ("w", "scale", "neg_zs")]
        head_dim = int(s["hidden"]) // int(s["heads"])
        inv_freq = float(json.loads((directory / "config.json").read_text())["rope_theta"]) ** (
            -np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
        angles = np.arange(self.context, dtype=np.float64)[:, None] * inv_freq[None, :]
        self._cos, self._sin = t(np.cos(angles).astype(np.float32)), t(np.sin(angles).astype(np.float32))
        kv = int(s["kv_heads"])  # keys transposed [kv, head_dim, context]: attention scores contiguous keys
        self._cache = [(tvm.runtime.empty((kv, head_dim, self.context), "float32"),
                        tvm.runtime.empty((kv, self.context, head_dim), "float32")) for _ in self._layers]
        self._buffers = {m: self._activations(m) for m in sorted({1, self.chunk})}
        self._logits = tvm.runtime.empty((1, -(-int(s["vocab"]) // LANES) * LANES), "float32")  # padded rows
        self._last = tvm.runtime.empty((1, int(s["hidden"])), "float32")
        self.position = 0

    def _activations(self, m: int) -> dict[str, Any]:
        import tvm

        s = self.shapes
        hidden, heads, inter = int(s["hidden"]), int(s["heads"]), int(s["intermediate"])
        qkv = hidden + 2 * int(s["kv_heads"]) * (hidden // heads)
        sizes = {"x": hidden, "h": hidden, "qkv": qkv, "q": hidden, "att": hidden, "gu": 2 * inter, "act": inter}
        buffers = {k: tvm.runtime.empty((m, n), "float32") for k, n in sizes.items()}
        buffers["scores"] = tvm.runtime.empty((m * heads, self.context), "float32")
        return buffers

    def prefill(self, ids: np.ndarray) -> np.ndarray:
        """Start a new sequence with token ids [t]; the logits after its last token."""
        self.reset()
        return self.extend(ids)

    def reset(self) -> None:
        """Forget the sequence (the next `extend` starts at position 0; `prefill` does this itself)."""
        self.position = 0

    def step(self, token: int) -> np.ndarray:
        """Feed one token after the sequence so far; the logits after it."""
        return self.extend(np.array([token], np.int64))

    def extend(self, ids: np.ndarray) -> np.ndarray:
        """Feed ids [t] after the sequence so far: full chunks through the prefill kernels, the rest (and any
        chunk that would pass the context's end) one token at a time."""
        ids = np.asarray(ids, np.int64).reshape(-1)
        if len(ids) == 0:
            raise LowbitError("no tokens to feed")
        if self.position + len(ids) > self.context:
            raise LowbitError(f"{self.position} cached + {len(ids)} new tokens exceed the context length "
                              f"{self.context}")
        vocab = int(self.shapes["vocab"])
        if len(ids) and (ids.min() < 0 or ids.max() >= vocab):
            raise LowbitError(f"token ids must lie in [0, {vocab}), got {ids.min()}..{ids.max()}")
        done = 0
        while done < len(ids):
            m = self.chunk if len(ids) - done >= self.chunk else 1
            self._forward(ids[done:done + m], m)
            done += m
        self._fn[f"final_norm_{m}"](self._buffers[m]["x"], self._final_norm, self._last, m - 1)
        self._fn["lm_head"](self._last, *self._head, self._logits)
        return self._logits.numpy()[0, :vocab]

    @property
    def calls_per_token(self) -> int:
        """Kernel calls of one decode step: 5 per layer and its linears' calls, the final norm and the LM head."""
        return sum(5 + sum(len(c) for c in layer["calls"][1].values()) for layer in self._layers) + 2

    def call_us(self, repeats: int = 10000) -> float:
        """Microseconds per call of the cheapest kernel (a one-row RMSNorm): nearly all of it the Python loop's
        and the FFI's own cost, which `calls_per_token` multiplies."""
        import time

        b, layer, norm = self._buffers[1], self._layers[0], self._fn["norm_1"]
        start = time.perf_counter()
        for _ in range(repeats):
            norm(b["x"], layer["in_norm"], b["h"], 0)
        return (time.perf_counter() - start) / repeats * 1e6

    def _forward(self, ids: np.ndarray, m: int) -> None:
        b, f, pos = self._buffers[m], self._fn, self.position
        norm, rope, attention, silu = f[f"norm_{m}"], f[f"rope_cache_{m}"], f[f"attention_{m}"], f[f"silu_{m}"]
        x, h = b["x"], b["h"]
        x.copyfrom(embedding_rows(*self._embedding, ids, int(self.shapes["embedding_group"])))
        for layer, (keys, values) in zip(self._layers, self._cache, strict=True):
            calls = layer["calls"][m]
            norm(x, layer["in_norm"], h, 0)
            for fn, w, col in calls["qkv"]:
                fn(h, *w, b["qkv"], *col)
            rope(b["qkv"], self._cos, self._sin, keys, values, b["q"], pos)
            attention(b["q"], keys, values, b["scores"], b["att"], pos)
            for fn, w, col in calls["o"]:
                fn(b["att"], *w, x, *col)
            norm(x, layer["post_norm"], h, 0)
            for fn, w, col in calls["gate_up"]:
                fn(h, *w, b["gu"], *col)
            silu(b["gu"], b["act"])
            for fn, w, col in calls["down"]:
                fn(b["act"], *w, x, *col)
        self.position += m


def tvm_decode_runner(directory: str | Path) -> TvmDecoder:
    """The TVM decoder of artifact DIR after checking its files against the manifest: `.prefill(ids)` and
    `.step(token)` return the last position's logits (for benchmarks that drive decoding themselves)."""
    from .decoder import verify_decoder_files

    verify_decoder_files(Path(directory))
    if not has_tvm_library(Path(directory)):
        raise LowbitError(f"{directory}: no {LIBRARY}; quantize with TVM installed to build the decode kernels")
    return TvmDecoder(directory)
