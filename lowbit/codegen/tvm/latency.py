"""Per-layer latency on the target: each conv/linear kernel, epilogue fused, timed alone at each bit-width.

The result is the search's `LatencyTable`, so `lowbit search --latency` can budget
what the compiled model will spend, 4-bit layers included (ONNX Runtime has no
int4 kernels, so its table cannot tell 4 from 8 bits).

Layers of one signature (op, shapes, dtypes, attributes: an encoder's six blocks) compile
to the same kernel, so here each signature is compiled and timed once and its time given
to all its layers; a transformer's table then costs one block's compiles, not six.

With an `RpcTarget`, the kernels are compiled here and timed on the devices under the
tracker's key, every device in parallel (`remote.run_on_devices`); the table is complete
or an error, never partial.
"""

from __future__ import annotations

import collections
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import tvm
from tvm import relax

from ...ir import QuantizedGraph
from ...ir.dtypes import dtype
from ...search.costs import LatencyTable, single_layer_graph
from . import kernels
from .compile import build, layer_kernels, use_target_threads
from .lower import kernel_shape, layer_kernel
from .remote import Device, RpcTarget, run_on_devices, time_function
from .target import DEFAULT_TARGET, parse_target, target_string

Log = Callable[[str], None]


@dataclass
class LayerKernel:
    """One layer at one bit-width, compiled alone, with arguments to time it on: input, constants, output."""

    layer: str
    bits: int
    library: tvm.runtime.Module
    args: list[np.ndarray]


def kernel_signature(qgraph: QuantizedGraph, layer: str) -> tuple:
    """What a layer's compiled kernel depends on: its op, integer and text attributes (ranges, bit-widths, strides),
    and the shapes and dtypes of its input, output and constants; not their values (scales, weights)."""
    op = qgraph.op(layer)
    x, out = qgraph.values[op.inputs[0]], qgraph.values[op.output]
    structure = sorted((k, v) for k, v in op.attrs.items() if isinstance(v, bool | int | str)
                       or (isinstance(v, list | tuple) and all(isinstance(e, int) for e in v)))
    return (op.op, repr(structure), x.dtype, tuple(x.shape), out.dtype, tuple(out.shape),
            tuple((k, a.dtype.str, a.shape) for k, a in sorted(op.arrays.items())))


def representatives(qgraphs: list[QuantizedGraph]) -> dict[str, str]:
    """Per layer, the first layer whose kernels (in every one of `qgraphs`) have the same signature."""
    first: dict[tuple, str] = {}
    return {op.name: first.setdefault(tuple(kernel_signature(q, op.name) for q in qgraphs), op.name)
            for op in qgraphs[0].layers}


def layer_kernels_to_time(qgraphs: dict[int, QuantizedGraph], target: dict[str, Any],
                          layers: int | None = None, only: set[str] | None = None) -> Iterator[LayerKernel]:
    """Every layer of `qgraphs` (one uniform quantization per bit-width), or the first `layers`, or those in
    `only`, layer by layer, bit-widths ascending."""
    conv2d, dense, _ = layer_kernels(target)
    conv2d, dense = conv2d or kernels.conv2d_nhwc, dense or kernels.dense  # None: the portable kernels
    rng = np.random.default_rng(0)
    for first in next(iter(qgraphs.values())).layers[:layers]:
        if only is not None and first.name not in only:
            continue
        for bits, qgraph in sorted(qgraphs.items()):
            op = qgraph.op(first.name)
            x_value, out_value = qgraph.values[op.inputs[0]], qgraph.values[op.output]
            x_shape, out_shape = kernel_shape(op.op, tuple(x_value.shape)), kernel_shape(op.op, tuple(out_value.shape))
            func, arrays = layer_kernel(op, x_shape, x_value.dtype, out_value.dtype, conv2d, dense)
            module = tvm.IRModule({"main": func.with_attr("global_symbol", "main")})
            library = tvm.compile(module, target=tvm.target.Target(target)).mod
            lo, hi = x_value.qrange
            x = rng.integers(lo, hi + 1, x_shape).astype(dtype(x_value.dtype).numpy)
            out = np.zeros(out_shape, dtype(out_value.dtype).numpy)
            yield LayerKernel(op.name, bits, library, [x, *arrays, out])


