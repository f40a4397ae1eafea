"""BENCHMARKS.md holds one section per benchmark script; each script regenerates only its own."""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path


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
