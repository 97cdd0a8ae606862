"""Sample IDs: safe file-system names, unique within a run, and their store paths.

A slide's ID is its file stem made safe (characters outside ``[A-Za-z0-9._-]`` become ``_``, no leading
dot, never ``.`` or ``..``). A TMA core adds its grid position: ``<slide>/<core>`` (``tma01/B3``); the
store of such a sample is ``<root>/tma01/B3.zarr``.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterable
from pathlib import Path

from equislide.storage._errors import SampleIdError

__all__ = ["STORE_SUFFIX", "safe_sample_id", "sample_store_path", "split_sample_id", "unique_sample_ids"]

#: Suffix of a finished per-sample store folder.
STORE_SUFFIX = ".zarr"

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")
_SAFE_PART = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]*")
_MAX_LEN = 200


def safe_sample_id(stem: str) -> str:
    """Make one ID part (a file stem or a core name) safe as a single path component.

    Accents are stripped (``é`` -> ``e``), every run of other characters outside ``[A-Za-z0-9._-]``
    becomes one ``_``, leading dots are dropped (no hidden files, no ``.``/``..``), and the result is cut to
    200 characters. ``/`` and ``\\`` are replaced too, so the result can never traverse folders.

    Args:
        stem: Any text, e.g. ``Path(p).stem``.

    Returns:
        A non-empty ID part matching ``[A-Za-z0-9_-][A-Za-z0-9._-]*``.

    Raises:
        SampleIdError: Nothing usable is left (e.g. ``""``, ``"..."``).
    """
    text = unicodedata.normalize("NFKD", str(stem)).encode("ascii", "ignore").decode("ascii")
    text = _UNSAFE.sub("_", text).lstrip(".")
    text = text[:_MAX_LEN].rstrip(".")
    if not text or not text.strip("_"):
        raise SampleIdError(f"sample ID from {stem!r} is empty after making it safe; rename the file")
    return text


def split_sample_id(sample_id: str) -> tuple[str, ...]:
    """Check a full sample ID (``slide`` or ``slide/core``) and return its parts.

    Raises:
        SampleIdError: A part is not safe (use :func:`safe_sample_id` on each part first).
    """
    parts = tuple(str(sample_id).split("/"))
    if not 1 <= len(parts) <= 2 or not all(_SAFE_PART.fullmatch(p) and p.strip("_") for p in parts):
        raise SampleIdError(
            f"sample_id={sample_id!r} is not '<slide>' or '<slide>/<core>' made of safe parts "
            "([A-Za-z0-9._-], no leading dot); build it with safe_sample_id()"
        )
    return parts


def sample_store_path(root: str | Path, sample_id: str) -> Path:
    """The finished store of ``sample_id`` under ``root``: ``<root>/<slide>[/<core>].zarr``."""
    parts = split_sample_id(sample_id)
    return Path(root).joinpath(*parts[:-1], parts[-1] + STORE_SUFFIX)


def unique_sample_ids(paths: Iterable[str | Path]) -> dict[Path, str]:
    """Safe, unique sample IDs for input files, deterministic whatever the input order.

    IDs come from the file stems (:func:`safe_sample_id`). Paths are sorted; the first of a clashing group
    keeps the plain ID and the others get ``-2``, ``-3``, ... (skipping IDs that any file has as its own).
    Clashes are case-insensitive so stores stay distinct on case-insensitive file systems.

    Args:
        paths: Input files (duplicates of the same path count once).

    Returns:
        ``{path: sample_id}`` in sorted path order.
    """
    ordered = sorted({Path(p) for p in paths}, key=lambda p: (str(p).casefold(), str(p)))
    bases = {p: safe_sample_id(p.stem if p.suffix else p.name) for p in ordered}
    # First pass: the first path of each (case-insensitive) base keeps it, so a file whose own stem is
    # "slide-2" is never pushed aside by a suffixed duplicate of "slide".
    out: dict[Path, str] = {}
    taken: set[str] = set()
    for path in ordered:
        if bases[path].casefold() not in taken:
            taken.add(bases[path].casefold())
            out[path] = bases[path]
    for path in ordered:
        if path in out:
            continue
        k = 2
        while f"{bases[path]}-{k}".casefold() in taken:
            k += 1
        out[path] = f"{bases[path]}-{k}"
        taken.add(out[path].casefold())
    return {p: out[p] for p in ordered}
