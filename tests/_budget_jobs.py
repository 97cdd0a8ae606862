"""Jobs for the budget tests' children.

They live in a module of their own on ``sys.path`` (tests/) because a forkserver child unpickles a job by
its module's name, and pytest's importlib mode gives a test module a name no other process can import.
"""

from __future__ import annotations

import os

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
