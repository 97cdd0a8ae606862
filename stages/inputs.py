"""The inputs stage: sample IDs per input file, and the records and one-line reasons of failed inputs.

Shared by the cohort flow and ``equislide tile``; a notebook calls :func:`assign_sample_ids` first.
"""

from __future__ import annotations

import errno
from pathlib import Path
from typing import Any

from equislide.text import one_line, path_text

__all__ = ["assign_sample_ids", "duplicate_inputs", "failed_record", "one_line", "path_text", "reason_of"]


def reason_of(err: BaseException) -> str:
    """A one-line reason for a failed input: a slide error's own reason, a budget's or a crashed
    child's message, else the class and message."""
    from equislide.stages.budget import BudgetExceeded, ChildFailed
    from equislide.tiling import SlideError

    if isinstance(err, SlideError):
        return one_line(err.reason + (f" ({err.detail})" if err.detail else ""))
    from equislide.storage.confine import OutsideOutputError

    if isinstance(err, (BudgetExceeded, ChildFailed, OutsideOutputError)):
        return one_line(err)
    if isinstance(err, OSError) and err.errno in _DISK_FULL:
        where = err.filename or "the output"
        return one_line(f"disk full writing {where} ({err.strerror}); free space and rerun")
    return f"unexpected {type(err).__name__}: {one_line(err)}"


# No space, quota exceeded, or a file-size limit (RLIMIT_FSIZE): to the run, the same full disk.
_DISK_FULL = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}


def failed_record(path: str, reason: str, error: str, *, sample_id: str | None = None) -> dict[str, Any]:
    """The report record of an input that produced nothing."""
    return {
        "path": path_text(path),
        "sample_id": sample_id,
        "sha256": None,
        "status": "failed",
        "reason": reason,
        "error": error,
        "samples": [],
        "tiles": 0,
        "tiles_written": 0,
        "warnings": [],
        "seconds": 0.0,
    }


def assign_sample_ids(paths: list[str]) -> tuple[dict[str, str], dict[str, dict[str, Any]]]:
    """Unique sample IDs per input (file stem made safe); inputs whose name gives none fail here.

    Returns:
        ``({path: sample_id}, {path: failed record})``.
    """
    from equislide.storage import SampleIdError, safe_sample_id, unique_sample_ids

    good, failed = [], {}
    for p in paths:
        path = Path(p)
        try:
            safe_sample_id(path.stem if path.suffix else path.name)
            good.append(p)
        except SampleIdError:
            failed[p] = failed_record(
                p,
                f"no usable sample ID in the file name {path_text(path.name)!r}; rename the file",
                "SampleIdError",
            )
    ids = unique_sample_ids(good)
    return {p: ids[Path(p)] for p in good}, failed


def duplicate_inputs(paths: list[str]) -> list[tuple[str, str]]:
    """Pairs ``(first, other)`` of inputs with the same bytes under two paths (regular files only).

    Sizes are compared first; only files of equal size are hashed, so a cohort of distinct slides costs
    one ``stat`` per input. Each duplicate is paired with the first path (in the given order) holding
    its bytes, so a file given under three names gives two pairs.
    """
    import os

    from equislide.files import sha256_file

    by_size: dict[int, list[str]] = {}
    for p in paths:
        try:
            st = os.stat(p)
        except (OSError, ValueError):
            continue
        if os.path.isfile(p):
            by_size.setdefault(st.st_size, []).append(p)
    pairs = []
    for group in by_size.values():
        if len(group) < 2:
            continue
        first: dict[str, str] = {}
        for p in group:
            try:
                digest = sha256_file(p)
            except OSError:
                continue
            if digest in first:
                pairs.append((first[digest], p))
            else:
                first[digest] = p
    return pairs
