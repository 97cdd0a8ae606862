"""The inputs stage: which files a run takes, sample IDs per input file, and the records and one-line
reasons of failed inputs.

A cohort is given as files, globs (``/data/inbox/**/*.svs``, recursive), folders (every slide or image
file under it) or a manifest CSV (:func:`read_manifest`); :func:`resolve_inputs` turns that into the
files of this run and leaves the ones still arriving for the next (a scheduled run over an inbox).
Shared by the cohort and consistency flows and ``equislide tile``; a notebook calls
:func:`assign_sample_ids` first.
"""

from __future__ import annotations

import csv
import dataclasses
import errno
import glob
import math
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from equislide.text import one_line, path_text, unpack_path

__all__ = [
    "FOLDER_SUFFIXES",
    "SETTLE_SECONDS",
    "SETTLE_WAIT_MAX",
    "TEMP_SUFFIXES",
    "InputsError",
    "ManifestRow",
    "ResolvedInputs",
    "assign_sample_ids",
    "duplicate_inputs",
    "failed_record",
    "one_line",
    "path_text",
    "read_manifest",
    "reason_of",
    "resolve_inputs",
]

#: Names of files still being copied or downloaded (rsync --partial, curl, browsers, most copy tools).
TEMP_SUFFIXES = (".part", ".partial", ".tmp", ".crdownload")
#: What a folder given as an input contributes: slide and image files (OpenSlide's formats, plain images).
FOLDER_SUFFIXES = (
    ".svs", ".tif", ".tiff", ".ndpi", ".vms", ".vmu", ".scn", ".mrxs", ".bif", ".svslide",
    ".png", ".jpg", ".jpeg",
)  # fmt: skip
#: Default settle check: a found file modified this recently, or whose size or mtime changes over this
#: long, is still arriving. Small: a copy in progress touches its file every few milliseconds.
SETTLE_SECONDS = 2.0
#: The longest wait of the size/mtime check: a longer settle time widens only the mtime window, so an
#: hourly run with a settle time of minutes does not sleep for them.
SETTLE_WAIT_MAX = 10.0
_GLOB_CHARS = frozenset("*?[")


class InputsError(ValueError):
    """A run's inputs cannot be read at all (a manifest missing, unreadable or without a ``path``
    column); one line naming the file. Bad rows of a readable manifest are not this: they fail alone."""


@dataclasses.dataclass(frozen=True)
class ManifestRow:
    """One usable row of a manifest: the file (relative paths made relative to the CSV's folder), its
    optional mpp (fills in missing metadata, as ``--input-mpp``) and sample ID."""

    line: int
    path: str
    mpp: float | None = None
    sample_id: str | None = None


@dataclasses.dataclass
class ResolvedInputs:
    """The inputs of one run (:func:`resolve_inputs`).

    Attributes:
        paths: Files to process, each once, in the order found (globs and folders sorted).
        sample_ids: Manifest-given sample IDs (made safe), by path.
        input_mpp: Manifest-given mpp, by path (fills in missing metadata, as ``input_mpp``).
        failed: Failed records of bad manifest rows, keyed ``"<csv> line N"``.
        waiting: Files found but still arriving (a temporary name, recently modified, or changing
            across the settle check): left for the next run.
        warnings: One line each (a glob or folder that matched nothing).
        given: What the run was given, for the report.
    """

    paths: list[str] = dataclasses.field(default_factory=list)
    sample_ids: dict[str, str] = dataclasses.field(default_factory=dict)
    input_mpp: dict[str, float] = dataclasses.field(default_factory=dict)
    failed: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)
    waiting: list[str] = dataclasses.field(default_factory=list)
    warnings: list[str] = dataclasses.field(default_factory=list)
    given: dict[str, Any] = dataclasses.field(default_factory=dict)

    def describe(self) -> dict[str, Any]:
        """The report's ``parameters.input_selection``: what was given, found, and left for later."""
        return {
            **self.given,
            "found": len(self.paths) + len(self.failed),
            "left_for_later": len(self.waiting),
            "waiting": [path_text(p) for p in self.waiting],
            "warnings": list(self.warnings),
        }


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


