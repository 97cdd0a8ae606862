"""Sample IDs: safe file-system names, unique within a run, and their store paths.

A slide's ID is its file stem made safe: Unicode letters and digits are kept (NFC, so the same name
typed on macOS and Linux is one ID), as are ``.``, ``_`` and ``-``; every run of anything else
(spaces, punctuation, symbols, control characters, bytes that are not UTF-8) becomes one ``_``; no
leading dot, never ``.`` or ``..``; at most 180 UTF-8 bytes, so ``<id>-2.ome.zarr`` and the other
outputs' names stay under the usual 255-byte limit. A TMA core adds its grid position:
``<slide>/<core>`` (``tma01/B3``); the store of such a sample is ``<root>/tma01/B3.zarr``.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterable, Mapping
from pathlib import Path

from equislide.storage._errors import SampleIdError

__all__ = ["STORE_SUFFIX", "safe_sample_id", "sample_store_path", "split_sample_id", "unique_sample_ids"]

#: Suffix of a finished per-sample store folder.
STORE_SUFFIX = ".zarr"

_MAX_BYTES = 180
_RUNS = re.compile(r"_{2,}")


def _keep(ch: str) -> bool:
    """Letters and digits of any script (their combining marks too), and ``._-``."""
    return ch in "._-" or ch.isalnum() or unicodedata.category(ch) in ("Mn", "Mc")


def _is_safe_part(part: str) -> bool:
    return (
        bool(part)
        and part[0] != "."
        and part.strip("_") != ""
        and all(_keep(c) for c in part)
        and (unicodedata.normalize("NFC", part) == part and len(part.encode("utf-8")) <= _MAX_BYTES)
    )


def safe_sample_id(stem: str) -> str:
    """Make one ID part (a file stem or a core name) safe as a single path component.

    Unicode letters and digits stay (NFC-normalised: ``組織``, ``é`` as one code point); every run of other
    characters outside them and ``._-`` becomes one ``_``; leading dots are dropped (no hidden files, no
    ``.``/``..``), and the result is cut to 180 UTF-8 bytes. ``/`` and ``\\`` are replaced too, so the
    result can never traverse folders.

    Args:
        stem: Any text, e.g. ``Path(p).stem`` (lone surrogates from undecodable bytes are replaced).

    Returns:
        A non-empty ID part of letters, digits and ``._-``, not starting with a dot.

    Raises:
        SampleIdError: Nothing usable is left (e.g. ``""``, ``"..."``).
    """
    text = unicodedata.normalize("NFC", str(stem))
    text = "".join(ch if _keep(ch) else "_" for ch in text)
    text = _RUNS.sub("_", text).lstrip(".")
    while len(text.encode("utf-8")) > _MAX_BYTES:
        text = text[:-1]
    text = text.rstrip(".")
    if not text or not text.strip("_"):
        raise SampleIdError(
            f"sample ID from {stem!r} is empty after making it safe (no letter or digit); rename the file"
        )
    return text


def split_sample_id(sample_id: str) -> tuple[str, ...]:
    """Check a full sample ID (``slide`` or ``slide/core``) and return its parts.

    Raises:
        SampleIdError: A part is not safe (use :func:`safe_sample_id` on each part first).
    """
    parts = tuple(str(sample_id).split("/"))
    if not 1 <= len(parts) <= 2 or not all(_is_safe_part(p) for p in parts):
        raise SampleIdError(
            f"sample_id={sample_id!r} is not '<slide>' or '<slide>/<core>' made of safe parts "
            "(letters, digits, ._-, NFC, no leading dot); build it with safe_sample_id()"
        )
    return parts


def sample_store_path(root: str | Path, sample_id: str) -> Path:
    """The finished store of ``sample_id`` under ``root``: ``<root>/<slide>[/<core>].zarr``."""
    parts = split_sample_id(sample_id)
    return Path(root).joinpath(*parts[:-1], parts[-1] + STORE_SUFFIX)


def unique_sample_ids(
    paths: Iterable[str | Path], names: Mapping[str | Path, str] | None = None
) -> dict[Path, str]:
    """Safe, unique sample IDs for input files, deterministic whatever the input order.

    IDs come from the file stems (:func:`safe_sample_id`), or from ``names`` where it gives one (a
    manifest's ``sample_id`` column, made safe the same way). Paths are sorted; given names claim their
    ID first, then the first path of a clashing group keeps the plain ID and the others get ``-2``,
    ``-3``, ... (skipping IDs that any file has as its own). Clashes are case-insensitive (``casefold``)
    so stores stay distinct on case-insensitive file systems.

    Args:
        paths: Input files (duplicates of the same path count once).
        names: ``{path: sample ID}`` for some of them; two paths given the same name clash like stems.

    Returns:
        ``{path: sample_id}`` in sorted path order.

    Raises:
        SampleIdError: A given name has nothing usable left once made safe.
    """
    given = {Path(k): safe_sample_id(v) for k, v in (names or {}).items()}
    ordered = sorted({Path(p) for p in paths}, key=lambda p: (str(p).casefold(), str(p)))
    bases = {p: given.get(p) or safe_sample_id(p.stem if p.suffix else p.name) for p in ordered}
    # First pass: given names, then the first path of each (case-insensitive) base keep it, so a file
    # whose own stem is "slide-2" is never pushed aside by a suffixed duplicate of "slide".
    out: dict[Path, str] = {}
    taken: set[str] = set()
    for path in sorted(ordered, key=lambda p: p not in given):  # stable: sorted order within each
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
