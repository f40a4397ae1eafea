"""Backends that lower the integer IR to runnable artifacts."""

from .onnx_check import float_tensors_between
from .onnx_export import export_integer, export_qdq

__all__ = ["export_integer", "export_qdq", "float_tensors_between"]
