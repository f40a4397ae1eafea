"""`x86.matmul_nt`: batched int8 x int8 -> int32 matmul of two run-time tensors, bit-exact with numpy int64."""

from __future__ import annotations

import numpy as np
import pytest

tvm = pytest.importorskip("tvm", reason="TVM backend tests need apache-tvm (pip install 'lowbit[tvm]')")

from lowbit.codegen.tvm import parse_target  # noqa: E402
from lowbit.codegen.tvm.compile import layer_kernels  # noqa: E402
from lowbit.codegen.tvm.x86 import matmul_nt  # noqa: E402

TARGET = parse_target("llvm -mcpu=native")
pytestmark = pytest.mark.skipif(layer_kernels(TARGET)[2] != "x86-vnni",
                                reason="this CPU has no VNNI (AVX-512 VNNI or AVX-VNNI)")


def _run(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    func, consts = matmul_nt(x.shape, y.shape, str(x.dtype), str(y.dtype), num_threads=2)
    assert consts == []
    executable = tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}),
                             target=tvm.target.Target(TARGET))
    out = tvm.runtime.tensor(np.zeros((x.shape[0], x.shape[1], y.shape[1]), np.int32))
    executable["main"](tvm.runtime.tensor(x), tvm.runtime.tensor(y), out)
    return out.numpy()


# (B, M, N, K): attention-like heads, N and K not multiples of 8 or 4, a single row and column
@pytest.mark.parametrize("shape", [(2, 5, 13, 37), (3, 16, 16, 64), (1, 1, 1, 1), (2, 7, 24, 130)])
@pytest.mark.parametrize("x_dtype", ["int8", "uint8"])
def test_matmul_nt_is_exact(shape: tuple[int, int, int, int], x_dtype: str) -> None:
    B, M, N, K = shape
    rng = np.random.default_rng(sum(shape))
    lo, hi = (-128, 127) if x_dtype == "int8" else (0, 255)
    x = rng.integers(lo, hi + 1, (B, M, K)).astype(x_dtype)
    y = rng.integers(-128, 128, (B, N, K)).astype(np.int8)
    x[0, 0], y[0, 0] = lo, -128  # saturating rows: the largest products and the largest offset correction
    x[-1, -1], y[-1, -1] = hi, 127
    want = np.einsum("bmk,bnk->bmn", x.astype(np.int64), y.astype(np.int64))
    np.testing.assert_array_equal(_run(x, y), want)


def test_matmul_nt_rejects_mismatched_operands() -> None:
    with pytest.raises(ValueError, match="batch or K"):
        matmul_nt((2, 4, 8), (2, 4, 9), "int8")
    with pytest.raises(ValueError, match="int8/uint8"):
        matmul_nt((2, 4, 8), (2, 4, 8), "int16")
