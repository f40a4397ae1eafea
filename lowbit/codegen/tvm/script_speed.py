"""TVMScript parses `T.macro` calls in time proportional to the whole Python stack; make it constant.

apache-tvm 0.27's `ScriptMacro._find_parser_def` finds the parser that expands a macro with
`inspect.getouterframes(...)`, which reads one line of source for every frame on the stack (and maps each
frame to its module through `inspect.getmodule`, a scan of `sys.modules`). The parser recurses deeply and
lowbit's kernels call macros hundreds of times (MobileNetV2: 806 calls for 53 layers), so the lookup alone
took 19% of `lower`'s wall time on MiniLM (67.0 s -> 54.5 s, same background load, identical module).

The replacement walks the same frames in the same order (the current one, then each caller) and tests the
same condition, without building frame records: the parser is found two frames up, in the globals of the
expression the parser is evaluating.
"""

from __future__ import annotations

import sys
from types import FrameType
from typing import Any

from tvm.script.parser.core.parser import ScriptMacro

TVM_FIND_PARSER_DEF = ScriptMacro.__dict__["_find_parser_def"]  # TVM's own, kept for the equivalence test


def find_macro_parser(start: FrameType) -> Any:
    """The TVMScript parser expanding the macro being called: the first frame from `start` outwards whose
    globals hold it, exactly the frame `_find_parser_def` would find."""
    frame: FrameType | None = start
    while frame is not None:
        parser = frame.f_globals.get(ScriptMacro.parser_object_name)
        if parser is not None:
            return parser
        frame = frame.f_back
    raise RuntimeError(f"{ScriptMacro.parser_object_name} not available")


def _find_parser_def(self: ScriptMacro) -> Any:
    return find_macro_parser(sys._getframe(0))


def install() -> None:
    """Use `find_macro_parser` for every macro (idempotent). Only TVM's own lookup is replaced."""
    if getattr(ScriptMacro, "_find_parser_def", None) is not _find_parser_def:
        ScriptMacro._find_parser_def = _find_parser_def
