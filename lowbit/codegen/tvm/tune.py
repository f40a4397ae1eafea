"""MetaSchedule tuning of the layer kernels, with a persistent database shared across runs and models.

Each conv/linear layer's plain loop nest (`kernels.conv2d_nhwc(..., schedule=False)`)
is a tuning task; equal workloads are one task, weighted by how often they occur.
Records go to a JSON database under the cache directory, keyed by target: MetaSchedule
matches workloads structurally, so a record found for one model serves every model
with the same layer shape. Records are appended as they are measured, so an
interrupted tuning run keeps what it found.

When building, `TunedKernels` times the best tuned schedule of each layer against the
hand-written kernel and keeps the faster one.

With an `RpcTarget`, both measurements run on the remote devices: MetaSchedule's RPC runner
(one worker per device under the key) for the trials, one session for the comparison.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import tvm
import tvm_ffi
from tvm import tirx
from tvm.s_tir import meta_schedule as ms

from ...ir import QuantizedGraph
from . import kernels
from .kernel_api import ConvKernel, DenseKernel
from .lower import kernel_shape, layer_kernel
from .remote import Device, RpcTarget, registered_devices, time_function
from .target import target_string

Log = Callable[[str], None]
BUILD_TIMEOUT_S = 300
RUN_TIMEOUT_S = 120


def default_cache() -> Path:
    """$LOWBIT_CACHE, else $XDG_CACHE_HOME/lowbit, else ~/.cache/lowbit."""
    if os.environ.get("LOWBIT_CACHE"):
        return Path(os.environ["LOWBIT_CACHE"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")).expanduser() / "lowbit"


def database_dir(cache: Path, target: dict[str, Any]) -> Path:
    """One database per target, named readably and by hash (the target string may hold any characters)."""
    text = target_string(target)
    slug = "".join(ch if ch.isalnum() else "-" for ch in text)[:60]
    return cache / "tvm-tuning" / f"{slug}-{hashlib.sha256(text.encode()).hexdigest()[:10]}"


def open_database(directory: Path) -> ms.Database:
    directory.mkdir(parents=True, exist_ok=True)
    return ms.database.JSONDatabase(work_dir=str(directory))


def _plain_conv(*args: Any, **kwargs: Any) -> tuple[tirx.PrimFunc, list[np.ndarray]]:
    return kernels.conv2d_nhwc(*args, **kwargs, schedule=False)


def _plain_dense(*args: Any, **kwargs: Any) -> tuple[tirx.PrimFunc, list[np.ndarray]]:
    return kernels.dense(*args, **kwargs, schedule=False)


def _module(func: tirx.PrimFunc) -> tvm.IRModule:
    return tvm.IRModule({"main": func.with_attr("global_symbol", "main")})


def layer_workloads(qgraph: QuantizedGraph) -> dict[str, tvm.IRModule]:
    """Layer name -> the plain loop nest MetaSchedule tunes."""
    workloads = {}
    for op in qgraph.layers:
        x, out = qgraph.values[op.inputs[0]], qgraph.values[op.output]
        func, _ = layer_kernel(op, kernel_shape(op.op, tuple(x.shape)), x.dtype, out.dtype, _plain_conv,
                               _plain_dense)
        workloads[op.name] = _module(func)
    return workloads


def _runner(rpc: RpcTarget | None) -> ms.runner.Runner:
    """Where trials are timed: here, or on every device under the RPC key (one runner worker per device)."""
    if rpc is None:
        return ms.runner.LocalRunner(timeout_sec=RUN_TIMEOUT_S)
    config = ms.runner.RPCConfig(tracker_host=rpc.host, tracker_port=rpc.port, tracker_key=rpc.key,
                                 session_timeout_sec=int(rpc.job_timeout_s))
    return ms.runner.RPCRunner(config, max_workers=max(1, len(registered_devices(rpc))))


def tune(qgraph: QuantizedGraph, target: dict[str, Any], trials: int, directory: Path, log: Log,
         rpc: RpcTarget | None = None) -> ms.Database:
    """Spend `trials` more measurements on the layers of `qgraph` (on the devices under `rpc`'s key, if given);
    returns the (persistent) database."""
    database = open_database(directory)
    unique: dict[int, tuple[str, tvm.IRModule, int]] = {}
    for name, mod in layer_workloads(qgraph).items():
        key = tvm_ffi.structural_hash(mod)
        first, first_mod, count = unique.get(key, (name, mod, 0))
        unique[key] = (first, first_mod, count + 1)
    if trials <= 0:
        return database
    t = tvm.target.Target(target)
    tasks = [ms.ExtractedTask(name, mod, t, [mod], count) for name, mod, count in unique.values()]
    log(f"tuning {len(tasks)} distinct layer workloads, {trials} trials in all; records in {directory}")
    contexts, weights = ms.relax_integration.extracted_tasks_to_tune_contexts(
        tasks, str(directory / "logs"), num_threads=int(target.get("num-cores", 1)))
    cores = int(target.get("num-cores", 1))
    # Generous timeouts: on a 2-core machine each builder process spends seconds importing TVM alone.
    # The cost model is random: MetaSchedule's learned ones need xgboost (or its MLP's extra packages),
    # which would be a heavy dependency for a path that the hand-written kernels mostly win anyway.
    ms.tune.tune_tasks(tasks=contexts, task_weights=weights, work_dir=str(directory / "logs"),
                       max_trials_global=trials, num_trials_per_iter=min(64, max(2, trials // len(tasks))),
                       cost_model="random",
                       builder=ms.builder.LocalBuilder(max_workers=cores, timeout_sec=BUILD_TIMEOUT_S),
                       runner=_runner(rpc), database=database)
    log(f"tuning done: {len(database)} records for this target")
    return database


@dataclass
class TunedKernels:
    """Layer kernel builders that use a tuned schedule where it measures faster than the hand-written kernel."""

    database: ms.Database
    target: dict[str, Any]
    conv2d_fast: ConvKernel
    dense_fast: DenseKernel
    min_speedup: float = 1.0  # a tuned kernel must be this much faster to be used (0: always use a record)
    choices: list[dict[str, Any]] = field(default_factory=list)
    device: Device | None = None  # time both kernels on this remote device (None: here)

    def conv2d(self, *args: Any, residual: Any = None,
               **kwargs: Any) -> tuple[tirx.PrimFunc, list[np.ndarray]] | None:
        if residual is not None:  # only the hand-written kernel fuses a residual add (None: it cannot)
            fused = self.conv2d_fast(*args, residual=residual, **kwargs)
            if fused is not None:
                self.choices.append({"kernel": "hand-written (add fused)", "tuned_ms": None})
            return fused
        return self._pick(_plain_conv(*args, **kwargs), self.conv2d_fast(*args, **kwargs))

    def dense(self, *args: Any, **kwargs: Any) -> tuple[tirx.PrimFunc, list[np.ndarray]]:
        return self._pick(_plain_dense(*args, **kwargs), self.dense_fast(*args, **kwargs))

    def _pick(self, plain: tuple[tirx.PrimFunc, list[np.ndarray]],
              fast: tuple[tirx.PrimFunc, list[np.ndarray]]) -> tuple[tirx.PrimFunc, list[np.ndarray]]:
        t = tvm.target.Target(self.target)
        schedule = ms.tir_integration.compile_tir(self.database, _module(plain[0]), t)
        if schedule is None:
            self.choices.append({"kernel": "hand-written", "tuned_ms": None})
            return fast
        tuned = (schedule.mod["main"], plain[1])
        tuned_ms, fast_ms = _time(tuned, t, self.device), _time(fast, t, self.device)
        use_tuned = tuned_ms * self.min_speedup < fast_ms
        self.choices.append({"kernel": "tuned" if use_tuned else "hand-written", "tuned_ms": tuned_ms,
                             "hand_written_ms": fast_ms})
        return tuned if use_tuned else fast


def _time(kernel: tuple[tirx.PrimFunc, list[np.ndarray]], target: tvm.target.Target,
          remote: Device | None = None) -> float:
    """Median ms of one kernel call on random inputs of its parameter types, here or on a `remote` device."""
    func, arrays = kernel
    library = tvm.compile(_module(func), target=target).mod
    rng = np.random.default_rng(0)
    infos = ms.arg_info.ArgInfo.from_prim_func(func)
    x, out = infos[0], infos[-1]
    host = [rng.integers(-100, 100, tuple(x.shape)).astype(x.dtype), *arrays, np.zeros(tuple(out.shape), out.dtype)]
    if remote is None:
        device = tvm.cpu(0)
    else:
        with tempfile.TemporaryDirectory(prefix="lowbit-tune-") as tmp:
            library.export_library(f"{tmp}/kernel.so")
            library = remote.load(Path(tmp) / "kernel.so")
        device = remote.cpu
    args = [tvm.runtime.tensor(a, device) for a in host]
    return float(np.median(time_function(library, "main", device, args, repeats=5, min_ms=10)))
