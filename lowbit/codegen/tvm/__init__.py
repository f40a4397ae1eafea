"""The TVM backend: lowbit's integer IR -> Relax (BlockBuilder + TE kernels) -> a compiled library.

Using this package needs `apache-tvm`; the rest of lowbit works without it. Its names load on first use, so
the TVM-free parts (`x86.packing`, `x86.requant`) import, and test, without TVM.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {"build": "compile", "compile_to": "compile", "Lowered": "lower", "check_supported": "lower",
            "lower": "lower", "DEFAULT_TARGET": "target", "parse_target": "target", "target_string": "target"}

__all__ = ["DEFAULT_TARGET", "Lowered", "build", "check_supported", "compile_to", "lower", "parse_target",
           "target_string"]


def __getattr__(name: str) -> Any:
    """Import the module that defines `name` on first use (PEP 562)."""
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
