"""Digests of artifact directories, to show that a change left lowbit's outputs byte-identical.

    python scripts/artifact_digest.py DIR [DIR ...] > digest.json      # sha256 of model.onnx, model.int.onnx, IR arrays
    python scripts/artifact_digest.py --compare before.json after.json  # exit 1 if anything differs

Compare artifacts made on one machine with the same seed (GPTQ's float kernels differ between CPUs).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

from safetensors.numpy import load_file

FILES = ("model.onnx", "model.int.onnx")


def digest(directory: Path) -> dict:
    found: dict = {name: hashlib.sha256((directory / name).read_bytes()).hexdigest() for name in FILES}
    arrays = load_file(str(directory / "ir" / "ir.safetensors"))
    found["ir_arrays"] = {k: f"{hashlib.sha256(v.tobytes()).hexdigest()[:16]}:{v.dtype}:{list(v.shape)}"
                          for k, v in sorted(arrays.items())}
    return found


def compare(before: dict, after: dict) -> bool:
    same = True
    for name in sorted(set(before) | set(after)):
        if name not in before or name not in after:
            print(f"{name}: only in {'after' if name in after else 'before'}")
            same = False
            continue
        for key in (*FILES, "ir_arrays"):
            equal = before[name][key] == after[name][key]
            same &= equal
            print(f"{name:16s} {key:15s} {'identical' if equal else 'DIFFERENT'}")
    return same


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("paths", nargs="+", type=Path)
    parser.add_argument("--compare", action="store_true", help="compare two digest files")
    args = parser.parse_args()
    if args.compare:
        before, after = (json.loads(p.read_text()) for p in args.paths)
        return 0 if compare(before, after) else 1
    print(json.dumps({p.name: digest(p) for p in args.paths}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
