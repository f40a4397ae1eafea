"""The TVM backend: lowbit's integer IR -> Relax (BlockBuilder + TE kernels) -> a compiled library.

Using this package needs `apache-tvm`; the rest of lowbit works without it. Without TVM, this package still
imports (so do its TVM-free modules, `x86.packing` and `x86.requant`), and its names raise TVM's import error.
"""

from __future__ import annotations

from typing import Any

__all__ = ["DEFAULT_TARGET", "Lowered", "build", "check_supported", "compile_to", "lower", "parse_target",
           "target_string"]

try:
    from . import script_speed

    script_speed.install()  # before any kernel is parsed
    from . import encoder  # noqa: F401  (registers the encoder ops' converters)
    from .compile import build, compile_to
    from .lower import Lowered, check_supported, lower
    from .target import DEFAULT_TARGET, parse_target, target_string
except ModuleNotFoundError as missing:
    if missing.name != "tvm" and not (missing.name or "").startswith("tvm."):
        raise
    _tvm_missing = str(missing)

    def __getattr__(name: str) -> Any:
        if name in __all__:
            raise ModuleNotFoundError(f"lowbit.codegen.tvm.{name} needs apache-tvm: {_tvm_missing}", name="tvm")
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
