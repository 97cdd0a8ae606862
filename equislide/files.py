"""One helper per file job every room shares: atomic writes, atomic folder publish, SHA-256 of a file.

Why one place: an earlier count found about eight hand-written variants of "write a temporary file and
rename it", one with a fixed ``.tmp`` name that two writers racing on the same target could clobber.
Every temporary name here is unique (``.<name>.tmp-<12 hex>`` beside the target, so the rename never
crosses a file system) and is removed when the write fails.

Stdlib only: the libraries (``tiling``, ``models``, ``storage``) import it without pulling anything in.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

__all__ = [
    "atomic_path",
    "atomic_write_bytes",
    "atomic_write_json",
    "publish_dir",
    "read_json",
    "sha256_file",
    "temporary_name",
]


def temporary_name(path: str | os.PathLike[str], tag: str = "tmp") -> Path:
    """A unique hidden sibling of ``path``: ``.<name>.<tag>-<12 hex>`` in the same folder."""
    path = Path(path)
    return path.with_name(f".{path.name}.{tag}-{uuid.uuid4().hex[:12]}")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str], *, fsync: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling of ``path`` to write; on success it replaces ``path`` atomically.

    For writers that insist on a file name of their own (safetensors' ``save_file``, PIL's ``save``).
    Parents are created. On an exception the temporary file is removed and ``path`` is untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_name(path)
    try:
        yield tmp
        if fsync:
            with open(tmp, "rb+") as fh:
                os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes, *, fsync: bool = False) -> Path:
    """Write ``data`` to ``path`` atomically (readers see the old file or the new one, never half)."""
    with atomic_path(path, fsync=fsync) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def atomic_write_json(
    path: str | os.PathLike[str],
    doc: Any,
    *,
    indent: int | None = 1,
    sort_keys: bool = True,
    fsync: bool = False,
    default: Callable[[Any], Any] | None = None,
) -> Path:
    """Write ``doc`` as UTF-8 JSON plus a newline, atomically (see :func:`atomic_write_bytes`)."""
    text = json.dumps(doc, indent=indent, sort_keys=sort_keys, default=default) + "\n"
    return atomic_write_bytes(path, text.encode("utf-8"), fsync=fsync)


def read_json(path: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The JSON object in ``path``; None when it is missing, unreadable or not an object."""
    try:
        doc = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) else None


def _fsync_tree(path: Path) -> None:
    """Flush written files to disk before the rename publishes them (best effort on odd file systems)."""
    for dirpath, _, files in os.walk(path):
        for name in files:
            try:
                fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            except OSError:
                continue
            try:
                os.fsync(fd)
            except OSError:
                pass
            finally:
                os.close(fd)


def publish_dir(
    partial: str | os.PathLike[str],
    path: str | os.PathLike[str],
    *,
    marker: tuple[str, Mapping[str, Any]] | None = None,
    fsync: bool = True,
    old_tag: str = ".replaced-",
) -> Path:
    """Rename the finished folder ``partial`` to ``path`` atomically, replacing an older ``path``.

    ``marker = (name, doc)`` is written into ``partial`` first (the done-marker readers look for), so
    a folder is only ever seen complete. An older ``path`` is moved aside before the rename and removed
    after it: a crash at any point leaves the old result or the new one, never a mixture.
    """
    partial, path = Path(partial), Path(path)
    if marker is not None:
        name, doc = marker
        (partial / name).write_text(json.dumps(dict(doc), sort_keys=True, indent=1) + "\n")
    if fsync:
        _fsync_tree(partial)
    old = None
    if path.exists():
        old = path.with_name(path.name + old_tag + uuid.uuid4().hex[:12])
        os.replace(path, old)
    os.replace(partial, path)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return path


def sha256_file(path: str | os.PathLike[str], *, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file, read in ``chunk``-byte pieces (constant memory)."""
    if chunk <= 0:
        raise ValueError(f"chunk={chunk} must be > 0")
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()