def measure_layers(qgraphs: dict[int, QuantizedGraph], target_spec: str = DEFAULT_TARGET, repeats: int = 5,
                   min_ms: int = 20, log: Log = lambda _: None, rpc: RpcTarget | None = None,
                   wide_input: QuantizedGraph | None = None) -> LatencyTable:
    """Median ms of every layer of `qgraphs` (one uniform quantization per bit-width), batch as quantized.

    `wide_input`: a quantization with 16-bit activations; each layer that reads one gets what a 16-bit input
    adds to its time (`LatencyTable.wide_input_ms`, see `wide_input_extra`). Each measurement repeats the
    kernel for at least `min_ms`, `repeats` times, and keeps the median. With `rpc`, the kernels run on the
    devices under its key (`target_spec` then describes them).
    """
    if wide_input is not None:
        narrow = qgraphs[max(qgraphs)]
        table = measure_layers(qgraphs, target_spec, repeats, min_ms, log, rpc)
        table.wide_input_ms = wide_input_extra(narrow, wide_input, parse_target(target_spec), repeats, min_ms, log,
                                               rpc)
        return table
    target = parse_target(target_spec)
    if target["kind"] != "llvm":
        raise NotImplementedError("per-layer latency is measured on CPU targets only")
    kernel_set = layer_kernels(target)[2]
    layers = next(iter(qgraphs.values())).layers
    if rpc is not None:
        with tempfile.TemporaryDirectory(prefix="lowbit-rpc-") as tmp:
            return time_on_devices(compile_layers(qgraphs, target, Path(tmp), log), rpc, repeats, min_ms, log)
    use_target_threads(target)
    device = tvm.cpu(0)
    same = representatives(list(qgraphs.values()))
    timed: dict[str, dict[int, float]] = {}
    for kernel in layer_kernels_to_time(qgraphs, target, only=set(same.values())):
        args = [tvm.runtime.tensor(a, device) for a in kernel.args]
        timed.setdefault(kernel.layer, {})[kernel.bits] = float(
            np.median(time_function(kernel.library, "main", device, args, repeats, min_ms)))
        if kernel.bits == max(qgraphs):
            log(f"latency (tvm): kernel {len(timed)}/{len(set(same.values()))} ({len(layers)} layers)")
    ms = {layer.name: dict(timed[same[layer.name]]) for layer in layers}
    return LatencyTable(target_string(target), f"tvm per-layer kernels ({kernel_set})", ms,
                        {"repeats": repeats, "min_repeat_ms": min_ms, "batch": _batch(qgraphs),
                         "kernels_timed": len(timed)})


def wide_input_extra(narrow: QuantizedGraph, wide: QuantizedGraph, target: dict[str, Any], repeats: int = 5,
                     min_ms: int = 20, log: Log = lambda _: None, rpc: RpcTarget | None = None) -> dict[str, float]:
    """Per layer whose input `wide` makes 16-bit: the milliseconds that input adds, against `narrow`'s 8-bit one.

    A 16-bit input runs the layer as several kernels (byte split, two 8-bit passes, combine: `lower`), so it is
    timed as compiled: the layer alone between a quantize and a dequantize, built as a whole model, on each
    input; the quantize and dequantize cost both the same, and cancel in the difference. With `rpc`, the
    executables run on the devices under its key (all built here first), one layer per job."""
    all_layers = [op.name for op in wide.layers if wide.values[op.inputs[0]].dtype == "int16"]
    same = representatives([narrow, wide])
    layers = [layer for layer in all_layers if same[layer] == layer]  # one per signature; the rest share its time
    where = "tvm-rpc" if rpc is not None else "tvm"
    with tempfile.TemporaryDirectory(prefix="lowbit-wide-") as tmp:
        built: dict[str, list[tuple[Any, list[np.ndarray]]]] = {}
        for i, layer in enumerate(layers):
            built[layer] = []
            for tag, qgraph in (("narrow", narrow), ("wide", wide)):
                alone = single_layer_graph(qgraph, layer)
                executable, lowered, _ = build(alone, target)
                x = np.random.default_rng(0).standard_normal(alone.values["x"].shape).astype(np.float32)
                if rpc is not None:  # a file to upload
                    executable.export_library(str(Path(tmp) / f"{i}-{tag}.so"))
                    executable = Path(tmp) / f"{i}-{tag}.so"
                built[layer].append((executable, [x, *lowered.params.values()]))
            if rpc is not None:
                log(f"latency ({where}): built the 16-bit input of layer {i + 1}/{len(layers)}")
        if rpc is not None:
            threads = int(target.get("num-cores", 1))

            def job(row: list[tuple[Any, list[np.ndarray]]]) -> Callable[[Device], float]:
                def run(device: Device) -> float:
                    device.use_threads(threads)
                    times = [_vm_ms(relax.VirtualMachine(device.load(path), device.cpu), device.cpu,
                                    [device.tensor(a) for a in arrays], repeats, min_ms) for path, arrays in row]
                    return times[1] - times[0]
                return run

            done = run_on_devices(rpc, {layer: job(row) for layer, row in built.items()}, "layer",
                                  lambda m: log(f"latency ({where}): 16-bit input, {m}"))
            return {layer: done.results[same[layer]] for layer in all_layers}
        use_target_threads(target)
        device = tvm.cpu(0)
        extra = {}
        for i, (layer, row) in enumerate(built.items()):
            times = [_vm_ms(relax.VirtualMachine(executable, device), device,
                            [tvm.runtime.tensor(a, device) for a in arrays], repeats, min_ms)
                     for executable, arrays in row]
            extra[layer] = times[1] - times[0]
            log(f"latency ({where}): 16-bit input of kernel {i + 1}/{len(layers)} ({len(all_layers)} layers)")
        return {layer: extra[same[layer]] for layer in all_layers}


