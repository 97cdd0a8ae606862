"""Jobs for budgeted children in tests: a plain module (no Prefect), so that a child unpickling one
starts in milliseconds, as the stages' functions do; and one on ``sys.path`` (tests/), because a
forkserver child unpickles a job by its module's name, and pytest's importlib mode gives a test module
a name no other process can import."""

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


_CALLS: list[object] = []  # per process: what a unit's child has run so far (its state between jobs)


def job(x: tuple) -> object:
    """A unit's job: ``("pid",)``, ``("calls",)`` (jobs this process ran), ``("div", a, b)``, ``("open",
    path)`` (blocks in the kernel on a FIFO), ``("abort",)``."""
    _CALLS.append(x)
    kind = x[0]
    if kind == "pid":
        return os.getpid()
    if kind == "calls":
        return len(_CALLS)
    if kind == "div":
        return x[1] / x[2]
    if kind == "open":
        with open(x[1], "rb"):
            return "opened"
    if kind == "abort":
        os.abort()
    raise ValueError(kind)
