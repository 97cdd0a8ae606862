"""Per-input time budgets: a stage call that overruns is killed, and only its input fails.

Why a child process: a reader hung inside a C library (libtiff walking a 200000 x 200000 untiled image,
OpenSlide on a crafted IFD) holds the GIL-free C stack of its thread; neither a Python signal, nor
Prefect's ``timeout_seconds`` (an exception raised into the thread when it next runs Python), nor a Dask
future's timeout stops it, and the worker stays busy for good. A process can be killed. The child is
forked from a ``forkserver`` (a clean, single-threaded process that imported the stages once), so a
call costs a few milliseconds rather than an interpreter start, and a child may use CUDA whatever its
parent did. A child that crashes (a segfault in a reader) fails its input alone, too.

A work unit of several small samples runs them in turn in one child (:func:`run_each_within`), each
against its own deadline: what a child pays once (its start, a network loaded and cached, a slide's
imports warmed) is then paid once per unit, not per sample, and a sample that overruns or crashes
still fails alone (its child is killed and a fresh one takes the rest).

Budgets come from :class:`BudgetSpec` (seconds per stage call, ``0`` = no budget: run in this
process). ``EQUISLIDE_BUDGET="plan=60,tile=600"`` overrides the defaults where no spec is passed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import multiprocessing
import os
import pickle
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = [
    "BUDGET_ENV",
    "BudgetExceeded",
    "BudgetSpec",
    "ChildFailed",
    "run_each_within",
    "run_within",
    "warm",
]

BUDGET_ENV = "EQUISLIDE_BUDGET"
STAGES = ("plan", "tile", "features", "segment", "consistency")

# What the forkserver imports once, so that children start warm (each a fork of it).
# The stages import their libraries lazily, so the libraries are named here too.
_PRELOAD = [
    "equislide.tiling",
    "equislide.storage",
    "equislide.stages.tile",
    "equislide.stages.features",
    "equislide.stages.segment",
    "equislide.stages.consistency",
    "equislide.stages.backbone",
    "equislide.models.extract",
    "equislide.models.kmeans",
    "equislide.models.srenet",
    # What a stage's first call imported lazily in every child, measured (a tiny sample's features:
    # 8.3 of its 10 s at a load of 20): the tile stores' zarr and dask.array, and what dask's
    # compute looks for (distributed, and xarray among the optional backends).
    "zarr",
    "dask.array",
    "distributed",
    "xarray",
]


class BudgetExceeded(RuntimeError):
    """A stage call ran past its budget and was killed. Not a ``TimeoutError``: it is never retried."""


class ChildFailed(RuntimeError):
    """The child died without an answer (killed by a signal, or its exception could not be sent back)."""


@dataclass(frozen=True)
class BudgetSpec:
    """Seconds one stage call may take for one input or sample; ``0`` switches the budget off.

    The defaults are far above a healthy call on a big slide at 0.5 µm/px on CPU (planning reads only a
    thumbnail: seconds; tiling, features and segmentation scale with tissue area) and far below "for
    ever": they exist to free the worker of a file that will never finish.
    """

    plan: float = 600.0
    tile: float = 3600.0
    features: float = 6 * 3600.0
    segment: float = 3600.0
    consistency: float = 6 * 3600.0

    @classmethod
    def parse(cls, text: str | None, base: BudgetSpec | None = None) -> BudgetSpec:
        """``"plan=60,tile=600"`` (any subset of the stages) over ``base`` (default: the defaults)."""
        base = base or cls()
        if not text or not text.strip():
            return base
        values: dict[str, float] = {}
        for part in text.split(","):
            name, sep, value = part.strip().partition("=")
            if not sep or name not in STAGES:
                raise ValueError(f"budget {part.strip()!r} is not STAGE=SECONDS with STAGE one of {STAGES}")
            try:
                seconds = float(value)
            except ValueError:
                raise ValueError(f"budget {part.strip()!r}: {value!r} is not a number of seconds") from None
            if not seconds >= 0 or seconds == float("inf"):
                raise ValueError(f"budget {part.strip()!r} must be >= 0 seconds (0 = no budget)")
            values[name] = seconds
        return dataclasses.replace(base, **values)

    @classmethod
    def from_env(cls) -> BudgetSpec:
        return cls.parse(os.environ.get(BUDGET_ENV))

    def to_dict(self) -> dict[str, float]:
        return dataclasses.asdict(self)


_CONTEXT: list[Any] = []


def _context():
    if not _CONTEXT:
        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload(_PRELOAD)
        _CONTEXT.append(ctx)
    return _CONTEXT[0]


def warm() -> None:
    """Start the forkserver now (it imports the stages: ~5 s on a busy CPU) rather than at the first
    budgeted call; Dask workers call it from their preload."""
    from multiprocessing import forkserver

    _context()
    forkserver.ensure_running()


def _child(conn, fn, args, kwargs, with_progress) -> None:
    if with_progress:
        kwargs = {**kwargs, "progress": lambda *a: conn.send(("progress", a))}
    _answer(conn, fn, *args, **kwargs)
    conn.close()


def _answer(conn, fn, *args, **kwargs) -> None:
    """Send the parent ``fn``'s value, or its exception as a value (its words, if it does not pickle)."""
    try:
        message: tuple[str, Any] = ("ok", fn(*args, **kwargs))
    except BaseException as err:  # noqa: BLE001 - every failure goes back to the parent as a value
        message = ("err", err)
    try:
        conn.send(message)
    except Exception as err:  # an exception (or value) that does not pickle: send its words instead
        conn.send(("err", _unpicklable(message[1], err)))


