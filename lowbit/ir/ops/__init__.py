"""Every op lowbit knows, one module each, collected in `registry.OPS` (see `registry` for what an op holds).

Importing this package registers them all. A new op is a new module here plus its
line below; see README.md ("Ops: one module each").
"""

from . import (  # noqa: F401  (imported to register)
    add,
    add_constant,
    avgpool,
    batch_norm,
    clamp,
    concat,
    conv,
    embedding,
    gelu,
    hardswish,
    identity,
    layer_norm,
    linear,
    lut,
    masked_mean,
    matmul,
    maxpool,
    pad,
    permute,
    quantize,
    reshape,
    sigmoid,
    softmax,
)
from .registry import (
    ATEN_CONVERTERS,
    FUSIONS,
    OPS,
    Fusion,
    OpDef,
    UnsupportedAttr,
    check_backend,
    ir_spec,
    op_def,
    primitives,
    quantizable_ops,
    supported_description,
    unlowered_ops,
)

QUANTIZABLE_OPS = quantizable_ops()
SCALE_PRESERVING_OPS = tuple(name for name, op in OPS.items() if op.scale_preserving)

__all__ = ["ATEN_CONVERTERS", "FUSIONS", "OPS", "QUANTIZABLE_OPS", "SCALE_PRESERVING_OPS", "Fusion", "OpDef",
           "UnsupportedAttr", "check_backend", "ir_spec", "op_def", "primitives", "quantizable_ops",
           "supported_description", "unlowered_ops"]
