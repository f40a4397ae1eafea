"""Per-layer latency on the target: each conv/linear kernel, epilogue fused, timed alone at each bit-width.

The result is the search's `LatencyTable`, so `lowbit search --latency` can budget
what the compiled model will spend, 4-bit layers included (ONNX Runtime has no
int4 kernels, so its table cannot tell 4 from 8 bits).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import tvm

from ...ir import QuantizedGraph
from ...ir.dtypes import dtype
from ...search.costs import LatencyTable
from .compile import layer_kernels, use_target_threads
from .lower import layer_kernel
from .target import DEFAULT_TARGET, parse_target, target_string


def _nhwc(shape: tuple[int, ...]) -> tuple[int, ...]:
    return (shape[0], shape[2], shape[3], shape[1]) if len(shape) == 4 else shape


def measure_layers(qgraphs: dict[int, QuantizedGraph], target_spec: str = DEFAULT_TARGET, repeats: int = 5,
                   min_ms: int = 20, log: Callable[[str], None] = lambda _: None) -> LatencyTable:
    """Median ms of every layer of `qgraphs` (one uniform quantization per bit-width), batch as quantized.

    Each measurement repeats the kernel for at least `min_ms`, `repeats` times, and keeps the median.
    """
    target = parse_target(target_spec)
    if target["kind"] != "llvm":
        raise NotImplementedError("per-layer latency is measured on CPU targets only")
    use_target_threads(target)
    conv2d, dense, kernel_set = layer_kernels(target)
    device = tvm.cpu(0)
    rng = np.random.default_rng(0)
    layers = next(iter(qgraphs.values())).layers
    ms: dict[str, dict[int, float]] = {}
    for i, first in enumerate(layers):
        for bits, qgraph in sorted(qgraphs.items()):
            op = qgraph.op(first.name)
            x_value, out_value = qgraph.values[op.inputs[0]], qgraph.values[op.output]
            x_shape, out_shape = _nhwc(tuple(x_value.shape)), _nhwc(tuple(out_value.shape))
            func, arrays = layer_kernel(op, x_shape, x_value.dtype, out_value.dtype, conv2d, dense)
            module = tvm.IRModule({"main": func.with_attr("global_symbol", "main")})
            library = tvm.compile(module, target=tvm.target.Target(target)).mod
            lo, hi = x_value.qrange
            args = [tvm.runtime.tensor(rng.integers(lo, hi + 1, x_shape).astype(dtype(x_value.dtype).numpy), device)]
            args += [tvm.runtime.tensor(a, device) for a in arrays]
            args.append(tvm.runtime.tensor(np.zeros(out_shape, dtype(out_value.dtype).numpy), device))
            timer = library.time_evaluator("main", device, repeat=repeats, min_repeat_ms=int(min_ms))
            ms.setdefault(op.name, {})[bits] = float(np.median(timer(*args).results) * 1e3)
        log(f"latency (tvm): layer {i + 1}/{len(layers)}")
    batch = next(iter(qgraphs.values())).values[layers[0].inputs[0]].shape[0]
    return LatencyTable(target_string(target), f"tvm per-layer kernels ({kernel_set})", ms,
                        {"repeats": repeats, "min_repeat_ms": min_ms, "batch": batch})
