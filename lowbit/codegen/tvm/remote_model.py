"""A compiled artifact (DIR/tvm) run and timed on a remote device, through one RPC session.

The Relax VM executable is uploaded and loaded there; the parameters and inputs are copied to the
device, the VM runs there (`set_input` / `invoke_stateful`, the stateful interface TVM's VM offers
over RPC), and only the outputs or the timings come back.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from tvm import relax

from ...errors import LowbitError
from ...runtime.loader import TVM_DIR, read_verified_meta
from .remote import Device, RpcTarget, device_session, time_function


class RemoteModel:
    """`DIR/tvm` loaded on `device`: `run_integers` like the local runtime's, and `benchmark` timed there."""

    def __init__(self, tvm_dir: Path, meta: dict[str, Any], device: Device) -> None:
        if meta["target"]["kind"] != "llvm":
            raise LowbitError(f"{tvm_dir}: remote runs support CPU (llvm) targets only, not {meta['target_string']}")
        self.device = device
        self.meta = meta
        device.use_threads(int(meta["target"].get("num-cores", 1)))
        self._vm = relax.VirtualMachine(device.load(tvm_dir / "model.so"), device.cpu)
        with np.load(tvm_dir / "params.npz", allow_pickle=False) as arrays:
            self._params = [device.tensor(arrays[f"p{i}"]) for i in range(len(meta["params"]))]
        self.inputs: list[dict[str, Any]] = meta["inputs"]
        if len(self.inputs) != 1:
            raise LowbitError(f"{tvm_dir}: remote runs support models with one input, this one takes "
                              f"{[i['name'] for i in self.inputs]}")
        self._batch = int(self.inputs[0]["shape"][0])
        self._returned = [o["name"] for o in [*meta["outputs"], *meta.get("integer_outputs", [])]]

    def _set_input(self, x: np.ndarray) -> None:
        self._vm.set_input("main", self.device.tensor(np.ascontiguousarray(x, np.float32)), *self._params)

    def run_integers(self, x: np.ndarray) -> dict[str, np.ndarray]:
        """The integer outputs before the final dequantize, batch by batch, brought back from the device."""
        wanted = [o["name"] for o in self.meta.get("integer_outputs", [])]
        if not wanted:
            raise LowbitError("this artifact was compiled without integer outputs; recompile with `lowbit compile "
                              "DIR --force`")
        if x.shape[0] % self._batch:
            raise LowbitError(f"{x.shape[0]} inputs are not a multiple of the compiled batch {self._batch}")
        parts: dict[str, list[np.ndarray]] = {name: [] for name in wanted}
        for start in range(0, x.shape[0], self._batch):
            self._set_input(x[start:start + self._batch])
            self._vm.invoke_stateful("main")
            outputs = self._vm.get_outputs("main")
            outputs = outputs if isinstance(outputs, tuple) else (outputs,)
            for name in wanted:
                parts[name].append(outputs[self._returned.index(name)].numpy())
        return {name: np.concatenate(p) for name, p in parts.items()}

    def benchmark(self, repeats: int = 100, rounds: int = 1) -> dict[str, float]:
        """Latency of one call at the compiled batch size, timed on the device by TVM's time evaluator: the best of
        `rounds` medians of `repeats` single calls, in ms (inputs already on the device, as the local runtime's)."""
        self._set_input(np.random.default_rng(0).standard_normal(self.inputs[0]["shape"]).astype(np.float32))
        time_function(self._vm.module, "invoke_stateful", self.device.cpu, ["main"], repeats=1, min_ms=0,
                      number=10)  # warm-up: caches, page faults, the thread pool
        medians = [float(np.median(time_function(self._vm.module, "invoke_stateful", self.device.cpu, ["main"],
                                                 repeats=repeats, min_ms=0, number=1))) for _ in range(rounds)]
        return {"median_ms": min(medians), "rounds": rounds, "runs": repeats}


def bench_remote(directory: Path, rpc: RpcTarget, repeats: int = 100, rounds: int = 3) -> dict[str, Any]:
    """`lowbit bench DIR --rpc-tracker ...`: the artifact's compiled model timed on one device under the key."""
    meta = read_verified_meta(directory)
    with device_session(rpc) as device:
        result = RemoteModel(directory / TVM_DIR, meta, device).benchmark(repeats, rounds)
        name = device.name
    return {"directory": str(directory), "target": meta["target_string"], "batch": meta["inputs"][0]["shape"][0],
            "rpc": {**rpc.to_json(), "device": name}, "repeats": repeats, "rounds": rounds,
            "latency_ms": {"tvm-rpc": result["median_ms"]}}
