"""The integer IR (`QuantizedGraph`): what every backend lowers from.

Values are integer tensors with scale and zero-point metadata; only the graph's
inputs (before `quantize`) and outputs (after `dequantize`) are float. The ops and
their exact integer semantics are defined in `lowbit.ir.ops`, one module each;
`docs/IR.md` lists them (generated: `python -m lowbit.ir.ops`).

Requantization follows `lowbit.ir.dyadic` exactly. All zero points are 0
(symmetric), so padding inserts 0 and no zero-point corrections are needed.
The IR serializes to `ir.json` (structure, scales) + `ir.safetensors` (arrays);
weights are stored as their format says (`lowbit.ir.weights`: int4 packed two per byte).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import LowbitError
from .dtypes import qrange
from .ops import OPS, QUANTIZABLE_OPS
from .ops._layer import weights_of
from .requantizer import Requantizer
from .weights import PerChannelWeights

IR_VERSION = 1


@dataclass
class Value:
    """An IR tensor. `scale` is per tensor, or per channel along `axis` (int32 accumulators)."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    scale: float | list[float] = 1.0
    zero_point: int = 0
    axis: int | None = None

    @property
    def qrange(self) -> tuple[int, int]:
        return qrange(self.dtype)


@dataclass
class Op:
    name: str
    op: str
    inputs: list[str]
    output: str
    attrs: dict[str, Any] = field(default_factory=dict)
    arrays: dict[str, np.ndarray] = field(default_factory=dict)


@dataclass
class QuantizedGraph:
    values: dict[str, Value]
    ops: list[Op]
    inputs: list[str]
    outputs: list[str]
    name: str = "model"
    # Float graph tensor name -> IR value holding its quantized form (for simulation and reports).
    float_to_int: dict[str, str] = field(default_factory=dict)

    def op(self, name: str) -> Op:
        return next(o for o in self.ops if o.name == name)

    def producer(self, value: str) -> Op | None:
        return next((o for o in self.ops if o.output == value), None)

    @property
    def layers(self) -> list[Op]:
        """The ops with weights (those that get a bit-width), in execution order."""
        return [o for o in self.ops if o.op in QUANTIZABLE_OPS]

    @property
    def int_outputs(self) -> list[str]:
        """The integer values that the output dequantize ops read: what backends must match bit for bit."""
        return [self.producer(o).inputs[0] for o in self.outputs]

    def requantizers(self, op: Op) -> list[Requantizer]:
        """The typed requantizers lowering attached to `op` (validated: ranges, shifts, mantissas)."""
        reader = OPS[op.op].requantizers
        return [] if reader is None else reader(op, self)

    def with_batch(self, batch: int) -> QuantizedGraph:
        """The same graph at another static batch size (for backends that compile static shapes): every value's
        leading dim becomes `batch`. Exact because every op keeps the batch dimension (reshape's target shape,
        the constants of add_constant and the masks exclude it). The ops are shared, not copied."""
        if batch < 1:
            raise LowbitError(f"{self.name}: batch size {batch} must be at least 1")
        values = {name: replace(v, shape=(batch, *v.shape[1:])) if len(v.shape) else v
                  for name, v in self.values.items()}
        return QuantizedGraph(values, self.ops, self.inputs, self.outputs, self.name, self.float_to_int)

    def bit_plan(self) -> dict[str, int]:
        return {o.name: int(o.attrs["weight_bits"]) for o in self.layers}

    def wide_activations(self) -> dict[str, int]:
        """Float tensor name -> activation bits, for the tensors given a grid wider than 8 bits (int16), as the
        plan names them: not those that only inherit one (a pad or reshape of such a tensor)."""
        wide = {}
        for name, value in self.float_to_int.items():
            producer = self.producer(value)
            if self.values[value].dtype == "int16" and not (producer and OPS[producer.op].scale_preserving):
                wide[name] = 16
        return wide

    def weight_bytes(self) -> int:
        """Stored weight bytes (as each layer's weight format counts them) plus 4 bytes per int32 bias."""
        return int(sum(weights_of(o).nbytes for o in self.layers))

    # -- serialization ------------------------------------------------------------
    def _packed(self, op: Op) -> dict[str, list[int]]:
        """Arrays stored as packed int4: name -> shape."""
        return {"weight": list(op.arrays["weight"].shape)} if op.attrs.get("weight_bits") == 4 else {}

    def to_json(self) -> dict[str, Any]:
        return {
            "ir_version": IR_VERSION,
            "name": self.name,
            "inputs": self.inputs,
            "outputs": self.outputs,
            "values": [asdict(v) for v in self.values.values()],
            "ops": [{"name": o.name, "op": o.op, "inputs": o.inputs, "output": o.output, "attrs": o.attrs,
                     "arrays": sorted(o.arrays), "int4_packed": self._packed(o)} for o in self.ops],
            "float_to_int": self.float_to_int,
        }

    def save(self, directory: Path) -> list[Path]:
        from safetensors.numpy import save_file

        directory.mkdir(parents=True, exist_ok=True)
        meta, tensors = directory / "ir.json", directory / "ir.safetensors"
        meta.write_text(json.dumps(self.to_json(), indent=1))
        arrays = {f"{o.name}::{k}": np.ascontiguousarray(v) for o in self.ops for k, v in o.arrays.items()}
        for o in self.layers:  # weights as their format stores them
            arrays[f"{o.name}::weight"] = weights_of(o).stored()
        save_file(arrays, str(tensors))
        return [meta, tensors]

    @classmethod
    def load(cls, directory: Path) -> QuantizedGraph:
        from safetensors import SafetensorError
        from safetensors.numpy import load_file

        try:
            meta = json.loads((directory / "ir.json").read_text())
            tensors = load_file(str(directory / "ir.safetensors"))
        except (OSError, ValueError, SafetensorError) as e:
            raise LowbitError(f"{directory}: cannot read the integer IR (ir.json, ir.safetensors): {e}") from e
        if meta.get("ir_version") != IR_VERSION:
            raise LowbitError(f"{directory}/ir.json: IR version {meta.get('ir_version')} is not {IR_VERSION}")
        values = {v["name"]: Value(**{**v, "shape": tuple(v["shape"])}) for v in meta["values"]}
        ops = []
        for o in meta["ops"]:
            packed = o.get("int4_packed", {})
            arrays = {k: PerChannelWeights.unstored(tensors[f"{o['name']}::{k}"], tuple(packed[k]), 4) if k in packed
                      else tensors[f"{o['name']}::{k}"] for k in o["arrays"]}
            ops.append(Op(o["name"], o["op"], o["inputs"], o["output"], o["attrs"], arrays))
        qgraph = cls(values, ops, meta["inputs"], meta["outputs"], meta["name"], meta["float_to_int"])
        qgraph.validate(f"{directory}/ir.json")
        return qgraph

    def validate(self, where: str) -> None:
        """Refuse an IR no backend could run: unknown ops, or requantizers out of their integer ranges."""
        unknown = sorted({o.op for o in self.ops if o.op not in OPS or not OPS[o.op].is_primitive})
        if unknown:
            raise LowbitError(f"{where}: unknown integer ops {', '.join(unknown)}; this lowbit knows "
                              f"{', '.join(o for o in OPS if OPS[o].is_primitive)}")
        for op in self.ops:
            try:
                self.requantizers(op)
            except (KeyError, ValueError) as e:
                raise LowbitError(f"{where}: op {op.name} ({op.op}) has an invalid requantizer: {e}") from e
