"""Atomic writes: a file or a whole directory appears complete, or not at all.

Every writer in lowbit that publishes a file (manifests, tvm.json, `lowbit run -o`) or an
output directory (`quantize`, `sensitivity`, `search`) goes through here.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

from .errors import LowbitError

__all__ = ["atomic_directory", "atomic_file", "check_output_dir", "publish_permissions", "write_json"]


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def publish_permissions(path: Path) -> None:
    """Give `path` (and everything under it) the usual permissions: mkstemp/mkdtemp create private 0600/0700 ones."""
    umask = _umask()
    for p in [path, *path.rglob("*")] if path.is_dir() else [path]:
        os.chmod(p, (0o777 if p.is_dir() else 0o666) & ~umask)


@contextmanager
def atomic_file(path: Path, mode: str = "w") -> Iterator[IO[Any]]:
    """Open a temporary file next to `path` for writing; on success it replaces `path` in one rename.

    On any failure, KeyboardInterrupt included, the temporary file is deleted and `path` is untouched.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, mode) as f:
            yield f
        publish_permissions(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: Path, data: Any) -> None:
    """`data` as indented JSON (NaN refused: it is not JSON), written atomically."""
    text = json.dumps(data, indent=2, allow_nan=False) + "\n"
    with atomic_file(path) as f:
        f.write(text)


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
        publish_permissions(tmp)
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


def packaged_path(module: str, relative: str | Path, needed_for: str, install: str) -> Path:
    """A file or folder shipped inside an installed package (found with `find_spec`, never imported).

    A LowbitError says `needed_for` needs the package and gives the `install` command (a pip line) when the
    package or the path inside it is missing."""
    import importlib.util

    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise LowbitError(f"{needed_for} needs a package that is not installed (module {module!r}); install it "
                          f"with: {install}")
    for location in spec.submodule_search_locations:
        path = Path(location) / relative
        if path.exists():
            return path
    raise LowbitError(f"the package of module {module!r} is installed but has no {relative}; reinstall it with: "
                      f"{install} --force-reinstall")
