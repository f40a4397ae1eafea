"""`measure_linear_latency`: the structure of its table (one positive time per shape and format, int2/3/4 sharing
the int4 kernel's time), not the times themselves (timing is no test on a shared machine)."""

from __future__ import annotations

import pytest

from lowbit.errors import LowbitError

pytest.importorskip("tvm", reason="the TVM kernels need apache-tvm")

from lowbit.codegen.tvm import linear_latency  # noqa: E402
from lowbit.codegen.tvm.linear_latency import measure_linear_latency  # noqa: E402


def test_every_shape_and_format_gets_a_positive_time() -> None:
    shapes, formats = [(64, 32), (32, 16)], [(2, 16), (3, 16), (4, 16), (8, 16), (4, 32)]
    before = len(linear_latency._COMPILED)
    table = measure_linear_latency(shapes, formats, threads=1, repeats=3, min_repeat_ms=1)
    assert set(table) == {(k, n, b, g) for k, n in shapes for b, g in formats}
    assert all(t > 0 for t in table.values())
    for k, n in shapes:  # one kernel, one timing
        assert table[(k, n, 2, 16)] == table[(k, n, 3, 16)] == table[(k, n, 4, 16)]
    # compiled once per distinct kernel: 2 shapes x (int4 g16, int8 g16, int4 g32), and cached
    assert len(linear_latency._COMPILED) - before == 6
    measure_linear_latency(shapes[:1], formats[:1], threads=1, repeats=1, min_repeat_ms=1)
    assert len(linear_latency._COMPILED) - before == 6


@pytest.mark.parametrize(("shapes", "formats", "message"), [
    ([(64, 30)], [(4, 16)], "multiples of 8"),
    ([(64, 32)], [(5, 16)], "no TVM decoder kernel for int5"),
])
def test_bad_shapes_and_formats_are_refused(shapes: list, formats: list, message: str) -> None:
    with pytest.raises(LowbitError, match=message):
        measure_linear_latency(shapes, formats, threads=1, repeats=1)
