"""lowbit's fast encoder kernels against their integer references, integer for integer, on edge rows: the AVX2
attention matmul (`x86.matmul_pairs`), the row-fused softmax and LayerNorm (`codegen.tvm.rows`), and the bounds
that decide when the row kernels may run (else the lowering keeps the generic kernels)."""

from __future__ import annotations

import numpy as np
import pytest

tvm = pytest.importorskip("tvm", reason="TVM backend tests need apache-tvm (pip install 'lowbit[tvm]')")

from lowbit.codegen.tvm import parse_target  # noqa: E402
from lowbit.codegen.tvm.compile import layer_kernels  # noqa: E402
from lowbit.codegen.tvm.rows import layer_norm_rows, softmax_row_plan, softmax_rows  # noqa: E402
from lowbit.codegen.tvm.x86 import matmul_pairs  # noqa: E402
from lowbit.ir.dyadic import dyadic  # noqa: E402
from lowbit.ir.ops.layer_norm import integer_layer_norm_int, layer_norm_constants  # noqa: E402
from lowbit.ir.ops.softmax import integer_softmax_int, softmax_constants  # noqa: E402

TARGET = parse_target("llvm -mcpu=native")
INT32_MIN = -(2**31)


def _run(func: tvm.tirx.PrimFunc, inputs: list[np.ndarray], out: np.ndarray) -> np.ndarray:
    lib = tvm.tirx.build(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}),
                         target=tvm.target.Target(TARGET))
    result = tvm.runtime.tensor(out)
    lib["main"](*[tvm.runtime.tensor(np.ascontiguousarray(a)) for a in inputs], result)
    return result.numpy()


def _draw(rng: np.random.Generator, shape: tuple[int, ...], dtype: str) -> np.ndarray:
    info = np.iinfo(dtype)
    x = rng.integers(info.min, int(info.max) + 1, shape).astype(dtype)
    x.reshape(-1)[0], x.reshape(-1)[-1] = info.min, info.max
    return x


@pytest.mark.skipif(layer_kernels(TARGET)[2] == "portable", reason="the x86 kernels need AVX2")
@pytest.mark.parametrize("dtypes", [("int8", "int8"), ("uint8", "int8"), ("int8", "uint8"), ("uint8", "uint8")])
@pytest.mark.parametrize(("lead", "m", "k", "n"), [((1, 3), 128, 32, 128), ((2, 1), 13, 37, 20), ((1, 1), 1, 1, 1)])
def test_matmul_pairs_is_exact(lead: tuple[int, ...], m: int, k: int, n: int, dtypes: tuple[str, str]) -> None:
    """Whole and partial 8-column blocks, row-tile tails, odd K; all-extreme operands (the largest sums); raw
    int32 and requantized to int8 (the epilogue clips at both ends)."""
    rng = np.random.default_rng(m * k + n)
    a, b = _draw(rng, (*lead, m, k), dtypes[0]), _draw(rng, (*lead, k, n), dtypes[1])
    a[..., 0, :], b[..., :, 0] = np.iinfo(dtypes[0]).min, np.iinfo(dtypes[1]).min
    acc = np.einsum("...mk,...kn->...mn", a.astype(np.int64), b.astype(np.int64))
    func, consts = matmul_pairs(a.shape, b.shape, *dtypes, None, num_threads=2)
    np.testing.assert_array_equal(_run(func, [a, b, *consts], np.zeros(acc.shape, np.int32)), acc)
    mantissa, shift = (int(v[0]) for v in dyadic(np.array([2e-3])))
    func, consts = matmul_pairs(a.shape, b.shape, *dtypes, (mantissa, shift, -128, 127, "int8"), num_threads=2)
    want = np.clip((acc * mantissa + (1 << shift >> 1)) >> shift, -128, 127)
    np.testing.assert_array_equal(_run(func, [a, b, *consts], np.zeros(acc.shape, np.int8)), want)


def test_softmax_row_plan_refuses_scores_too_fine_for_int32_rows() -> None:
    """At scale 1e-8 a key stays alive 2^31 units below the row max: x no longer fits int32 (generic kernel)."""
    assert softmax_row_plan(softmax_constants(1e-8), 128, 255) is None
    plan = softmax_row_plan(softmax_constants(3e-5), 128, 255)
    assert plan is not None and INT32_MIN < plan.x_min < 0 and plan.neg_v_max < 2**31



