"""The artifact directory: written atomically, described and checksummed by `manifest.json`."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ..errors import LowbitError
from ..runtime.loader import MANIFEST, sha256_file

__all__ = ["MANIFEST", "atomic_directory", "check_output_dir", "file_hashes", "sha256_file", "verify_manifest",
           "write_json"]

ARTIFACT_FORMAT = "lowbit-artifact"
ARTIFACT_VERSION = 1


def check_output_dir(dest: Path, force: bool) -> None:
    """Refuse to overwrite an existing DIR unless --force (checked before any work starts)."""
    if dest.exists() or dest.is_symlink():
        if not dest.is_dir() or dest.is_symlink():
            raise LowbitError(f"{dest}: exists and is not a directory; choose another output path")
        if not force:
            raise LowbitError(f"{dest}: output directory already exists; pass --force to replace it")
        return
    # DIR's parents are created at the end: a file in their place would fail only then, after the slow part.
    existing = next(parent for parent in dest.parents if parent.exists())
    if not existing.is_dir():
        raise LowbitError(f"{dest}: cannot be created, as {existing} is a file; choose another output path")


def _publish_permissions(directory: Path) -> None:
    """Give the artifact the usual permissions: mkdtemp (and some writers) create private, 0600/0700 entries."""
    umask = os.umask(0)
    os.umask(umask)
    for path in [directory, *directory.rglob("*")]:
        os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~umask)


@contextmanager
def atomic_directory(dest: Path, force: bool = False) -> Iterator[Path]:
    """Yield an empty temporary directory next to `dest`; on success it becomes `dest` in one rename.

    On any failure, KeyboardInterrupt included, the temporary directory is deleted, so
    no partial `dest` is ever visible. With `force`, an existing `dest` is replaced only
    once the new one is complete.
    """
    check_output_dir(dest, force)
    dest.parent.mkdir(parents=True, exist_ok=True)
    # Same parent, so same filesystem: the final rename is atomic.
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
    try:
        yield tmp
        _publish_permissions(tmp)
        _move_into_place(tmp, dest, force)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _move_into_place(tmp: Path, dest: Path, force: bool) -> None:
    check_output_dir(dest, force)  # again: something may have appeared while we worked
    if not dest.exists():
        os.rename(tmp, dest)
        return
    old = dest.parent / f".{dest.name}.old-{secrets.token_hex(4)}"
    os.rename(dest, old)
    try:
        os.rename(tmp, dest)
    except BaseException:
        os.rename(old, dest)  # put the previous artifact back
        raise
    shutil.rmtree(old, ignore_errors=True)


def file_hashes(directory: Path, exclude: tuple[str, ...] = (MANIFEST,)) -> dict[str, dict[str, Any]]:
    """Relative POSIX path -> {sha256, bytes} for every file under `directory`, sorted by path."""
    files = sorted(p for p in directory.rglob("*") if p.is_file())
    hashes = {}
    for path in files:
        rel = path.relative_to(directory).as_posix()
        if rel not in exclude:
            hashes[rel] = {"sha256": sha256_file(path), "bytes": path.stat().st_size}
    return hashes


def write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2, allow_nan=False) + "\n")


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
