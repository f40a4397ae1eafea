"""The `Sensitivity` artifact: per-layer costs Ω_i(b) and the exact quadratic loss model.

Saved as `sensitivity.json` (everything a person reads) plus
`sensitivity.safetensors` (the matrix of quadratic forms between perturbations).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import LowbitError

SENSITIVITY_VERSION = 1


def weight_key(layer: str, bits: int) -> str:
    return f"{layer}@w{bits}"


def activation_key(layer: str, bits: int = 8) -> str:
    return f"{layer}@a{bits}"


@dataclass
class LayerSensitivity:
    name: str
    params: int
    trace: float  # Tr(H_ii), Hutchinson estimate
    trace_half_width: float  # its 95% confidence half-width
    activation_elements: int
    activation_trace: float  # Tr of the Hessian w.r.t. the layer's input activation (over the batch)
    activation_trace_half_width: float
    weight_error_sq: dict[int, float]  # ‖Q_b(W) - W‖² per weight bit-width (Q_b rounds as `Sensitivity.rounding`)
    activation_error_sq: float  # ‖Q_8(x) - x‖² of the 8-bit input activation, over the batch

    def omega(self, bits: int) -> float:
        """HAWQ-V3: Ω_i(b) = Tr(H_i)/n_i · ‖Q_b(W_i) - W_i‖²."""
        return self.trace / self.params * self.weight_error_sq[bits]

    @property
    def activation_omega(self) -> float:
        return self.activation_trace / self.activation_elements * self.activation_error_sq


@dataclass
class Sensitivity:
    model: str
    loss: str  # "kl" (to the FP32 model) or "cross_entropy" (labels)
    samples: int
    bits: list[int]  # weight bit-widths with an Ω
    pair_bits: list[int]  # weight bit-widths with exact quadratic terms
    layers: list[LayerSensitivity]
    trace_draws: int  # Hutchinson draws after the exact head classes
    head_classes: int  # classes per sample whose share of each trace was computed exactly
    rounding: str  # how the weight errors δ_i(b) were rounded: "gptq" or "nearest"
    # Perturbation keys (weight_key / activation_key) and their exact quadratic forms: cross[k, l] = δ_kᵀ H δ_l.
    keys: list[str]
    cross: np.ndarray
    gradient: np.ndarray  # gᵀ δ_k: first-order terms (zero for the KL loss, whose gradient vanishes at FP32)
    timings: dict[str, float] = field(default_factory=dict)
    # Measured vs predicted loss on random plans (see `analyze.check_predictions`).
    check: dict[str, Any] = field(default_factory=dict)

    def layer(self, name: str) -> LayerSensitivity:
        return next(layer for layer in self.layers if layer.name == name)

    def _index(self, keys: list[str]) -> np.ndarray:
        where = {k: i for i, k in enumerate(self.keys)}
        missing = [k for k in keys if k not in where]
        if missing:
            raise LowbitError(f"sensitivity has no quadratic terms for {missing[:5]}; it was computed for weight "
                              f"bit-widths {self.pair_bits}")
        return np.array([where[k] for k in keys], dtype=np.int64)

    def predict(self, plan: Mapping[str, int], model: str = "cross", activations: bool = False) -> float:
        """Predicted loss increase of a weight bit plan.

        `model` is "cross" (½ δᵀHδ with every inter-layer term), "diagonal" (the exact
        per-layer blocks only), or "trace" (HAWQ-V3's ½ Σ Ω_i(b_i)).
        """
        if model not in ("cross", "diagonal", "trace"):
            raise ValueError(f"unknown prediction model {model!r}")
        if model == "trace":
            total = 0.5 * sum(self.layer(name).omega(bits) for name, bits in plan.items())
            if activations:
                total += 0.5 * sum(layer.activation_omega for layer in self.layers)
            return float(total)
        keys = [weight_key(name, bits) for name, bits in plan.items()]
        if activations:
            keys += [activation_key(layer.name) for layer in self.layers]
        idx = self._index(keys)
        block = self.cross[np.ix_(idx, idx)]
        quadratic = block.sum() if model == "cross" else np.trace(block)
        return float(0.5 * quadratic + self.gradient[idx].sum())

    # -- serialization ------------------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        meta = {k: v for k, v in asdict(self).items() if k not in ("cross", "gradient", "layers")}
        meta["layers"] = [{**asdict(layer), "omega": {b: layer.omega(b) for b in self.bits},
                           "activation_omega": layer.activation_omega} for layer in self.layers]
        return {"sensitivity_version": SENSITIVITY_VERSION, **meta}

    def save(self, directory: Path) -> list[Path]:
        from safetensors.numpy import save_file

        directory.mkdir(parents=True, exist_ok=True)
        meta, tensors = directory / "sensitivity.json", directory / "sensitivity.safetensors"
        meta.write_text(json.dumps(self.to_json(), indent=1))
        save_file({"cross": np.ascontiguousarray(self.cross), "gradient": np.ascontiguousarray(self.gradient)},
                  str(tensors))
        return [meta, tensors]

    @classmethod
    def load(cls, directory: Path) -> Sensitivity:
        from safetensors import SafetensorError
        from safetensors.numpy import load_file

        meta_path = directory / "sensitivity.json"
        try:
            meta = json.loads(meta_path.read_text())
            tensors = load_file(str(directory / "sensitivity.safetensors"))
        except (OSError, ValueError, SafetensorError) as e:
            raise LowbitError(f"{directory}: cannot read a sensitivity artifact (sensitivity.json, "
                              f"sensitivity.safetensors): {e}; rerun `lowbit sensitivity`") from e
        if meta.get("sensitivity_version") != SENSITIVITY_VERSION:
            raise LowbitError(f"{meta_path}: version {meta.get('sensitivity_version')} is not "
                              f"{SENSITIVITY_VERSION}; rerun `lowbit sensitivity`")
        try:
            layers = [LayerSensitivity(**{**{k: v for k, v in layer.items() if k not in ("omega", "activation_omega")},
                                          "weight_error_sq": {int(b): e for b, e in layer["weight_error_sq"].items()}})
                      for layer in meta.pop("layers")]
            meta.pop("sensitivity_version")
            sens = cls(**meta, layers=layers, cross=tensors["cross"], gradient=tensors["gradient"])
        except (KeyError, TypeError) as e:
            raise LowbitError(f"{meta_path}: malformed sensitivity artifact ({e}); rerun `lowbit sensitivity`") from e
        if sens.cross.shape != (len(sens.keys), len(sens.keys)) or sens.gradient.shape != (len(sens.keys),):
            raise LowbitError(f"{directory}/sensitivity.safetensors: matrix shape {sens.cross.shape} does not match "
                              f"{len(sens.keys)} perturbations in sensitivity.json")
        return sens
