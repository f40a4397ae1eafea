"""lowbit's constant-time lookup of the TVMScript parser behind a macro call finds what TVM's own finds."""

from __future__ import annotations

import pytest

pytest.importorskip("tvm")

from tvm.script.parser.core.parser import ScriptMacro  # noqa: E402

from lowbit.codegen.tvm import script_speed  # noqa: E402


def _both_lookups() -> tuple[object, object]:
    """Called a few frames below an eval whose globals hold the parser, as a macro's `__call__` is."""
    def inner() -> tuple[object, object]:
        return script_speed.TVM_FIND_PARSER_DEF(None), script_speed._find_parser_def(None)
    return inner()


def test_finds_the_same_parser_as_tvm() -> None:
    sentinel, shadow = object(), object()
    # the nearest frame with the name wins, as in TVM: an outer one holds another object
    outer = {ScriptMacro.parser_object_name: shadow, "inner": lambda: eval("lookups()", {
        ScriptMacro.parser_object_name: sentinel, "lookups": _both_lookups})}
    tvm_found, ours = eval("inner()", outer)
    assert tvm_found is sentinel and ours is sentinel


def test_no_parser_raises_like_tvm() -> None:
    for lookup in (script_speed.TVM_FIND_PARSER_DEF, script_speed._find_parser_def):
        with pytest.raises(RuntimeError, match=ScriptMacro.parser_object_name):
            lookup(None)


def test_installed_for_lowbit_kernels() -> None:
    assert ScriptMacro._find_parser_def is script_speed._find_parser_def
