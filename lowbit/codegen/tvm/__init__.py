"""The TVM backend: lowbit's integer IR -> Relax (BlockBuilder + TE kernels) -> a compiled library.

Importing this package needs `apache-tvm`; the rest of lowbit works without it.
"""

from .compile import build, compile_to
from .lower import Lowered, check_supported, lower
from .target import DEFAULT_TARGET, parse_target, target_string

__all__ = ["DEFAULT_TARGET", "Lowered", "build", "check_supported", "compile_to", "lower", "parse_target",
           "target_string"]