def _allow_children():
    """Dask workers are daemonic processes, which multiprocessing forbids to have children: the rule
    stops orphans outliving a parent, and every child here is waited for or killed (and is itself a
    daemon, so it dies with the worker), so the check is lifted for the start."""
    import contextlib

    proc = multiprocessing.current_process()

    @contextlib.contextmanager
    def lifted():
        was = proc._config.get("daemon")
        proc._config["daemon"] = False
        try:
            yield
        finally:
            proc._config["daemon"] = was

    return lifted()


def run_within(
    seconds: float | None,
    what: str,
    fn: Callable[..., Any],
    *args: Any,
    progress: Callable[..., None] | None = None,
    **kwargs: Any,
) -> Any:
    """``fn(*args, **kwargs)`` in a child process killed after ``seconds``; its value or its exception.

    ``fn`` and its arguments must pickle (module-level functions, specs, paths). ``progress``: passed to
    ``fn`` as its ``progress=`` keyword; its calls in the child are relayed to this process.

    Raises:
        BudgetExceeded: ``fn`` ran past ``seconds`` (the child is killed): ``"<what>: stopped after ..."``.
        ChildFailed: The child died without an answer (e.g. a segfault in a C reader).
        Exception: Whatever ``fn`` raised, re-raised here.
    """
    if not seconds:
        return fn(*args, **kwargs) if progress is None else fn(*args, progress=progress, **kwargs)
    ctx = _context()
    receive, send = ctx.Pipe(duplex=False)
    child = ctx.Process(target=_child, args=(send, fn, args, kwargs, progress is not None), daemon=True)
    with _allow_children():
        child.start()
    send.close()
    deadline = time.monotonic() + seconds
    try:
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not receive.poll(left):
                raise BudgetExceeded(f"{what} stopped after its time budget of {seconds:g} s")
            try:
                kind, value = receive.recv()
            except (EOFError, OSError, pickle.UnpicklingError):
                child.join(5)
                code = child.exitcode
                how = f"signal {-code}" if code is not None and code < 0 else f"exit status {code}"
                raise ChildFailed(f"{what} crashed ({how})") from None
            if kind == "progress":
                progress(*value)  # type: ignore[misc]
                continue
            if kind == "err":
                raise value
            return value
    finally:
        receive.close()
        if child.is_alive():
            child.kill()
        child.join(5)