@pytest.mark.parametrize("scale", [3e-5, 1e-3, 2e-6])
@pytest.mark.parametrize("keys", [16, 13])
def test_softmax_rows_equal_the_reference_on_edge_rows(scale: float, keys: int) -> None:
    """Rows at int32's ends (the clamp at INT32_MIN), constant rows, masked keys above the max, a batch item
    with every key masked, nonzero mask values other than 1."""
    rng = np.random.default_rng(keys)
    shape = (3, 2, 6, keys)
    q = rng.integers(-(2**20), 2**20, shape).astype(np.int32)
    q[0, 0, 0], q[0, 0, 1], q[0, 0, 2] = INT32_MIN, 2**31 - 1, 7
    q[0, 0, 3] = rng.choice(np.array([INT32_MIN, 2**31 - 1], np.int32), keys)
    q[0, 1, 0] = INT32_MIN + rng.integers(0, 2**18, keys)
    mask = rng.integers(0, 2, (3, keys)).astype(np.int64)
    mask[1], mask[2, :3] = 0, (-1, 3, 1)
    c = softmax_constants(scale)
    for m in (mask, None):
        func = softmax_rows(shape, "int32", m is not None, c, "uint8", 2)
        assert func is not None
        got = _run(func, [q] if m is None else [q, m], np.zeros(shape, np.uint8))
        np.testing.assert_array_equal(got, integer_softmax_int(q, c, m))


@pytest.mark.parametrize(("width", "x_dtype", "eps"), [(384, "int16", 1e-12), (13, "int8", 0.0), (1000, "int16", 1e-5)])
def test_layer_norm_rows_equal_the_reference_on_edge_rows(width: int, x_dtype: str, eps: float) -> None:
    """Constant rows (W = E, or 0 with eps 0: r = 1), rows at the input's ends, one outlier; width 1000 of int16
    takes the centring shift k > 0."""
    rng = np.random.default_rng(width)
    gamma = rng.uniform(-2, 2, width)
    gamma[0] = 0.0
    bits = 8 * np.dtype(x_dtype).itemsize
    c = layer_norm_constants(width, bits, gamma, rng.uniform(-3, 3, width), eps, 1e-3 if bits == 16 else 0.05,
                             5.0 / 127)
    x = _draw(rng, (2, 5, width), x_dtype)
    info = np.iinfo(x_dtype)
    x[0, 1], x[0, 2], x[0, 3] = info.min, info.max, 0
    x[1, 0] = np.where(rng.random(width) < 0.5, info.min, info.max)
    x[1, 1] = 3
    x[1, 1, 5] = info.max
    kernel = layer_norm_rows(x.shape, x_dtype, c, "int8", 2)
    assert kernel is not None
    func, arrays = kernel
    np.testing.assert_array_equal(_run(func, [x, *arrays], np.zeros(x.shape, np.int8)), integer_layer_norm_int(x, c))


@pytest.mark.skipif(layer_kernels(TARGET)[2] == "portable", reason="the x86 kernels need AVX2")
@pytest.mark.parametrize(("k", "bits"), [(1540, 8), (4100, 4)])
def test_dense_in_k_chunks_is_exact(k: int, bits: int) -> None:
    """A register tile's weights past L1 (FFN-down's K = 1536) are swept in K chunks with the partial sums in a
    scratch buffer: the same integers, requantized or raw, with a row tail and a partial last column block."""
    from lowbit.codegen.tvm.x86 import dense
    from lowbit.codegen.tvm.x86.isa import Isa
    from lowbit.codegen.tvm.x86.plans import ConvGeometry, Epilogue, GemmPlan

    m, n = 13, 20
    plan = GemmPlan(ConvGeometry.of((m, 1, 1, k), (n, k, 1, 1), (1, 1), (0, 0, 0, 0), (1, 1)), 1, "int8", (m, k),
                    (m, n), Epilogue(True, -128, 127, "int8", False), Isa(), bits)
    assert plan.NKC > 1
    rng = np.random.default_rng(k)
    lo = -8 if bits == 4 else -127
    w = rng.integers(lo, -lo, (n, k)).astype(np.int8)
    w[0] = -lo - 1
    x = _draw(rng, (m, k), "int8")
    bias = rng.integers(-5000, 5000, n).astype(np.int32)
    acc = x.astype(np.int64) @ w.astype(np.int64).T + bias
    func, consts = dense((m, k), "int8", w, bias, None, None, 0, 0, "int32", weight_bits=bits, num_threads=2)
    np.testing.assert_array_equal(_run(func, [x, *consts], np.zeros((m, n), np.int32)), acc)
    mantissa, shift = dyadic(rng.uniform(1e-5, 1e-4, n))
    func, consts = dense((m, k), "int8", w, bias, mantissa, shift, -128, 127, "int8", weight_bits=bits, num_threads=2)
    want = np.clip((acc * mantissa + (np.int64(1) << shift >> 1)) >> shift, -128, 127)
    np.testing.assert_array_equal(_run(func, [x, *consts], np.zeros((m, n), np.int8)), want)


