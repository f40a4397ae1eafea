"""The artifact directory's `manifest.json`: what each file is, and its checksum (written through lowbit.io)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..runtime.loader import MANIFEST, file_hashes, sha256_file, verify_manifest

__all__ = ["ARTIFACT_FORMAT", "ARTIFACT_VERSION", "MANIFEST", "file_hashes", "sha256_file", "update_manifest",
           "verify_manifest"]

ARTIFACT_FORMAT = "lowbit-artifact"
ARTIFACT_VERSION = 1


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
