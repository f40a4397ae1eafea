"""Backends that lower the integer IR to runnable artifacts."""

from .onnx import export_integer, export_qdq
from .onnx.check import float_tensors_between

__all__ = ["export_integer", "export_qdq", "float_tensors_between"]