def assign_sample_ids(
    paths: list[str], names: Mapping[str, str] | None = None
) -> tuple[dict[str, str], dict[str, dict[str, Any]]]:
    """Unique sample IDs per input (``names[path]`` where given, else the file stem, made safe); inputs
    whose name gives none fail here.

    Returns:
        ``({path: sample_id}, {path: failed record})``.
    """
    from equislide.storage import SampleIdError, safe_sample_id, unique_sample_ids

    good, failed = [], {}
    for p in paths:
        path = Path(p)
        try:
            safe_sample_id((names or {}).get(p) or (path.stem if path.suffix else path.name))
            good.append(p)
        except SampleIdError:
            failed[p] = failed_record(
                p,
                f"no usable sample ID in the file name {path_text(path.name)!r}; rename the file",
                "SampleIdError",
            )
    ids = unique_sample_ids(good, {p: (names or {})[p] for p in good if p in (names or {})})
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


def _is_pattern(text: str) -> bool:
    return any(c in _GLOB_CHARS for c in text)


def _named_input(entry: str) -> bool:
    """An entry that is one input as it stands: anything that exists and is not a folder (a name holding
    ``[`` or ``*`` is that file, not a pattern), and a folder named like a slide (``x.svs/``), which then
    fails as an input with its reason instead of vanishing as an empty folder."""
    if not os.path.lexists(entry):
        return False
    return not os.path.isdir(entry) or entry.rstrip(os.sep).lower().endswith(FOLDER_SUFFIXES)


def _expand(entry: str) -> tuple[list[str], list[str]]:
    """``(files, still arriving by name)`` of a glob or a folder, sorted; hidden files are skipped (as
    glob does: rsync's temporary files are hidden)."""
    if _is_pattern(entry):
        found = sorted(p for p in glob.glob(entry, recursive=True) if os.path.isfile(p))
        temp = sorted({t for suf in TEMP_SUFFIXES for t in glob.glob(entry + suf, recursive=True)})
        return found, temp
    found, temp = [], []
    for root, dirs, files in os.walk(entry):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            low = name.lower()
            if name.startswith("."):
                continue
            if low.endswith(TEMP_SUFFIXES):
                temp.append(os.path.join(root, name))
            elif low.endswith(FOLDER_SUFFIXES):
                found.append(os.path.join(root, name))
    return found, temp


def _number(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(text)
    return value


def read_manifest(path: str | os.PathLike[str]) -> tuple[list[ManifestRow], dict[str, dict[str, Any]]]:
    """The rows of a manifest CSV: a ``path`` column, optional ``mpp`` (µm per level-0 pixel) and
    ``sample_id``; other columns are ignored, header names are matched case-insensitively, empty lines
    skipped, relative paths taken relative to the CSV's folder.

    Returns:
        ``(rows, failed)``: the usable rows, and a failed record per bad row (an empty path, an mpp that is
        not a plausible number, an unusable or repeated sample ID, a repeated path) keyed ``"<csv> line N"``,
        whose reason names the file and the line.

    Raises:
        InputsError: The file cannot be read as CSV or has no ``path`` column.
    """
    from equislide.storage import SampleIdError, safe_sample_id
    from equislide.tiling._mpp import check_user_mpp

    csv_path = Path(path)
    shown = path_text(csv_path)
    try:
        with open(csv_path, newline="", encoding="utf-8-sig") as f:
            table = list(csv.reader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        why = err.strerror if isinstance(err, OSError) and err.strerror else one_line(err)
        raise InputsError(f"manifest {shown}: cannot read it ({why})") from None
    header = [h.strip().lower() for h in table[0]] if table else []
    if "path" not in header:
        raise InputsError(
            f"manifest {shown}: no 'path' column in the header (columns: {', '.join(header) or 'none'}); "
            "the first line must name the columns path[,mpp][,sample_id]"
        )
    col = {name: header.index(name) for name in ("path", "mpp", "sample_id") if name in header}
    rows: list[ManifestRow] = []
    failed: dict[str, dict[str, Any]] = {}
    seen_path: dict[str, int] = {}
    seen_id: dict[str, int] = {}
    for line, cells in enumerate(table[1:], start=2):
        cell = {name: (cells[i].strip() if i < len(cells) else "") for name, i in col.items()}
        if not any(c.strip() for c in cells):
            continue
        where = f"{shown} line {line}"
        problem, mpp, sample_id = None, None, None
        target = os.path.normpath(csv_path.parent / cell["path"]) if cell["path"] else ""
        if not cell["path"]:
            problem = "empty path"
        elif target in seen_path:
            problem = f"{path_text(cell['path'])} is already listed on line {seen_path[target]}"
        if problem is None and cell.get("mpp"):
            try:
                mpp = _number(cell["mpp"])
                problem = check_user_mpp(mpp, "mpp")
            except ValueError:
                problem = f"mpp {path_text(cell['mpp'])!r} is not a number of µm per pixel"
        if problem is None and cell.get("sample_id"):
            try:
                sample_id = safe_sample_id(cell["sample_id"])
            except SampleIdError:
                problem = f"sample_id {path_text(cell['sample_id'])!r} has no letter or digit"
            else:
                if sample_id.casefold() in seen_id:
                    problem = (
                        f"sample_id {sample_id!r} is already used on line {seen_id[sample_id.casefold()]}"
                    )
        if problem is not None:
            failed[where] = failed_record(where, f"{where}: {problem}", "ManifestError", sample_id=sample_id)
            continue
        seen_path[target] = line
        if sample_id is not None:
            seen_id[sample_id.casefold()] = line
        rows.append(ManifestRow(line=line, path=target, mpp=mpp, sample_id=sample_id))
    return rows, failed


def _unsettled(paths: list[str], settle_seconds: float) -> set[str]:
    """Files still arriving: modified within ``settle_seconds``, or whose size or mtime changes across a
    wait of ``settle_seconds`` (at most :data:`SETTLE_WAIT_MAX`; the wait catches a writer whose clock is
    behind ours: a network file system stamps mtimes with the server's clock)."""
    if settle_seconds <= 0 or not paths:
        return set()

    def stats() -> dict[str, tuple[int, int] | None]:
        out: dict[str, tuple[int, int] | None] = {}
        for p in paths:
            try:
                st = os.stat(p)
                out[p] = (st.st_size, st.st_mtime_ns)
            except OSError:  # gone or unreadable: the run reports it as a failed input
                out[p] = None
        return out

    before, t0 = stats(), time.time()
    recent = {p for p, s in before.items() if s is not None and s[1] / 1e9 > t0 - settle_seconds}
    time.sleep(min(settle_seconds, SETTLE_WAIT_MAX))
    after = stats()
    return recent | {p for p in paths if before[p] != after[p] and before[p] is not None}


def resolve_inputs(
    inputs: Sequence[str] = (),
    *,
    manifest: str | os.PathLike[str] | None = None,
    settle_seconds: float = SETTLE_SECONDS,
) -> ResolvedInputs:
    """The files of one run, from files, globs, folders and a manifest CSV.

    A file named directly is always taken (a missing one fails later as an input, with its reason). Files
    a glob, a folder or the manifest yields are left for the next run while they arrive: a name ending
    in one of :data:`TEMP_SUFFIXES` (``slide.svs.part`` beside a ``*.svs`` glob counts), or modified in the
    last ``settle_seconds`` / changing across a wait that long (at most :data:`SETTLE_WAIT_MAX`; ``0``: no
    check, no wait). Each file is
    taken once, in the order given.

    Args:
        inputs: Paths, globs (``**`` recursive) or folders (every file ending in
            :data:`FOLDER_SUFFIXES` under it); paths packed by :func:`~equislide.text.pack_path` are
            unpacked.
        manifest: A CSV read by :func:`read_manifest`; its mpp and sample IDs come back per path.
        settle_seconds: See above.

    Raises:
        InputsError: The manifest cannot be read or has no ``path`` column.
    """
    res = ResolvedInputs(
        given={
            "inputs": [path_text(unpack_path(str(e))) for e in inputs],
            "manifest": None if manifest is None else path_text(manifest),
            "settle_seconds": float(settle_seconds),
        }
    )
    direct: set[str] = set()
    found: list[str] = []
    for entry in (unpack_path(str(e)) for e in inputs):
        if _named_input(entry):
            found.append(entry)
            direct.add(entry)
        elif _is_pattern(entry) or os.path.isdir(entry):
            files, temp = _expand(entry)
            if not files and not temp:
                res.warnings.append(f"{path_text(entry)} matched no file")
            found += files
            res.waiting += temp
        else:
            found.append(entry)
            direct.add(entry)
    if manifest is not None:
        rows, res.failed = read_manifest(unpack_path(str(manifest)))
        for row in rows:
            found.append(row.path)
            if row.mpp is not None:
                res.input_mpp[row.path] = row.mpp
            if row.sample_id is not None:
                res.sample_ids[row.path] = row.sample_id
    found = list(dict.fromkeys(found))
    found_by_name = [p for p in found if p not in direct]  # from a glob, folder or the manifest
    late = {p for p in found_by_name if p.lower().endswith(TEMP_SUFFIXES)}
    late |= _unsettled([p for p in found_by_name if p not in late], settle_seconds)
    res.paths = [p for p in found if p not in late]
    res.waiting = list(dict.fromkeys(res.waiting + [p for p in found if p in late]))
    for p in late:
        res.input_mpp.pop(p, None)
        res.sample_ids.pop(p, None)
    return res