def _vm_ms(vm: relax.VirtualMachine, device: Any, args: list[Any], repeats: int, min_ms: int) -> float:
    """Median ms of the VM's main on `args` (local or remote), through the stateful interface RPC supports."""
    vm.set_input("main", *args)
    return float(np.median(time_function(vm.module, "invoke_stateful", device, ["main"], repeats, min_ms)))


def _batch(qgraphs: dict[int, QuantizedGraph]) -> int:
    qgraph = next(iter(qgraphs.values()))
    return qgraph.values[qgraph.layers[0].inputs[0]].shape[0]


@dataclass
class CompiledLayers:
    """Every layer kernel exported to a library file in `directory`, ready to upload: layer -> [(bits, file,
    arguments)]. Compiled once, it can be timed on several devices or trackers."""

    target: dict[str, Any]
    kernel_set: str
    batch: int
    rows: dict[str, list[tuple[int, Path, list[np.ndarray]]]]


def compile_layers(qgraphs: dict[int, QuantizedGraph], target: dict[str, Any], directory: Path,
                   log: Log = lambda _: None, layers: int | None = None) -> CompiledLayers:
    """Compile every layer (or the first `layers`) at every bit-width here and export each to `directory` (which
    must outlive the result)."""
    total = len(next(iter(qgraphs.values())).layers[:layers])
    rows: dict[str, list[tuple[int, Path, list[np.ndarray]]]] = {}
    for kernel in layer_kernels_to_time(qgraphs, target, layers):
        path = directory / f"layer{len(rows)}-w{kernel.bits}.so"
        kernel.library.export_library(str(path))
        rows.setdefault(kernel.layer, []).append((kernel.bits, path, kernel.args))
        if kernel.bits == max(qgraphs):
            log(f"latency (tvm-rpc): compiled layer {len(rows)}/{total}")
    return CompiledLayers(target, layer_kernels(target)[2], _batch(qgraphs), rows)


def time_here(compiled: CompiledLayers, repeats: int = 5, min_ms: int = 20) -> LatencyTable:
    """The same library files timed on this machine: the local half of a local-versus-remote comparison."""
    use_target_threads(compiled.target)
    device = tvm.cpu(0)
    ms = {layer: {bits: float(np.median(time_function(tvm.runtime.load_module(str(path)), "main", device,
                                                      [tvm.runtime.tensor(a, device) for a in arrays], repeats,
                                                      min_ms)))
                  for bits, path, arrays in row} for layer, row in compiled.rows.items()}
    return LatencyTable(target_string(compiled.target), f"tvm per-layer kernels ({compiled.kernel_set})", ms,
                        {"repeats": repeats, "min_repeat_ms": min_ms, "batch": compiled.batch})


def time_on_devices(compiled: CompiledLayers, rpc: RpcTarget, repeats: int = 5, min_ms: int = 20,
                    log: Log = lambda _: None) -> LatencyTable:
    """Time compiled layer kernels on the devices under `rpc`'s key, in parallel, one job per layer (all its
    bit-widths on one device, so a row is measured under the same conditions); complete or a `LowbitError`.

    `measure_layers` compiles everything before timing anything: the compiler then never competes for
    the CPU with devices that share this machine (localhost servers)."""
    threads = int(compiled.target.get("num-cores", 1))

    def job(row: list[tuple[int, Path, list[np.ndarray]]]) -> Callable[[Device], dict[int, float]]:
        def run(device: Device) -> dict[int, float]:
            device.use_threads(threads)
            times = {}
            for bits, path, arrays in row:
                library = device.load(path)
                args = [device.tensor(a) for a in arrays]
                times[bits] = float(np.median(time_function(library, "main", device.cpu, args, repeats, min_ms)))
            return times
        return run

    done = run_on_devices(rpc, {layer: job(row) for layer, row in compiled.rows.items()}, "layer",
                          lambda m: log(f"latency (tvm-rpc): {m}"))
    ms = {layer: done.results[layer] for layer in compiled.rows}  # the graph's layer order
    meta = done.meta(rpc)
    hosts = collections.Counter(name.rsplit(":", 1)[0] for name in done.devices)
    meta["hosts_shared"] = sorted(host for host, n in hosts.items() if n > 1)
    if meta["hosts_shared"]:  # benchmarks/bench_rpc.py: two servers on one 2-CPU host timed 2x slower than one
        log(f"warning: several devices run on {', '.join(meta['hosts_shared'])} and were timed at the same moment: "
            "unless each has cores of its own, their timings include each other's load")
    return LatencyTable(target_string(compiled.target), f"tvm per-layer kernels ({compiled.kernel_set}) over RPC, "
                                                        f"key {rpc.key!r}, {meta['devices']} device(s)", ms,
                        {"repeats": repeats, "min_repeat_ms": min_ms, "batch": compiled.batch, "rpc": meta})
