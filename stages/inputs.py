"""The inputs stage: sample IDs per input file, and the records and one-line reasons of failed inputs.

Shared by the cohort flow and ``equislide tile``; a notebook calls :func:`assign_sample_ids` first.
"""

from __future__ import annotations

import errno
from pathlib import Path
from typing import Any

from equislide.text import one_line

__all__ = ["assign_sample_ids", "failed_record", "one_line", "reason_of"]


def reason_of(err: BaseException) -> str:
    """A one-line reason for a failed input: a slide error's own reason, else the class and message."""
    from equislide.tiling import SlideError

    if isinstance(err, SlideError):
        return err.reason + (f" ({err.detail})" if err.detail else "")
    if isinstance(err, OSError) and err.errno in _DISK_FULL:
        return f"disk full writing {err.filename or 'the output'} ({err.strerror}); free space and rerun"
    return f"unexpected {type(err).__name__}: {one_line(err)}"


# No space, quota exceeded, or a file-size limit (RLIMIT_FSIZE): to the run, the same full disk.
_DISK_FULL = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}


def failed_record(path: str, reason: str, error: str, *, sample_id: str | None = None) -> dict[str, Any]:
    """The report record of an input that produced nothing."""
    return {
        "path": path,
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
                p, f"no usable sample ID in the file name {path.name!r}; rename the file", "SampleIdError"
            )
    ids = unique_sample_ids(good)
    return {p: ids[Path(p)] for p in good}, failed
