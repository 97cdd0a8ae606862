"""Done files of tile ranges: the bookkeeping shared by the range writers of tile stores and features.

A range writer leaves ``<start>-<stop>.json`` in a folder of its shared partial store once the range's
shards are on disk; a range is done when its file exists, and a store is complete when the done
ranges cover every tile.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np

__all__ = ["covered", "folder_lock", "missing_ranges", "read_done_ranges"]


def read_done_ranges(folder: Path) -> list[tuple[int, int]]:
    """The ``[start, stop)`` ranges whose done file is in ``folder``, sorted (none when it is absent;
    files of other names are ignored)."""
    if not folder.is_dir():
        return []
    out = []
    for f in folder.iterdir():
        head, sep, tail = f.name.removesuffix(".json").partition("-")
        if f.name.endswith(".json") and sep and head.isdigit() and tail.isdigit():
            out.append((int(head), int(tail)))
    return sorted(out)


def _mask(done: list[tuple[int, int]], start: int, stop: int) -> np.ndarray:
    mask = np.zeros(max(stop - start, 0), bool)
    for a, b in done:
        mask[max(a, start) - start : max(min(b, stop) - start, 0)] = True
    return mask


def covered(done: list[tuple[int, int]], start: int, stop: int) -> bool:
    """Every tile of ``[start, stop)`` lies in a range of ``done``."""
    return bool(_mask(done, start, stop).all())


def missing_ranges(done: list[tuple[int, int]], n_tiles: int) -> list[tuple[int, int]]:
    """Maximal ``[start, stop)`` runs of the ``n_tiles`` tiles that no range of ``done`` covers."""
    mask = _mask(done, 0, n_tiles)
    edges = np.flatnonzero(np.diff(np.concatenate([[1], mask.astype(np.int8), [1]])))
    return [(int(a), int(b)) for a, b in zip(edges[::2], edges[1::2], strict=True)]


@contextlib.contextmanager
def folder_lock(folder: Path) -> Iterator[None]:
    """An exclusive ``flock`` on an existing folder itself, among the processes sharing it.

    The kernel drops it when a holder is killed; locking the folder rather than a lock file inside it
    leaves no file behind in a zarr group or a slide's folder of stores.
    """
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock
