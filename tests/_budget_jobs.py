"""Jobs for budgeted children in tests: a plain module (no Prefect), so that a child unpickling one
starts in milliseconds, as the stages' functions do."""

from __future__ import annotations

import errno
import os

_SEEN: list[str] = []  # per process: the samples this child ran so far


def work(x: tuple[str, str]) -> dict:
    """``("ok", name)``, ``("hang", fifo)`` (blocks in the kernel), ``("crash", _)``, ``("bad", name)``
    (its own error), ``("io", name)`` (a transient EIO)."""
    kind, arg = x
    _SEEN.append(arg)
    if kind == "hang":
        with open(arg, "rb"):
            pass
    if kind == "crash":
        os.abort()
    if kind == "bad":
        raise ValueError(f"{arg}: not a slide")
    if kind == "io":
        raise OSError(errno.EIO, "Input/output error", arg)
    return {"pid": os.getpid(), "seen": len(_SEEN)}
