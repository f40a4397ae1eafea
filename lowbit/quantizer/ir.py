"""The integer IR (`QuantizedGraph`): what every backend lowers from.

Values are integer tensors with scale and zero-point metadata; only the graph's
inputs (before `quantize`) and outputs (after `dequantize`) are float. Ops:

- `quantize`   float -> int8/uint8: round half to even (as ONNX QuantizeLinear), saturate.
- `conv`, `linear`  int8/uint8 x int8 weights (int4 values when `weight_bits` is 4),
  int32 accumulation, int32 bias, then either a dyadic requantize (per output
  channel) to int8/uint8 or, for a graph output, the raw int32 accumulator.
- `add`        two int8/uint8 inputs, each scaled by its own mantissa, one shared shift.
- `concat`     each input requantized to the output scale, then concatenated.
- `avgpool`    integer window sum (zero padding counts) and a dyadic divide.
- `clamp`, `pad`, `maxpool`, `reshape`  integer, scale unchanged.
- `dequantize` int -> float: q * scale (per tensor, or per channel on `axis`).

Requantization follows `lowbit.quantizer.dyadic` exactly. All zero points are 0
(symmetric), so padding inserts 0 and no zero-point corrections are needed.
The IR serializes to `ir.json` (structure, scales) + `ir.safetensors` (arrays);
4-bit weights are stored packed, two per byte (`pack_int4`).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import LowbitError

DTYPE_RANGES = {"int8": (-128, 127), "uint8": (0, 255), "int32": (-(2**31), 2**31 - 1)}
IR_VERSION = 1


def weight_range(bits: int) -> tuple[int, int]:
    """Symmetric (narrow) integer range of a `bits`-bit weight, e.g. [-127, 127] or [-7, 7]."""
    q = 2 ** (bits - 1) - 1
    return -q, q


def pack_int4(values: np.ndarray) -> np.ndarray:
    """Signed 4-bit values (in [-8, 7]) -> bytes, two per byte, the first in the low nibble; odd sizes pad a 0."""
    flat = values.astype(np.int8).reshape(-1)
    if flat.size and (flat.min() < -8 or flat.max() > 7):
        raise ValueError("int4 values must lie in [-8, 7]")
    nibbles = (flat & 0x0F).astype(np.uint8)
    if nibbles.size % 2:
        nibbles = np.append(nibbles, np.uint8(0))
    return nibbles[0::2] | (nibbles[1::2] << 4)


def unpack_int4(packed: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Inverse of `pack_int4`: int8 values of `shape`."""
    n = int(np.prod(shape))
    nibbles = np.stack([packed & 0x0F, packed >> 4], axis=-1).reshape(-1)[:n].astype(np.int8)
    return np.where(nibbles > 7, nibbles - 16, nibbles).astype(np.int8).reshape(shape)


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
        return DTYPE_RANGES[self.dtype]


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
        return [o for o in self.ops if o.op in ("conv", "linear")]

    @property
    def int_outputs(self) -> list[str]:
        """The integer values that the output dequantize ops read: what backends must match bit for bit."""
        return [self.producer(o).inputs[0] for o in self.outputs]

    def bit_plan(self) -> dict[str, int]:
        return {o.name: int(o.attrs["weight_bits"]) for o in self.layers}

    def weight_bytes(self) -> int:
        """Packed weight storage: bits/8 per weight plus 4 bytes per int32 bias."""
        return int(sum(o.arrays["weight"].size * o.attrs["weight_bits"] / 8 + 4 * o.arrays["bias"].size
                       for o in self.layers))

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
        arrays = {}
        for o in self.ops:
            packed = self._packed(o)
            for k, v in o.arrays.items():
                arrays[f"{o.name}::{k}"] = pack_int4(v) if k in packed else np.ascontiguousarray(v)
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
            arrays = {k: unpack_int4(tensors[f"{o['name']}::{k}"], tuple(packed[k])) if k in packed
                      else tensors[f"{o['name']}::{k}"] for k in o["arrays"]}
            ops.append(Op(o["name"], o["op"], o["inputs"], o["output"], o["attrs"], arrays))
        return cls(values, ops, meta["inputs"], meta["outputs"], meta["name"], meta["float_to_int"])