@pytest.mark.skipif(layer_kernels(TARGET)[2] == "portable", reason="the x86 kernels need AVX2")
def test_a_graph_rebatched_for_a_static_batch_build_computes_the_same_integers() -> None:
    """`QuantizedGraph.with_batch`: the scores -> masked softmax chain built by TVM for batch 3 gives the
    reference executor's integers for 3 samples at once (the benchmark's batch-8 build relies on it)."""
    from test_conformance import _inputs, _softmax_of_scores  # pytest puts tests/ on the path

    from lowbit.codegen.tvm.lower import lower
    from lowbit.quantizer.reference import run_reference

    rng = np.random.default_rng(3)
    qgraph = _softmax_of_scores(rng, "int8", 20)
    x = _inputs(qgraph, rng, samples=3)
    wide = qgraph.with_batch(3)
    assert all(v.shape[0] == 3 for v in wide.values.values()) and wide.ops is qgraph.ops
    want = run_reference(qgraph, x, integer_outputs=True)[qgraph.int_outputs[0]]
    lowered = lower(wide, integer_outputs=True, encoder_threads=2)
    vm = tvm.relax.VirtualMachine(tvm.compile(lowered.mod, target=tvm.target.Target(TARGET)), tvm.cpu())
    out = vm["main"](*[tvm.runtime.tensor(x[name]) for name in qgraph.inputs],
                     *[tvm.runtime.tensor(a) for a in lowered.params.values()])
    np.testing.assert_array_equal(out[len(lowered.outputs)].numpy(), want)


def _requantize(acc: np.ndarray, mantissa: np.ndarray, shift: np.ndarray, qmin: int, qmax: int) -> np.ndarray:
    return np.clip((acc * mantissa + (np.int64(1) << shift >> 1)) >> shift, qmin, qmax)


@pytest.mark.skipif(layer_kernels(TARGET)[2] == "portable", reason="the x86 kernels need AVX2")
@pytest.mark.parametrize(("x_dtype", "y_dtype", "k"), [("int8", "int8", 40), ("uint8", "uint8", 1540)])
@pytest.mark.parametrize("per_channel", [True, False])
def test_dense_with_a_fused_lut_is_exact(x_dtype: str, y_dtype: str, k: int, per_channel: bool) -> None:
    """The lut fused into a dense's epilogue (an encoder's GELU) reads the table at the requantized integers:
    one table per channel or one for all, a row tail, K in one chunk or several; refused where y can index
    outside the table."""
    from lowbit.codegen.tvm.kernel_api import Lut
    from lowbit.codegen.tvm.x86 import dense

    m, n = 13, 24
    rng = np.random.default_rng(k)
    w = rng.integers(-127, 128, (n, k)).astype(np.int8)
    x = _draw(rng, (m, k), x_dtype)
    bias = rng.integers(-5000, 5000, n).astype(np.int32)
    mantissa, shift = dyadic(rng.uniform(3e-3, 6e-3, n) * np.sqrt(40 / k))
    qmin, qmax = (int(v) for v in (np.iinfo(y_dtype).min, np.iinfo(y_dtype).max))
    y = _requantize(x.astype(np.int64) @ w.astype(np.int64).T + bias, mantissa, shift, qmin, qmax)
    assert qmin in y and qmax in y  # both table ends are read
    table = rng.integers(-128, 128, (n, 256) if per_channel else (256,)).astype(np.int8)
    offset = -qmin
    want = table[np.arange(n), y + offset] if per_channel else table[y + offset]
    lut = Lut(offset, 256 if per_channel else 0, table.size, "int8")
    func, consts = dense((m, k), x_dtype, w, bias, mantissa, shift, qmin, qmax, y_dtype, num_threads=2,
                         lut=(lut, table))
    np.testing.assert_array_equal(_run(func, [x, *consts], np.zeros((m, n), np.int8)), want)
    short = Lut(offset + 1, lut.row, lut.size, "int8")  # y = qmax would read past a channel's table
    assert dense((m, k), x_dtype, w, bias, mantissa, shift, qmin, qmax, y_dtype, num_threads=2,
                 lut=(short, table)) is None


