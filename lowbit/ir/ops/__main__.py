"""`python -m lowbit.ir.ops`: print the IR specification (every integer op and its semantics)."""

from . import ir_spec

print(ir_spec(), end="")
