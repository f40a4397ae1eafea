"""ONNX export of a Llama decoder with group-wise weights (`decoder.onnx`), which ONNX Runtime runs with a KV cache.

Interface, batch 1, with Hugging Face optimum's decoder-with-past names:
- inputs: ``input_ids`` int64 [1, t]; ``past_key_values.{i}.key`` and ``.value`` float32 [1, kv_heads, past,
  head_dim] for every layer i (past may be 0: a prefill feeds empty arrays);
- outputs: ``logits`` float32 [1, t, vocab]; ``present.{i}.key`` and ``.value`` [1, kv_heads, past + t, head_dim],
  the next call's past.
Token j of the call sits at position past + j (read from the cache's shape), so there is no position input.

Weights: a group-wise weight of 2, 4 or 8 bits whose group is a power of two >= 16 becomes one com.microsoft
`MatMulNBits` (block_size = the group, uint8 zero points; 8 bits only at accuracy_level 4, see
`fits_matmul_nbits`), whose layout is `GroupWiseWeights`' own: values packed low bits first, one row after another,
zero points packed the same way, float32 scales [out, groups]. The one difference is that MatMulNBits stores whole
blocks, so a row whose last group is a shorter tail group (576 columns in groups of 128) gets zero bytes appended
up to the block boundary; the kernel reads only K columns. Any other weight (3 bits: ORT accepts 2, 4 and 8 only;
8 bits at accuracy_level 0; another group; VQ) is a plain float32 MatMul whose [K, N] table the graph computes
from the stored integers (one byte per value, zero points and scales) or VQ indices (one byte per vector and
stage, codewords and row scales), the artifact's own dequantization: every input of that computation is a
constant, so ONNX Runtime folds it into a float table when the session is created. The file keeps the compact
weights (SmolLM2 vq2: 64 MB, not 540), the run gets a float MatMul. A float array stays a float initializer (so
that ORT's MatMulNBitsQuantizer can quantize an FP32 export). The token embedding gathers the rows of the same
packed table as the (tied) LM head's MatMulNBits and dequantizes those t rows in the graph, or, when the tied LM
head is a float MatMul, the columns of its [hidden, vocab] table. The rest (RMSNorm, rotary,
grouped-query attention, SiLU) is standard opset-21 ops in float32, as in `lowbit.runtime.decoder`, which this
graph is checked against (`check_decoder_onnx`). `accuracy_level` 0 (the artifact's decoder.onnx) keeps float32
arithmetic, so the check holds to 1e-4; 4 quantizes activations to int8 inside MatMulNBits, about 2.5x faster
on 4-bit weights, but measured 6.5% of the largest |logit| away from the float model on SmolLM2.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import ModelProto, TensorProto, helper

from ... import __version__
from ...errors import LowbitError
from ...io import atomic_file
from ...ir.groupwise_weights import GroupWiseWeights, n_groups, pack_bits, packed_bytes
from ...ir.vq_weights import VQWeights
from ...ir.weight_formats import QuantizedWeights
from .builder import ONNX_IR_VERSION, OPSET, Builder

MS_DOMAIN = "com.microsoft"
NBITS = (2, 4, 8)  # what ORT's CPU MatMulNBits accepts (1.32 refuses 3 bits at session creation)
# ORT logits against the numpy runtime's, as a fraction of the largest |logit|: measured 2.4e-6 on SmolLM2
# int4 g128 (summation order only), so 1e-4 still catches a wrong packing or zero point by orders of magnitude.
LOGIT_TOLERANCE = 1e-4
LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
           "mlp.up_proj", "mlp.down_proj")
EMBEDDING = "embed_tokens.weight"

Weight = QuantizedWeights | np.ndarray


def fits_matmul_nbits(w: Weight, accuracy_level: int = 0) -> bool:
    """Whether `w` goes to MatMulNBits as stored (else it is exported dequantized, as a float MatMul).

    Not 8 bits at accuracy_level 0: ORT 1.32 has no float-arithmetic kernel for 8-bit MatMulNBits and falls back
    to something about 35x slower than a float MatMul (measured on SmolLM2's LM head, [576 -> 49152], 2 threads:
    1.5 s against 65 ms); at accuracy_level 4 (int8 activations) it is fast."""
    return (isinstance(w, GroupWiseWeights) and w.bits in NBITS and w.group >= 16
            and w.group & (w.group - 1) == 0 and (w.bits != 8 or accuracy_level >= 4))


def matmul_nbits_tensors(w: GroupWiseWeights) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """MatMulNBits' B uint8 [N, blocks, block bytes], scales float32 [N * blocks] and packed zero points uint8
    [N * ceil(blocks * bits / 8)] of `w` [N, K]: its own packing, each row padded with zeros to whole blocks.
    A float-minimum grid gives float32 zero points -m / s instead (MatMulNBits takes zero points of A's type)."""
    out, k = w.shape
    blocks = n_groups(k, w.group)
    values = np.zeros((out, blocks * w.group), np.uint8)
    values[:, :k] = w.values
    b = pack_bits(values, w.bits).reshape(out, blocks, w.group * w.bits // 8)
    scales = np.ascontiguousarray(w.scale, np.float32)
    if w.minimum is not None:
        return b, scales.reshape(-1), (-w.minimum.astype(np.float32) / scales).reshape(-1)
    return b, scales.reshape(-1), pack_bits(w.zero, w.bits).reshape(-1)


class _Graph(Builder):
    """The CNN exporters' name-checked builder, without an IR graph behind it."""

    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[TensorProto] = []
        self._names: set[str] = set()

    def i64(self, name: str, *values: int) -> str:
        return self.const(name, np.array(values, np.int64))

    def f32(self, name: str, value: float) -> str:
        return self.const(name, np.array(value, np.float32))


def decoder_onnx(config: Mapping[str, Any], weights: Mapping[str, Weight], accuracy_level: int = 0,
                 doc: str = "") -> ModelProto:
    """The ONNX model of a Llama decoder (`config`: LlamaConfig's fields; `weights`: parameter name -> group-wise
    weights or a float32 array, norms included). `accuracy_level` is MatMulNBits' (0: float32 arithmetic, as the
    check needs; 4: int8 activations, faster)."""
    c = dict(config)
    layers, heads, kv_heads = int(c["num_layers"]), int(c["num_heads"]), int(c["num_kv_heads"])
    hidden, vocab = int(c["hidden_size"]), int(c["vocab_size"])
    head_dim = hidden // heads
    missing = [n for n in _parameter_names(layers, bool(c["tie_embeddings"])) if n not in weights]
    if missing:
        raise LowbitError(f"decoder ONNX export: no weights for {', '.join(missing[:5])}"
                          f"{' ...' if len(missing) > 5 else ''}; the artifact is incomplete")
    g = _Graph()
    eps = g.f32("rms_eps", float(c["rms_norm_eps"]))
    inv_freq = float(c["rope_theta"]) ** (-np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    angles = np.arange(int(c["context_length"]), dtype=np.float64)[:, None] * inv_freq[None, :]
    g.const("rope_cos", np.cos(angles).astype(np.float32))
    g.const("rope_sin", np.sin(angles).astype(np.float32))

    # Positions past .. past + t - 1, from the first layer's cache length.
    past = g.node("Squeeze", [g.node("Shape", ["past_key_values.0.key"], "past_len", start=2, end=3)], "past")
    t = g.node("Squeeze", [g.node("Shape", ["input_ids"], "new_len", start=1, end=2)], "t")
    total = g.node("Add", [past, t], "total")
    one = g.const("one", np.array(1, np.int64))
    positions = g.node("Range", [past, total, one], "positions")
    cos = g.node("Reshape", [g.node("Gather", ["rope_cos", positions], "cos_t"),
                             g.i64("rope_shape", 1, -1, 1, head_dim // 2, 1)], "cos")
    sin = g.node("Reshape", [g.node("Gather", ["rope_sin", positions], "sin_t"),
                             g.i64("rope_shape_sin", 1, -1, 1, head_dim // 2, 1)], "sin")
    # Query row r of a KV head's block is query head r // t of the group at position positions[r % t].
    group = heads // kv_heads
    key_index = g.node("Range", [g.const("zero", np.array(0, np.int64)), total, one], "key_index")
    query_pos = g.node("Unsqueeze", [g.node("Tile", [positions, g.i64("group_repeats", group)], "query_pos_flat"),
                                     g.i64("axis_last", -1)], "query_pos")
    future = g.node("Greater", [key_index, query_pos], "future")
    attention = _Attention(g, heads, kv_heads, head_dim, hidden, cos, sin, future)

    head = EMBEDDING if c["tie_embeddings"] else "lm_head.weight"
    if c["tie_embeddings"] and not fits_matmul_nbits(weights[head], accuracy_level):
        x = _float_tied_embedding(g, weights[head])
    else:
        x = _embedding(g, weights[EMBEDDING], hidden, accuracy_level)
    for i in range(layers):
        p = f"layers.{i}."
        h = _rms_norm(g, f"{p}input_layernorm", x, weights[f"{p}input_layernorm.weight"], eps)
        x = g.node("Add", [x, attention(i, h, weights, accuracy_level)], f"{p}attn_residual")
        h = _rms_norm(g, f"{p}post_attention_layernorm", x, weights[f"{p}post_attention_layernorm.weight"], eps)
        gate = _linear(g, f"{p}mlp.gate_proj", h, weights, f"{p}mlp.gate_proj.weight", accuracy_level)
        silu = g.node("Mul", [gate, g.node("Sigmoid", [gate], f"{p}mlp.sigmoid")], f"{p}mlp.silu")
        up = _linear(g, f"{p}mlp.up_proj", h, weights, f"{p}mlp.up_proj.weight", accuracy_level)
        down = _linear(g, f"{p}mlp.down_proj", g.node("Mul", [silu, up], f"{p}mlp.gated"),
                       weights, f"{p}mlp.down_proj.weight", accuracy_level)
        x = g.node("Add", [x, down], f"{p}mlp_residual")
    x = _rms_norm(g, "norm", x, weights["norm.weight"], eps)
    _linear(g, "lm_head", x, weights, head, accuracy_level, output="logits")

    cache = ["batch", kv_heads, "past", head_dim]
    present = ["batch", kv_heads, "total", head_dim]
    inputs = [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "t"])]
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", "t", vocab])]
    for i in range(layers):
        for kind in ("key", "value"):
            inputs.append(helper.make_tensor_value_info(f"past_key_values.{i}.{kind}", TensorProto.FLOAT, cache))
            outputs.append(helper.make_tensor_value_info(f"present.{i}.{kind}", TensorProto.FLOAT, present))
    graph = helper.make_graph(g.nodes, "lowbit_decoder", inputs, outputs, g.initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid(MS_DOMAIN, 1)],
                              ir_version=ONNX_IR_VERSION, producer_name="lowbit", producer_version=__version__,
                              doc_string=doc)
    onnx.checker.check_model(model)  # full_check's shape inference does not know MatMulNBits
    return model


def _parameter_names(layers: int, tied: bool) -> list[str]:
    names = [EMBEDDING, "norm.weight"] + ([] if tied else ["lm_head.weight"])
    for i in range(layers):
        names += [f"layers.{i}.{n}.weight" for n in (*LINEARS, "input_layernorm", "post_attention_layernorm")]
    return names


def _float(w: Weight) -> np.ndarray:
    return np.asarray(w, np.float32) if isinstance(w, np.ndarray) else w.dequantize()


def _packed(g: _Graph, key: str, w: GroupWiseWeights) -> tuple[str, str, str]:
    """The MatMulNBits initializers of parameter `key`, made once however many nodes read them (the tied
    embedding)."""
    if f"{key}/B" not in g._names:
        b, scales, zeros = matmul_nbits_tensors(w)
        g.const(f"{key}/B", b), g.const(f"{key}/scales", scales), g.const(f"{key}/zero_points", zeros)
    return f"{key}/B", f"{key}/scales", f"{key}/zero_points"


def _linear(g: _Graph, name: str, x: str, weights: Mapping[str, Weight], param: str, accuracy_level: int,
            output: str | None = None) -> str:
    """x [1, t, K] @ w.T for the weight w [N, K] of parameter `param`: MatMulNBits where it fits, else a float
    MatMul."""
    w = weights[param]
    out = output or f"{name}.out"
    if fits_matmul_nbits(w, accuracy_level):
        assert isinstance(w, GroupWiseWeights)
        n, k = w.shape
        return g.node("MatMulNBits", [x, *_packed(g, param, w)], out, domain=MS_DOMAIN, K=k, N=n, bits=w.bits,
                      block_size=w.group, accuracy_level=accuracy_level)
    return g.node("MatMul", [x, _float_table(g, param, w)], out)


def _float_table(g: _Graph, param: str, w: Weight) -> str:
    """The float32 [K, N] table of weight w [N, K], made once per parameter (the tied embedding reads the LM
    head's): a float array as an initializer, quantized weights dequantized in the graph (module docstring)."""
    name = f"{param}/weight_t"
    if name in g._names:
        return name
    if isinstance(w, np.ndarray):
        return g.const(name, np.ascontiguousarray(np.asarray(w, np.float32).T))
    n, k = w.shape
    if isinstance(w, VQWeights):
        rows = None
        for s, stage in enumerate(w.stages):  # the sum of the stages' codewords, as VQWeights.dequantize
            dtype = np.uint8 if stage.bits <= 8 else np.uint16
            index = g.node("Cast", [g.const(f"{param}/indices{s}", stage.indices.astype(dtype))], f"{param}/idx{s}",
                           to=TensorProto.INT64)
            words = g.node("Gather", [g.const(f"{param}/codewords{s}", stage.codewords()), index], f"{param}/cw{s}")
            rows = words if rows is None else g.node("Add", [rows, words], f"{param}/sum{s}")
        flat = g.node("Reshape", [rows, g.i64(f"{param}/shape", n, k)], f"{param}/unscaled")
        table = g.node("Mul", [flat, g.const(f"{param}/row_scale", w.row_scale[:, None])], f"{param}/table")
        return g.node("Transpose", [table], name, perm=[1, 0])
    assert isinstance(w, GroupWiseWeights)
    groups = n_groups(k, w.group)
    values = np.zeros((n, groups * w.group), np.uint8)  # whole groups: the tail group padded, sliced off below
    values[:, :k] = w.values
    v = g.node("Reshape", [g.node("Cast", [g.const(f"{param}/values", values)], f"{param}/v", to=TensorProto.FLOAT),
                           g.i64(f"{param}/grouped", n, groups, w.group)], f"{param}/v_grouped")
    scale = g.const(f"{param}/scales", w.scale.astype(np.float32)[:, :, None])
    if w.minimum is not None:  # as GroupWiseWeights.dequantize: v * s + m, or (v - z) * s
        table = g.node("Add", [g.node("Mul", [v, scale], f"{param}/scaled"),
                               g.const(f"{param}/mins", w.minimum.astype(np.float32)[:, :, None])], f"{param}/table")
    else:
        zero = g.node("Cast", [g.const(f"{param}/zeros", w.zero[:, :, None])], f"{param}/z", to=TensorProto.FLOAT)
        table = g.node("Mul", [g.node("Sub", [v, zero], f"{param}/centered"), scale], f"{param}/table")
    flat = g.node("Reshape", [table, g.i64(f"{param}/padded", n, groups * w.group)], f"{param}/flat")
    used = g.node("Slice", [flat, g.i64(f"{param}/from", 0), g.i64(f"{param}/to", k), g.i64(f"{param}/axis", 1)],
                  f"{param}/used")
    return g.node("Transpose", [used], name, perm=[1, 0])


def _float_tied_embedding(g: _Graph, w: Weight) -> str:
    """Rows of a tied embedding whose LM head is a float MatMul: columns of that MatMul's [hidden, vocab] table,
    so the table is stored once."""
    table = _float_table(g, EMBEDDING, w)
    columns = g.node("Gather", [table, g.node("Squeeze", ["input_ids", g.i64("batch_axis", 0)], "ids")],
                     "embed/columns", axis=1)  # [hidden, t]
    return g.node("Unsqueeze", [g.node("Transpose", [columns], "embed/rows", perm=[1, 0]), g.i64("embed/batch", 0)],
                  "embedded")


def _embedding(g: _Graph, w: Weight, hidden: int, accuracy_level: int) -> str:
    """Rows of the embedding for input_ids, [1, t, hidden] float32."""
    if not fits_matmul_nbits(w, accuracy_level):
        return g.node("Gather", [g.const("embed_tokens.table", _float(w)), "input_ids"], "embedded")
    assert isinstance(w, GroupWiseWeights)
    b, scales, zeros = _packed(g, EMBEDDING, w)
    blocks = n_groups(hidden, w.group)
    rows = g.node("Gather", [b, "input_ids"], "embed/rows")  # [1, t, blocks, block bytes]
    values = _unpack(g, "embed/values", rows, w.bits, [1, -1, blocks, w.group])
    per_row = g.node("Reshape", [zeros, g.i64("embed/zp_rows", w.shape[0], -1)], "embed/zp_table")
    zero = _unpack(g, "embed/zero", g.node("Gather", [per_row, "input_ids"], "embed/zp_rows_t"), w.bits,
                   [1, -1, packed_bytes(blocks, w.bits) * 8 // w.bits])
    zero = g.node("Slice", [zero, g.i64("embed/zp_from", 0), g.i64("embed/zp_to", blocks), g.i64("embed/zp_axis", 2)],
                  "embed/zero_used")
    scale = g.node("Gather", [g.node("Reshape", [scales, g.i64("embed/scale_rows", w.shape[0], blocks)],
                                     "embed/scale_table"), "input_ids"], "embed/scale")
    last = g.i64("embed/last", -1)
    centered = g.node("Sub", [values, g.node("Unsqueeze", [zero, last], "embed/zero_b")], "embed/centered")
    dequantized = g.node("Mul", [centered, g.node("Unsqueeze", [scale, last], "embed/scale_b")], "embed/dequantized")
    flat = g.node("Reshape", [dequantized, g.i64("embed/flat", 1, -1, blocks * w.group)], "embed/padded")
    return g.node("Slice", [flat, g.i64("embed/from", 0), g.i64("embed/to", hidden), g.i64("embed/axis", 2)],
                  "embedded")


def _unpack(g: _Graph, name: str, packed: str, bits: int, shape: list[int]) -> str:
    """uint8 bytes holding 8 / bits values each, low bits first -> float32 values, reshaped to `shape`."""
    if bits == 8:
        return g.node("Cast", [g.node("Reshape", [packed, g.i64(f"{name}/shape", *shape)], f"{name}/u8")],
                      f"{name}/float", to=TensorProto.FLOAT)
    mask = g.const(f"{name}/mask", np.array((1 << bits) - 1, np.uint8))
    parts = []
    for j in range(8 // bits):
        shifted = g.node("BitShift", [packed, g.const(f"{name}/by{j}", np.array(j * bits, np.uint8))],
                         f"{name}/shift{j}", direction="RIGHT")
        parts.append(g.node("Unsqueeze", [g.node("BitwiseAnd", [shifted, mask], f"{name}/part{j}"),
                                          g.i64(f"{name}/axis{j}", -1)], f"{name}/part{j}_u"))
    together = g.node("Concat", parts, f"{name}/parts", axis=-1)
    return g.node("Cast", [g.node("Reshape", [together, g.i64(f"{name}/shape", *shape)], f"{name}/u8")],
                  f"{name}/float", to=TensorProto.FLOAT)


def _rms_norm(g: _Graph, name: str, x: str, gain: Weight, eps: str) -> str:
    # Pow/ReduceMean/Add/Sqrt/Div/Mul: the pattern ORT fuses into SimplifiedLayerNormalization.
    square = g.node("Pow", [x, g.f32(f"{name}/two", 2.0)], f"{name}/square")
    mean = g.node("ReduceMean", [square, g.i64(f"{name}/axes", -1)], f"{name}/mean", keepdims=1)
    root = g.node("Sqrt", [g.node("Add", [mean, eps], f"{name}/plus_eps")], f"{name}/root")
    return g.node("Mul", [g.node("Div", [x, root], f"{name}/normed"), g.const(f"{name}.weight", _float(gain))],
                  f"{name}/out")


class _Attention:
    """Grouped-query attention over the cache: each KV head's G query heads are one [G * t, head_dim] block."""

    def __init__(self, g: _Graph, heads: int, kv_heads: int, head_dim: int, hidden: int, cos: str, sin: str,
                 future: str) -> None:
        self.g, self.heads, self.kv_heads, self.d, self.hidden = g, heads, kv_heads, head_dim, hidden
        self.cos, self.sin, self.future = cos, sin, future
        self.scale = g.f32("attn_scale", head_dim ** -0.5)
        self.neg_inf = g.f32("neg_inf", -np.inf)

    def __call__(self, i: int, x: str, weights: Mapping[str, Weight], accuracy_level: int) -> str:
        g, d, p = self.g, self.d, f"layers.{i}.self_attn."

        def project(kind: str, n_heads: int, rotate: bool) -> str:
            y = _linear(g, f"{p}{kind}_proj", x, weights, f"{p}{kind}_proj.weight", accuracy_level)
            if rotate:
                y = self._rope(f"{p}{kind}", y, n_heads)
            y = g.node("Reshape", [y, g.i64(f"{p}{kind}/heads", 1, -1, n_heads, d)], f"{p}{kind}/split")
            return g.node("Transpose", [y], f"{p}{kind}/bhtd", perm=[0, 2, 1, 3])

        q, k, v = project("q", self.heads, True), project("k", self.kv_heads, True), project("v", self.kv_heads, False)
        keys = g.node("Concat", [f"past_key_values.{i}.key", k], f"present.{i}.key", axis=2)
        values = g.node("Concat", [f"past_key_values.{i}.value", v], f"present.{i}.value", axis=2)
        q = g.node("Reshape", [q, g.i64(f"{p}q/grouped", 1, self.kv_heads, -1, d)], f"{p}q/grouped_q")
        keys_t = g.node("Transpose", [keys], f"{p}keys_t", perm=[0, 1, 3, 2])
        scores = g.node("Mul", [g.node("MatMul", [q, keys_t], f"{p}qk"), self.scale], f"{p}scores")
        scores = g.node("Where", [self.future, self.neg_inf, scores], f"{p}masked")
        probs = g.node("Softmax", [scores], f"{p}probs", axis=-1)
        out = g.node("Reshape", [g.node("MatMul", [probs, values], f"{p}attended"),
                                 g.i64(f"{p}heads_back", 1, self.heads, -1, d)], f"{p}per_head")
        out = g.node("Reshape", [g.node("Transpose", [out], f"{p}bthd", perm=[0, 2, 1, 3]),
                                 g.i64(f"{p}merge", 1, -1, self.hidden)], f"{p}merged")
        return _linear(g, f"{p}o_proj", out, weights, f"{p}o_proj.weight", accuracy_level)

    def _rope(self, name: str, y: str, n_heads: int) -> str:
        """Rotate adjacent pairs (2i, 2i + 1) of each head, llama.cpp's q/k layout (as runtime/decoder.py)."""
        g = self.g
        pairs = g.node("Reshape", [y, g.i64(f"{name}/pairs_shape", 1, -1, n_heads, self.d // 2, 2)], f"{name}/pairs")
        x0, x1 = f"{name}/x0", f"{name}/x1"
        g._claim(x0), g._claim(x1)
        g.nodes.append(helper.make_node("Split", [pairs, g.i64(f"{name}/halves", 1, 1)], [x0, x1],
                                        name=f"{name}/pair_split", axis=-1))
        c, s = self.cos, self.sin
        r0 = g.node("Sub", [g.node("Mul", [x0, c], f"{name}/x0c"), g.node("Mul", [x1, s], f"{name}/x1s")], f"{name}/r0")
        r1 = g.node("Add", [g.node("Mul", [x0, s], f"{name}/x0s"), g.node("Mul", [x1, c], f"{name}/x1c")], f"{name}/r1")
        rotated = g.node("Concat", [r0, r1], f"{name}/rotated", axis=-1)
        return g.node("Reshape", [rotated, g.i64(f"{name}/flat", 1, -1, n_heads * self.d)], f"{name}/rope")


def save_decoder_onnx(model: ModelProto, path: Path) -> None:
    """Write `model` atomically (it stays under protobuf's 2 GB: no external data)."""
    with atomic_file(path, "wb") as f:
        f.write(model.SerializeToString())


class OrtDecoder:
    """`decoder.onnx` in ONNX Runtime: `logits(ids, cache)` like `DecoderModel.logits`, the cache a list of
    [key, value] per layer that each call replaces with the model's present tensors."""

    def __init__(self, path: str | Path, threads: int = 0) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        try:
            self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        except Exception as e:  # ORT raises its own exception types for a model it cannot load
            raise LowbitError(f"{path}: ONNX Runtime cannot load it: {e}") from e
        names = [i.name for i in self.session.get_inputs()]
        self.layers = sum(1 for n in names if n.endswith(".key"))
        shape = self.session.get_inputs()[1].shape
        self.kv_heads, self.head_dim = int(shape[1]), int(shape[3])

    def new_cache(self) -> list[list[np.ndarray]]:
        empty = np.zeros((1, self.kv_heads, 0, self.head_dim), np.float32)
        return [[empty, empty] for _ in range(self.layers)]

    def logits(self, ids: np.ndarray, cache: list[list[np.ndarray]] | None = None) -> np.ndarray:
        """float32 logits [t, vocab] of token ids [t] after the `cache`'s tokens (which it extends)."""
        cache = self.new_cache() if cache is None else cache
        feed: dict[str, np.ndarray] = {"input_ids": np.asarray(ids, np.int64).reshape(1, -1)}
        for i, (k, v) in enumerate(cache):
            feed[f"past_key_values.{i}.key"], feed[f"past_key_values.{i}.value"] = k, v
        logits, *present = self.session.run(None, feed)
        for i in range(self.layers):
            cache[i][0], cache[i][1] = present[2 * i], present[2 * i + 1]
        return logits[0]


def check_decoder_onnx(path: Path, reference: Callable[[np.ndarray], np.ndarray], ids: np.ndarray,
                       tolerance: float = LOGIT_TOLERANCE) -> dict[str, Any]:
    """Compare `path`'s logits in ORT with `reference(ids)` [t, vocab] on `ids`: the first half in one prefill,
    the rest one token at a time through the cache. A LowbitError when the largest difference exceeds `tolerance`
    times the largest |reference logit|; else the figures, for the manifest."""
    ids = np.asarray(ids, np.int64).reshape(-1)
    expected = reference(ids)
    runner = OrtDecoder(path, threads=1)
    cache = runner.new_cache()
    split = max(1, len(ids) // 2)
    got = np.concatenate([runner.logits(ids[:split], cache)]
                         + [runner.logits(ids[j:j + 1], cache) for j in range(split, len(ids))])
    scale = float(np.abs(expected).max())
    diff = float(np.abs(got - expected).max()) if got.shape == expected.shape else float("inf")
    result = {"tokens": len(ids), "prefill_tokens": split, "max_abs_diff": diff, "max_abs_logit": scale,
              "tolerance": tolerance}
    if not diff <= tolerance * scale:
        raise LowbitError(f"{path.name}: ONNX Runtime's logits differ from the numpy runtime's by {diff:.3g} (largest "
                          f"|logit| {scale:.3g}; allowed {tolerance:g} of it) on {len(ids)} tokens; the export is "
                          "wrong (packing, zero points or the graph): nothing was written")
    return result
