"""One run per output folder: an exclusive lock file ``OUT/.equislide.lock``.

Two runs writing one folder corrupt it (one run's start removes the other's partial stores, K-means
is fitted on whatever features exist at that moment), so every command that writes ``OUT`` holds
this lock for the whole run.

The lock is an ``flock(LOCK_EX)`` on the lock file, held on an open descriptor: the kernel drops it
when the holder exits in any way (``kill -9`` included), so a lock file left behind is recognised as
stale exactly, without trusting a pid that may have been reused. The file's content (JSON: ``pid``,
``host``, ``started``, ``command``) names the holder in the refusal and in the stale-lock warning.
Where the filesystem has no ``flock`` (``ENOLCK``/``ENOSYS``/``EOPNOTSUPP``, e.g. some network mounts),
the content decides: a dead pid on this host is stale; a live one, or one on another host (which
cannot be checked from here), refuses the run, and the message says which file to remove.

Within one process the lock is re-entrant (the CLI takes it, then the flow it runs takes it again),
counted, and released when the last holder lets go.
"""

from __future__ import annotations

import datetime as _dt
import errno
import json
import logging
import os
import socket
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

__all__ = ["LOCK_NAME", "OutputLocked", "acquire_output_lock", "output_lock", "release_output_lock"]

LOCK_NAME = ".equislide.lock"
_NO_FLOCK = {errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL}
_log = logging.getLogger("equislide")
_held: dict[Path, list] = {}  # lock path -> [fd, count]
_guard = threading.Lock()


class OutputLocked(RuntimeError):
    """Another live run holds the output folder; ``holder`` is its lock file's content."""

    def __init__(self, message: str, holder: dict[str, Any]):
        super().__init__(message)
        self.holder = holder


def _describe(holder: dict[str, Any]) -> str:
    cmd = " ".join(holder.get("command") or []) or "?"
    return (
        f"pid {holder.get('pid', '?')} on {holder.get('host', '?')} since {holder.get('started', '?')} "
        f"({cmd})"
    )


def _read(fd: int) -> dict[str, Any]:
    os.lseek(fd, 0, os.SEEK_SET)
    data = b""
    while chunk := os.read(fd, 65536):
        data += chunk
    try:
        doc = json.loads(data.decode("utf-8"))
    except ValueError:
        return {}
    return doc if isinstance(doc, dict) else {}


def _pid_alive(pid: Any) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def acquire_output_lock(out: str | os.PathLike[str], command: Sequence[str] | None = None) -> Path:
    """Take the lock of the folder ``out`` (which must exist); returns the lock file's path.

    Raises:
        OutputLocked: another live run holds it (the message names the holder and the folder).
        OSError: the lock file cannot be created (the folder is not writable).
    """
    path = (Path(out) / LOCK_NAME).resolve()
    with _guard:
        if path in _held:
            _held[path][1] += 1
            return path
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                stale = _lock_fd(fd, path)
            except BaseException:
                os.close(fd)
                raise
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(path))
            except FileNotFoundError:
                same = False
            if same:
                break
            # The holder removed the file between our open and our lock: lock the current one instead.
            os.close(fd)
        try:
            if stale:
                _log.warning(
                    "%s: taking over a stale lock of a run that is gone: %s", path.parent, _describe(stale)
                )
            doc = {
                "pid": os.getpid(),
                "host": socket.gethostname(),
                "started": _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat(),
                "command": list(command or []),
            }
            os.ftruncate(fd, 0)
            os.pwrite(fd, (json.dumps(doc) + "\n").encode("utf-8"), 0)
        except BaseException:
            os.close(fd)
            raise
        _held[path] = [fd, 1]
        return path


def _lock_fd(fd: int, path: Path) -> dict[str, Any]:
    """Lock ``fd``; the previous holder's content when its lock was stale (else ``{}``)."""
    import fcntl

    previous = _read(fd)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _read(fd)
        raise OutputLocked(
            f"{path.parent} is in use by another run: {_describe(holder)}; wait for it or use another --out",
            holder,
        ) from None
    except OSError as err:
        if err.errno not in _NO_FLOCK:
            raise
        # No flock here: fall back on the content (pid liveness is only checkable on this host).
        if previous.get("pid") is not None:
            same_host = previous.get("host") == socket.gethostname()
            if not same_host or _pid_alive(previous.get("pid")):
                raise OutputLocked(
                    f"{path.parent} is in use by another run: {_describe(previous)} (this filesystem has "
                    f"no flock; if that run is gone, remove {path})",
                    previous,
                ) from None
        return previous
    return previous if previous.get("pid") is not None else {}


def release_output_lock(out: str | os.PathLike[str]) -> None:
    """Let go of one hold of ``out``'s lock; the last one removes the lock file and unlocks it."""
    import fcntl

    path = (Path(out) / LOCK_NAME).resolve()
    with _guard:
        entry = _held.get(path)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] > 0:
            return
        del _held[path]
        fd = entry[0]
        try:
            # Removed while still locked, so no other run can lock the old file and then lose it.
            path.unlink(missing_ok=True)
        except OSError:
            pass
        finally:
            with suppress(OSError):
                fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)


@contextmanager
def output_lock(out: str | os.PathLike[str], command: Sequence[str] | None = None) -> Iterator[Path]:
    """Hold ``out``'s lock for the ``with`` block (released on any exit, KeyboardInterrupt too)."""
    path = acquire_output_lock(out, command)
    try:
        yield path
    finally:
        release_output_lock(out)
