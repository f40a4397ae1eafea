"""BENCHMARKS.md holds one section per benchmark script; each script regenerates only its own.

Also what every section records about where it was measured: the CPU and the git state.
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
from pathlib import Path

import lowbit


def write_section(path: Path, name: str, text: str) -> None:
    """Replace (or append) the block between `<!-- begin NAME -->` and `<!-- end NAME -->`, atomically."""
    begin, end = f"<!-- begin {name} -->", f"<!-- end {name} -->"
    block = f"{begin}\n{text.rstrip()}\n{end}\n"
    old = path.read_text() if path.exists() else ""
    pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end) + r"\n?", re.S)
    new = pattern.sub(lambda _: block, old) if pattern.search(old) else (old.rstrip() + "\n\n" + block).lstrip()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(new)
        os.chmod(tmp, 0o644)  # mkstemp makes it private; the report is for everyone
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def cpu_info() -> tuple[str, set[str]]:
    """The CPU model name and its feature flags, from /proc/cpuinfo."""
    model, flags = "unknown", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and model == "unknown":
                model = value.strip()
            elif key.strip() == "flags" and not flags:
                flags = set(value.split())
    except OSError:
        pass
    return model, flags


def lowbit_revision() -> str:
    """The git commit of the lowbit checkout, marked when tracked files have uncommitted changes."""
    root = Path(lowbit.__file__).resolve().parent.parent
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                                check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "not a git checkout"
    return f"git {commit}" + (" with uncommitted changes" if dirty else "")
