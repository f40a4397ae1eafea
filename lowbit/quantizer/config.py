"""Configuration of a quantization run, and the per-layer bit plan."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..errors import LowbitError
from .calibrate import METHODS
from .graph import Graph
from .smooth import parse_smooth

# 7: int8 storage on the 7-bit grid [-63, 63] (7 bits, as ORT's reduce_range), so that AVX2 CPUs without VNNI
# run the exact u8 x s8 byte-pair GEMM on it (`ir.weights.u8s8_pairs_exact`)
SUPPORTED_WEIGHT_BITS = (4, 7, 8)
SUPPORTED_ACTIVATION_BITS = (8, 16)
PLAN_FORMAT = "lowbit-bitplan-v1"
CALIB_METHODS = ("auto", *METHODS)
ROUNDINGS = ("auto", "nearest", "gptq")


@dataclass(frozen=True)
class QuantConfig:
    bits: int = 8  # default weight bit-width, when no BitPlan is given
    # "auto" (the defaults) chooses by the output error on a validation split of the calibration data
    # (`recipe.py`): the range method per model, and GPTQ or round-to-nearest per layer. No fixed
    # recipe held across models: percentile + GPTQ was best on MobileNetV2 and worst on another CNN.
    calib_method: str = "auto"  # activation ranges: auto | minmax | percentile | mse
    percentile: float = 99.99
    weight_method: str = "mse"  # per-channel weight ranges: minmax | mse
    rounding: str = "auto"  # weight rounding: auto | nearest | gptq
    # With calib_method="auto": each 8-bit activation's range refined by the error at the network output
    # (`ranges.py`), kept only if the validation split agrees. Off by default: on MobileNetV2 it halved the error
    # on the 16 samples it was fitted on, raised it on the validation split, and took minutes.
    output_aware_ranges: bool = False
    validation_fraction: float = 0.25  # of the calibration samples, held back to choose the auto parts
    bias_correction: bool = False  # empirical bias correction (Nagel et al. 2019); it hurt held-out agreement
    refine_samples: int = 64  # calibration samples used by GPTQ and bias correction
    # SmoothQuant before quantization (`smooth.py`): "none", an alpha in [0, 1] written as text ("0.5"), or
    # "auto" (alpha searched per group). 1/s folds into the value linear's rows, LayerNorm's gamma/beta (the
    # residual add multiplies that input back per channel) and GELU's per-channel tables. On MiniLM-L6 "auto"
    # moved the integer W8A8 held-out cosine from 0.9749 to 0.9948 (worst 1%: 0.9585 to 0.9903;
    # benchmarks/bench_chansmooth.py --integer). "default": auto for a graph that reads an attention mask (a
    # transformer, where those folds exist), none otherwise (a CNN has no LayerNorm or GELU to fold into).
    smooth: str = "default"
    seed: int = 0

    def __post_init__(self) -> None:
        if self.bits not in SUPPORTED_WEIGHT_BITS:
            raise LowbitError(f"--bits {self.bits}: supported weight bit-widths are {SUPPORTED_WEIGHT_BITS}")
        if self.calib_method not in CALIB_METHODS:
            raise LowbitError(f"--calib-method {self.calib_method!r}: expected one of {', '.join(CALIB_METHODS)}")
        if self.weight_method not in ("minmax", "mse"):
            raise LowbitError(f"weight_method {self.weight_method!r}: expected minmax or mse")
        if self.rounding not in ROUNDINGS:
            raise LowbitError(f"--rounding {self.rounding!r}: expected one of {', '.join(ROUNDINGS)}")
        if not 50.0 < self.percentile <= 100.0:
            raise LowbitError(f"percentile {self.percentile} must be in (50, 100]")
        parse_smooth(self.smooth)
        if not 0.0 < self.validation_fraction < 1.0:
            raise LowbitError(f"validation_fraction {self.validation_fraction} must be in (0, 1)")

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class BitPlan:
    """Weight bit-width per quantizable layer, and the activation tensors kept at 16 bits.

    `activation_bits` names float tensors that get their own scale (`quantize.scaled_tensors`) and their
    bit-width, 8 or 16; a tensor not named is 8-bit. A 16-bit tensor is always signed int16 (see
    `lowbit.ir.dtypes.activation_dtype`). plan.json files without "activation_bits" load as all 8-bit.
    """

    bits: dict[str, int]
    activation_bits: dict[str, int] = field(default_factory=dict)

    @classmethod
    def uniform(cls, graph: Graph, bits: int) -> BitPlan:
        return cls({n.name: bits for n in graph.layers})

    def activation(self, tensor: str) -> int:
        """The bit-width of float tensor `tensor`'s quantized form (8 unless the plan says 16)."""
        return self.activation_bits.get(tensor, 8)

    def validate(self, graph: Graph) -> None:
        names = {n.name for n in graph.layers}
        unknown = sorted(set(self.bits) - names)
        missing = sorted(names - set(self.bits))
        bad = sorted(f"{k}={v}" for k, v in self.bits.items() if v not in SUPPORTED_WEIGHT_BITS)
        if unknown or missing or bad:
            raise LowbitError(f"bit plan does not fit the model: unknown layers {unknown}, missing layers "
                              f"{missing}, unsupported bit-widths {bad}")
        if self.activation_bits:
            from .quantize import check_activation_bits  # quantize imports this module

            check_activation_bits(graph, self.activation_bits)

    def to_json(self) -> dict[str, int]:
        return dict(self.bits)

    def save(self, path: Path, **info: Any) -> None:
        """plan.json: the bits per layer (and per 16-bit activation), plus whatever the search records beside them."""
        extra = {"activation_bits": dict(self.activation_bits)} if self.activation_bits else {}
        path.write_text(json.dumps({"format": PLAN_FORMAT, "bits": self.to_json(), **extra, **info}, indent=1))

    @classmethod
    def load(cls, path: Path) -> BitPlan:
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, ValueError) as e:
            raise LowbitError(f"{path}: cannot read the bit plan: {e}") from e
        bits = data.get("bits") if isinstance(data, dict) else None
        if not isinstance(bits, dict) or data.get("format") != PLAN_FORMAT:
            raise LowbitError(f"{path}: not a lowbit bit plan (expected {{\"format\": \"{PLAN_FORMAT}\", "
                              '"bits": {layer: bits}}, as `lowbit search` writes)')
        activation_bits = data.get("activation_bits", {})
        if not isinstance(activation_bits, dict):
            raise LowbitError(f'{path}: "activation_bits" must map tensor names to 8 or 16')
        if not all(isinstance(b, int) and not isinstance(b, bool) for b in [*bits.values(), *activation_bits.values()]):
            raise LowbitError(f"{path}: bit-widths must be integers")
        return cls(dict(bits), dict(activation_bits))
