"""ONNX export of the integer IR: `model.int.onnx` (integer-only, bit-exact) and `model.onnx` (QDQ, fast)."""

from . import transformer  # noqa: F401  (registers the encoder ops' integer converters)
from .integer import INTEGER_CONVERTERS, export_integer
from .qdq import ONNX_WEIGHTS, QDQ_CONVERTERS, export_qdq, saturation_safe_weights, u8s8_exact_here

__all__ = ["INTEGER_CONVERTERS", "ONNX_WEIGHTS", "QDQ_CONVERTERS", "export_integer", "export_qdq",
           "saturation_safe_weights", "u8s8_exact_here"]
