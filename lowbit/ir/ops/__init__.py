"""Every op lowbit knows, one module each, collected in `registry.OPS` (see `registry` for what an op holds).

Importing this package registers them all. A new op is a new module here plus its
line below; see README.md ("Ops: one module each").
"""

from . import (  # noqa: F401  (imported to register)
    add,
    avgpool,
    batch_norm,
    clamp,
    concat,
    conv,
    hardswish,
    identity,
    linear,
    lut,
    maxpool,
    pad,
    quantize,
    reshape,
    sigmoid,
)
from .registry import (
    ATEN_CONVERTERS,
    OPS,
    OpDef,
    UnsupportedAttr,
    check_backend,
    ir_spec,
    op_def,
    primitives,
    quantizable_ops,
    supported_description,
)

QUANTIZABLE_OPS = quantizable_ops()
SCALE_PRESERVING_OPS = tuple(name for name, op in OPS.items() if op.scale_preserving)

__all__ = ["ATEN_CONVERTERS", "OPS", "QUANTIZABLE_OPS", "SCALE_PRESERVING_OPS", "OpDef", "UnsupportedAttr",
           "check_backend", "ir_spec", "op_def", "primitives", "quantizable_ops", "supported_description"]
