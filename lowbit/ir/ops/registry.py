"""The op registry: every op lowbit knows is one `OpDef`, defined in one module of this package.

An `OpDef` holds everything the pipeline needs to know about an op, in one place:

- `attrs`: the typed attributes of its float graph node;
- `aten`: the ATen op(s) capture converts into it, and how (the converters);
- `evaluate`: its float semantics (calibration, simulation, sensitivity);
- `lower`: how a float node becomes integer ops (with their requantizers);
- `reference`: its integer semantics, the ground truth every backend must match;
- `requantizers`: the typed requantizer(s) its lowering attached, as backends read them;
- `int16_refusal`: why it cannot read an int16 activation, if it cannot; `wide_input`: it always reads
  an int16 one;
- `weights`: which of its inputs are weights (the layers that get a bit-width), and `input_columns`,
  how its weight sees its input (for GPTQ's Hessian);
- `constants`: float params that are not weights and get no bit-width (an embedding table,
  LayerNorm's gamma and beta, constant rows added to an activation);
- `fusions`: sub-graphs of several ATen ops that capture converts as one node of this op
  (a `Fusion`: masked softmax, masked mean pooling), found before anything is converted.

An op may have only some of these. A float-only op (say hardswish) lowers to
integer primitives defined elsewhere, so backends never see it; an integer-only
primitive (quantize, lut) is never captured. The lists that used to be written by
hand (quantizable ops, the unsupported-op message, the IR documentation, a
backend's supported ops) are all derived from here.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any

from ...errors import LowbitError

if TYPE_CHECKING:
    import numpy as np
    import torch

    from ...quantizer.graph import Node
    from ..graph import Op, QuantizedGraph
    from ..requantizer import Requantizer

FloatEval = Callable[["Node", list["torch.Tensor"], dict[str, "torch.Tensor"]], "torch.Tensor"]
Lowerer = Callable[[Any, "Node"], None]  # (quantizer.quantize.Lowering, node)
Reference = Callable[["Op", list["np.ndarray"], "QuantizedGraph"], "np.ndarray"]
Requantizers = Callable[["Op", "QuantizedGraph"], list["Requantizer"]]
InputColumns = Callable[[dict[str, Any], tuple[int, ...], "torch.Tensor"], "torch.Tensor"]
Converter = Callable[[Any, Any], Any]  # (capture context, torch.fx.Node) -> captured value


@dataclass(frozen=True)
class Fusion:
    """ATen nodes that capture converts as one op: `convert` gives the root's value, and `interior` vanish.

    Each interior node must be read only inside the fusion (the root or other interior nodes); nodes the
    fusion merely reads through (the attention mask's cast and reshapes) vanish too when nothing else
    reads them, and are converted as usual when something does."""

    interior: frozenset[Any]  # torch.fx.Node
    inputs: tuple[Any, ...]  # the torch.fx.Nodes whose captured values `convert` reads
    convert: Converter  # (capture context, the root torch.fx.Node) -> captured value


Matcher = Callable[[Any], "Fusion | None"]  # (a torch.fx.Node of the root's ATen op) -> the fusion rooted there


class UnsupportedAttr(Exception):
    """Raised by a converter for a supported op used with an unsupported setting."""


@dataclass(frozen=True)
class OpDef:
    name: str
    summary: str  # one line of the IR specification (integer semantics), or of the float op
    attrs: type | None = None
    aten: Mapping[Any, Converter] = field(default_factory=dict)
    described_as: str = ""  # how the unsupported-op message names what capture accepts
    evaluate: FloatEval | None = None
    lower: Lowerer | None = None
    reference: Reference | None = None
    requantizers: Requantizers | None = None  # the typed requantizers lowering attached (read from the op)
    weights: tuple[str, ...] = ()  # float params that are weights: the op gets a bit-width
    constants: tuple[str, ...] = ()  # float params that are not weights (no bit-width): tables, gamma/beta
    fusions: Mapping[Any, Matcher] = field(default_factory=dict)  # ATen root op -> a matcher rooted there
    # (attrs, weight shape, input) -> the input as the columns the weight multiplies, [groups, K, samples]:
    # what GPTQ's Hessian H = X Xᵀ and the sensitivity analysis see.
    input_columns: InputColumns | None = None
    scale_preserving: bool = False  # output is on the input's integer grid (moves or selects values)
    absorbs_clamp: bool = False  # a clamp right after it folds into its requantizer's range
    joins_inputs: bool = False  # inputs meet on one grid (add, concat): their producers are tied
    # Why the op cannot read an int16 activation ("" where it can): a plan asking for one is refused.
    int16_refusal: str = ""
    # It reads its first input as int16 whatever the plan says (LayerNorm's statistics need the precision).
    wide_input: bool = False
    # Its output grid comes from calibration; False where the op fixes it (softmax's 1/255, an embedding
    # table's), so calibration skips the tensor.
    calibrated: bool = True

    @property
    def quantizable(self) -> bool:
        return bool(self.weights)

    @property
    def is_primitive(self) -> bool:
        """An integer op of the IR: backends must implement it."""
        return self.reference is not None

    def typed_attrs(self, attrs: Mapping[str, Any]) -> Any:
        """The node's attribute dict as this op's attributes dataclass (validated by its constructor)."""
        if self.attrs is None:
            return None
        names = {f.name for f in fields(self.attrs)}
        return self.attrs(**{k: v for k, v in attrs.items() if k in names})


OPS: dict[str, OpDef] = {}
ATEN_CONVERTERS: dict[Any, Converter] = {}
FUSIONS: dict[Any, list[Matcher]] = {}
_CONVERTER_LABELS: list[str] = []


def register(op: OpDef) -> OpDef:
    if op.name in OPS:
        raise AssertionError(f"op {op.name!r} registered twice")
    OPS[op.name] = op
    register_converters(op.aten, op.described_as)
    for target, matcher in op.fusions.items():
        FUSIONS.setdefault(target, []).append(matcher)
    return op


def register_converters(converters: Mapping[Any, Converter], described_as: str) -> None:
    """ATen converters that are not an op of their own (batch norm folds into a conv, dropout vanishes)."""
    for target, fn in converters.items():
        if target in ATEN_CONVERTERS:
            raise AssertionError(f"two converters for {target}")
        ATEN_CONVERTERS[target] = fn
    if described_as:
        _CONVERTER_LABELS.append(described_as)


def op_def(name: str) -> OpDef:
    try:
        return OPS[name]
    except KeyError:
        raise LowbitError(f"unknown op {name!r}; lowbit's ops are {', '.join(sorted(OPS))}") from None


def quantizable_ops() -> tuple[str, ...]:
    return tuple(name for name, op in OPS.items() if op.quantizable)


def primitives() -> tuple[str, ...]:
    """The integer ops every backend implements."""
    return tuple(name for name, op in OPS.items() if op.is_primitive)


def unlowered_ops() -> tuple[str, ...]:
    """Float ops with no integer lowering yet: capture and float evaluation only; `quantize` refuses them."""
    return tuple(name for name, op in OPS.items() if not op.is_primitive and op.lower is None)


def supported_description() -> str:
    """What capture accepts, for the unsupported-op message."""
    return ", ".join(_CONVERTER_LABELS)


def check_backend(qgraph: QuantizedGraph, supported: Mapping[str, Any] | set[str], backend: str) -> None:
    """Fail before any work, naming every op of `qgraph` that `backend` cannot run (not only the first)."""
    missing = [f"{o.name} ({o.op})" for o in qgraph.ops if o.op not in supported]
    if missing:
        kinds = sorted({o.op for o in qgraph.ops if o.op not in supported})
        raise LowbitError(f"the {backend} backend has no implementation of {', '.join(kinds)}, used by "
                          f"{len(missing)} op(s): {', '.join(missing)}")


def ir_spec() -> str:
    """The IR specification as markdown: each integer op and its semantics, then the float ops lowered to them.

    `docs/IR.md` is this text (`python -m lowbit.ir.ops > docs/IR.md`; a test keeps the two equal)."""
    integer = [f"- `{name}`: {OPS[name].summary}" for name in sorted(primitives())]
    lowered = [f"- `{name}`: {op.summary}" for name, op in sorted(OPS.items())
               if not op.is_primitive and op.lower is not None]
    unlowered = [f"- `{name}`: {OPS[name].summary}" for name in sorted(unlowered_ops())]
    float_only = ["## Float ops with no integer lowering yet (quantize refuses a graph that uses them)", "",
                  *unlowered, ""] if unlowered else []
    return "\n".join(["# lowbit's integer IR", "",
                      "Generated from the op registry (`lowbit/ir/ops`) by `python -m lowbit.ir.ops`.", "",
                      "## Integer ops (every backend implements these)", "", *integer, "",
                      "## Float ops that lower to the integer ops above", "", *lowered, "", *float_only])
