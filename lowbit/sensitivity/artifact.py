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

SENSITIVITY_VERSION = 2  # 2: activation noise per tensor at 8 and 16 bits (was: per layer input, 8)


def weight_key(layer: str, bits: int) -> str:
    return f"{layer}@w{bits}"


def activation_key(tensor: str, bits: int) -> str:
    return f"{tensor}@a{bits}"


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
    smooth: str = "none"  # the SmoothQuant setting of the graph it was measured on (older artifacts: none)
    seq_len: int | None = None  # a text model's sequence length (None: not a text model, or an older artifact)

    def layer(self, name: str) -> LayerSensitivity:
        return next(layer for layer in self.layers if layer.name == name)

    def _index(self, keys: list[str]) -> np.ndarray:
        where = {k: i for i, k in enumerate(self.keys)}
        missing = [k for k in keys if k not in where]
        if missing:
            raise LowbitError(f"sensitivity has no quadratic terms for {missing[:5]}; it was computed for weight "
                              f"bit-widths {self.pair_bits}")
        return np.array([where[k] for k in keys], dtype=np.int64)

    @property
    def activation_tensors(self) -> list[str]:
        """The tensors whose rounding noise was measured at 8 and 16 bits (those a plan may keep at 16)."""
        return [k.rsplit("@a", 1)[0] for k in self.keys if k.endswith("@a16")]

    def activation_cost(self, tensor: str, bits: int) -> float:
        """Predicted loss increase from `tensor`'s rounding noise at `bits` alone (its exact diagonal term)."""
        k = self._index([activation_key(tensor, bits)])[0]
        return float(0.5 * self.cross[k, k] + self.gradient[k])

    def predict(self, plan: Mapping[str, int], model: str = "cross",
                activations: Mapping[str, int] | None = None) -> float:
        """Predicted loss increase of a weight bit plan, plus activation noise if `activations` is given.

        `model` is "cross" (½ δᵀHδ with every inter-layer term), "diagonal" (the exact
        per-perturbation blocks only), or "trace" (HAWQ-V3's ½ Σ Ω_i(b) for the weights;
        activation noise, which has no Ω, enters through its exact diagonal terms).
        `activations` maps each tensor of `activation_tensors` to 8 or 16 bits; tensors
        it does not name are 8-bit.
        """
        if model not in ("cross", "diagonal", "trace"):
            raise ValueError(f"unknown prediction model {model!r}")
        act_keys = ([] if activations is None else
                    [activation_key(t, activations.get(t, 8)) for t in self.activation_tensors])
        weight_keys = [weight_key(name, bits) for name, bits in plan.items()]
        if model == "trace":
            total = 0.5 * sum(self.layer(name).omega(bits) for name, bits in plan.items())
            idx = self._index(act_keys)
            return float(total + 0.5 * np.trace(self.cross[np.ix_(idx, idx)]) + self.gradient[idx].sum())
        idx = self._index(weight_keys + act_keys)
        block = self.cross[np.ix_(idx, idx)]
        quadratic = block.sum() if model == "cross" else np.trace(block)
        return float(0.5 * quadratic + self.gradient[idx].sum())

    def option_terms(self, options: list[list[list[str]]]) -> np.ndarray:
        """[rows, options, rows, options]: Σ δ_kᵀ H δ_l over the perturbation keys k of row r's option o and l of
        row s's option p (`options[r][o]` lists keys; an empty list is an option with no perturbation).

        Between two rows (r != s) it is the cross term their choices add to `predict`'s "cross" model; on the
        diagonal (r = s, o = p) it is twice the option's own quadratic term."""
        width = max(len(row) for row in options)
        indicator = np.zeros((len(self.keys), len(options) * width))
        for r, row in enumerate(options):
            for o, keys in enumerate(row):
                if keys:
                    indicator[self._index(keys), r * width + o] = 1.0
        return (indicator.T @ self.cross @ indicator).reshape(len(options), width, len(options), width)

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
