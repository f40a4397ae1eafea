"""The artifact directory's `manifest.json`: what each file is, and its checksum (written through lowbit.io)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..runtime.loader import MANIFEST, sha256_file

__all__ = ["ARTIFACT_FORMAT", "ARTIFACT_VERSION", "MANIFEST", "file_hashes", "sha256_file", "update_manifest",
           "verify_manifest"]

ARTIFACT_FORMAT = "lowbit-artifact"
ARTIFACT_VERSION = 1


def file_hashes(directory: Path, exclude: tuple[str, ...] = (MANIFEST,)) -> dict[str, dict[str, Any]]:
    """Relative POSIX path -> {sha256, bytes} for every file under `directory`, sorted by path."""
    files = sorted(p for p in directory.rglob("*") if p.is_file())
    hashes = {}
    for path in files:
        rel = path.relative_to(directory).as_posix()
        if rel not in exclude:
            hashes[rel] = {"sha256": sha256_file(path), "bytes": path.stat().st_size}
    return hashes


def verify_manifest(directory: Path) -> list[str]:
    """Problems found checking the files against `manifest.json` (empty when everything matches)."""
    try:
        manifest = json.loads((directory / MANIFEST).read_text())
    except (OSError, ValueError) as e:
        return [f"{directory / MANIFEST}: cannot read: {e}"]
    expected = manifest.get("files", {})
    actual = file_hashes(directory)
    problems = [f"{name}: missing" for name in sorted(set(expected) - set(actual))]
    problems += [f"{name}: not listed in the manifest" for name in sorted(set(actual) - set(expected))]
    problems += [f"{name}: sha256 mismatch" for name in sorted(set(expected) & set(actual))
                 if expected[name]["sha256"] != actual[name]["sha256"]]
    return problems


def update_manifest(directory: Path, tvm_summary: dict[str, Any]) -> None:
    """Record a (re)compiled model in `manifest.json` and re-hash every file; the manifest is replaced atomically."""
    from ..errors import LowbitError
    from ..io import write_json

    path = directory / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise LowbitError(f"{path}: cannot read: {e}") from e
    manifest["tvm"] = tvm_summary
    manifest["files"] = file_hashes(directory)
    write_json(path, manifest)