def _serve(conn, fn) -> None:
    """A unit's child: ``fn(x)`` for each ``x`` the parent sends, answering each in turn, until None."""
    conn.send(("ready", None))  # started, ``fn`` unpickled (its module imported): the clocks start now
    while True:
        try:
            job = conn.recv()
        except (EOFError, OSError):  # the parent went away
            return
        if job is None:
            break
        _answer(conn, fn, job)
    conn.close()


def _unpicklable(value: Any, err: Exception) -> ChildFailed:
    return ChildFailed(f"{type(value).__name__}: {value} ({type(err).__name__})")


class _Server:
    """One child serving a unit's samples (:func:`_serve`); killed on any overrun or crash."""

    def __init__(self, fn: Callable[[Any], Any]) -> None:
        ctx = _context()
        self.conn, theirs = ctx.Pipe(duplex=True)
        self.proc = ctx.Process(target=_serve, args=(theirs, fn), daemon=True)
        with _allow_children():
            self.proc.start()
        theirs.close()
        self.ready = False

    def call(self, seconds: float, what: str, x: Any) -> Any:
        if not self.ready:
            # A child's start (importing ``fn``'s module) is not charged to its first sample, but is
            # bounded the same way: a start hung past the budget fails the sample waiting for it.
            self._answer(seconds, what)
            self.ready = True
        try:
            self.conn.send(x)
        except (BrokenPipeError, OSError):
            raise self._crashed(what) from None
        kind, value = self._answer(seconds, what)
        if kind == "err":
            raise value
        return value

    def _answer(self, seconds: float, what: str) -> tuple[str, Any]:
        if not self.conn.poll(seconds):
            raise BudgetExceeded(f"{what} stopped after its time budget of {seconds:g} s")
        try:
            return self.conn.recv()
        except (EOFError, OSError, pickle.UnpicklingError):
            raise self._crashed(what) from None

    def _crashed(self, what: str) -> ChildFailed:
        self.proc.join(5)
        code = self.proc.exitcode
        how = f"signal {-code}" if code is not None and code < 0 else f"exit status {code}"
        return ChildFailed(f"{what} crashed ({how})")

    def close(self, *, kill: bool) -> None:
        if not kill:
            with contextlib.suppress(OSError):
                self.conn.send(None)
            self.proc.join(5)
        self.conn.close()
        if self.proc.is_alive():
            self.proc.kill()
        self.proc.join(5)


def run_each_within(
    seconds: float | None, jobs: Sequence[tuple[str, Any]], fn: Callable[[Any], Any]
) -> Iterator[tuple[bool, Any]]:
    """``fn(x)`` for each ``(what, x)`` of ``jobs``, in turn, in one child process; each call has its own
    budget of ``seconds``. Yields ``(True, value)`` or ``(False, exception)`` per job, in order.

    A call that overruns is answered with :class:`BudgetExceeded`, one whose child dies with
    :class:`ChildFailed` (both name ``what``); its child is killed and a fresh one serves the jobs
    left. ``fn`` and every ``x`` must pickle. Closing the generator early (the caller stops at a
    transient error) kills the child. With no budget (``0``/None) every call runs in this process.
    """
    if not seconds:
        for _, x in jobs:
            try:
                yield True, fn(x)
            except Exception as err:
                yield False, err
        return
    server: _Server | None = None
    finished = False
    try:
        for what, x in jobs:
            if server is None:
                server = _Server(fn)
            try:
                value = server.call(seconds, what, x)
            except (BudgetExceeded, ChildFailed) as err:
                server.close(kill=True)
                server = None
                yield False, err
                continue
            except Exception as err:  # fn's own exception: the child is fine and serves the next job
                yield False, err
                continue
            yield True, value
        finished = True
    finally:
        if server is not None:
            # A clean end lets the child exit; a caller that stopped early (GeneratorExit) kills it.
            server.close(kill=not finished)
