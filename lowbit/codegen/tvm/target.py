"""Targets: the familiar string form ("llvm -mcpu=native -num-cores=2") turned into TVM's dict form.

TVM 0.27 rejects target strings with flags, so lowbit parses them itself. "native"
resolves to this machine's CPU name, so an artifact records the exact CPU it was
built for, plus the instruction sets the runtime checks before loading it.
"""

from __future__ import annotations

import shlex
from typing import Any

import tvm

from ...errors import LowbitError
from ...runtime.loader import X86_FEATURES, available_cpus

DEFAULT_TARGET = "llvm -mcpu=native"


def parse_target(spec: str, threads: int | None = None) -> dict[str, Any]:
    """"llvm -mcpu=native -num-cores=2" -> {"kind": "llvm", "mcpu": "znver3", "num-cores": 2}."""
    try:
        words = shlex.split(spec)
    except ValueError as e:
        raise LowbitError(f"--target {spec!r}: {e}") from None
    if words and words[0] == "cuda":
        raise LowbitError(f"--target {spec!r}: lowbit compiles for CPUs (llvm) only so far; its CUDA kernels are not "
                          "written yet")
    if not words or words[0] != "llvm":
        raise LowbitError(f"--target {spec!r}: the kind must be 'llvm' (a CPU), e.g. 'llvm -mcpu=native'")
    target: dict[str, Any] = {"kind": words[0]}
    for word in words[1:]:
        key, sep, value = word.lstrip("-").partition("=")
        if not sep:
            raise LowbitError(f"--target {spec!r}: expected -key=value, got {word!r}")
        target[key] = int(value) if value.isdigit() else value
    if target["kind"] == "llvm":
        if target.get("mcpu", "native") == "native":
            target["mcpu"] = tvm.target.codegen.llvm_get_system_cpu()
        if not tvm.target.codegen.llvm_is_valid_cpu(target["mcpu"], "x86_64-unknown-linux-gnu"):
            raise LowbitError(f"--target {spec!r}: LLVM does not know the CPU {target['mcpu']!r}")
        target.setdefault("num-cores", threads or available_cpus())
    try:
        tvm.target.Target(target)
    except Exception as e:  # TVM raises several error types for bad attributes
        raise LowbitError(f"--target {spec!r}: TVM rejects it: {e}") from None
    return target


def target_string(target: dict[str, Any]) -> str:
    """The dict back in the familiar form, for manifests and messages."""
    return " ".join([target["kind"], *(f"-{k}={v}" for k, v in target.items() if k != "kind")])


def required_features(target: dict[str, Any]) -> list[str]:
    """The instruction sets that code compiled for `target` may use (empty for non-CPU targets)."""
    if target["kind"] != "llvm":
        return []
    t = tvm.target.Target(target)
    return [f for f in X86_FEATURES if tvm.target.codegen.target_has_features(f, t)]