@pytest.mark.skipif(layer_kernels(TARGET)[2] == "portable", reason="the x86 kernels need AVX2")
@pytest.mark.parametrize(("y_dtype", "skip_dtype", "k"), [("int16", "int8", 40), ("int8", "int16", 1540)])
@pytest.mark.parametrize("per_channel", ["skip", "y", None])
def test_dense_with_a_fused_add_is_exact(y_dtype: str, skip_dtype: str, k: int, per_channel: str | None) -> None:
    """The add fused into a dense's epilogue (an encoder's residual) computes the add's integers from the
    requantized y: scalar multipliers, or per-channel ones on either input (SmoothQuant's rescale)."""
    from lowbit.codegen.tvm.kernel_api import Residual
    from lowbit.codegen.tvm.x86 import dense

    m, n = 13, 24
    rng = np.random.default_rng(k + 7)
    w = rng.integers(-127, 128, (n, k)).astype(np.int8)
    x = _draw(rng, (m, k), "int8")
    skip = _draw(rng, (m, n), skip_dtype)
    bias = rng.integers(-5000, 5000, n).astype(np.int32)
    mantissa, shift = dyadic(rng.uniform(1e-3, 1e-1, n) if y_dtype == "int16" else rng.uniform(1e-4, 1e-3, n))
    qmin, qmax = (int(v) for v in (np.iinfo(y_dtype).min, np.iinfo(y_dtype).max))
    y = _requantize(x.astype(np.int64) @ w.astype(np.int64).T + bias, mantissa, shift, qmin, qmax)
    m_y = rng.integers(1 << 13, 1 << 14, n) if per_channel == "y" else np.int64(12345)
    m_skip = rng.integers(1 << 13, 1 << 14, n) if per_channel == "skip" else np.int64(23456)
    s = 14
    want = np.clip((y * m_y + skip.astype(np.int64) * m_skip + (1 << (s - 1))) >> s, -32768, 32767)
    assert -32768 in want or 32767 in want or len(np.unique(want)) > 100

    def multiplier(v: np.ndarray) -> int | tuple[int, ...]:
        return tuple(int(e) for e in v) if np.ndim(v) else int(v)

    residual = Residual(skip_dtype, multiplier(m_y), multiplier(m_skip), s, -32768, 32767)
    func, consts = dense((m, k), "int8", w, bias, mantissa, shift, qmin, qmax, "int16", num_threads=2,
                         residual=residual)
    np.testing.assert_array_equal(_run(func, [x, skip, *consts], np.zeros((m, n), np.int16)), want)


@pytest.mark.skipif(layer_kernels(TARGET)[2] == "portable", reason="the x86 kernels need AVX2")
@pytest.mark.parametrize(("seq", "head"), [(13, 20), (16, 32)])
def test_matmul_pairs_with_folded_permutes_is_exact(seq: int, head: int) -> None:
    """Attention's permutes folded into `matmul_pairs`: Q and K^T read in place from [B, S, h, d] (K^T's
    columns strided), A.V's V too, and its result written as [B, S, h, d]; odd and even sizes."""
    rng = np.random.default_rng(seq)
    shape = (2, seq, 3, head)
    xq, xk, xv = (_draw(rng, shape, "int8") for _ in range(3))
    q, kt, v = xq.transpose(0, 2, 1, 3), xk.transpose(0, 2, 3, 1), xv.transpose(0, 2, 1, 3)
    scores = q.astype(np.int64) @ kt.astype(np.int64)
    func, consts = matmul_pairs(q.shape, kt.shape, "int8", "int8", None, 2, a_view=(shape, (0, 2, 1, 3)),
                                b_view=(shape, (0, 2, 3, 1)))
    np.testing.assert_array_equal(_run(func, [xq, xk, *consts], np.zeros(scores.shape, np.int32)), scores)
    a = _draw(rng, scores.shape, "uint8")
    mantissa, shift = dyadic(np.array([3e-4]))
    requant = (int(mantissa[0]), int(shift[0]), -128, 127, "int8")
    out = np.clip((a.astype(np.int64) @ v.astype(np.int64) * int(mantissa[0]) + (1 << int(shift[0]) >> 1))
                  >> int(shift[0]), -128, 127)
    func, consts = matmul_pairs(a.shape, v.shape, "uint8", "int8", requant, 2, b_view=(shape, (0, 2, 1, 3)),
                                out_view=(shape, (0, 2, 1, 3)))
    got = _run(func, [a, xv, *consts], np.zeros(shape, np.int8))
    np.testing.assert_array_equal(got, out.transpose(0, 2, 1, 3))
