"""A real ``prefect server start`` (and workers) as separate processes, for tests that need a server like
the one a deployment talks to, not the session's ``prefect_test_harness``.

Every process gets its own environment (:func:`prefect_env`: a private ``PREFECT_HOME``, the server's
``PREFECT_API_URL``, analytics off) and its own process group, so stopping it stops its children (the
server's uvicorn, a worker's flow-run processes) and the test's own Prefect settings are never touched.
Client calls from the test process go through ``prefect.settings.temporary_settings(PREFECT_API_URL=...)``.

    with local_prefect_server(tmp_path) as server:
        server.start("worker", [*PREFECT, "worker", "start", "--pool", "p"])
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["LocalPrefectServer", "free_port", "local_prefect_server", "prefect_env"]

#: This interpreter's ``prefect``: neither one on ``PATH`` nor the ``bin/prefect`` script, whose shebang
#: may name another environment's Python (a copied virtual environment) and so import other code.
PREFECT = [sys.executable, "-m", "prefect"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def prefect_env(
    home: Path, api_url: str | None = None, extra: Mapping[str, str] | None = None
) -> dict[str, str]:
    """This process's environment with a private Prefect home and, when given, the server's API URL;
    every other ``PREFECT_*`` setting of the test session is dropped (the harness's URL among them)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(
        {
            "PREFECT_HOME": str(home),
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "PREFECT_LOGGING_LEVEL": "INFO",
        }
    )
    if api_url is not None:
        env["PREFECT_API_URL"] = api_url
    env.update(extra or {})
    return env


@dataclass
class LocalPrefectServer:
    """A running server (:func:`local_prefect_server`) and the processes started beside it."""

    api_url: str
    home: Path
    logs: Path
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)

    def env(self, extra: Mapping[str, str] | None = None) -> dict[str, str]:
        return prefect_env(self.home, self.api_url, extra)

    def start(
        self, name: str, argv: Sequence[str], *, env: Mapping[str, str] | None = None, cwd: Path | None = None
    ) -> subprocess.Popen:
        """Start a long-lived process (a worker) in its own group, logging to ``logs/<name>.log``;
        stopped with the server."""
        log = open(self.logs / f"{name}.log", "ab")  # noqa: SIM115 - closed with the process
        proc = subprocess.Popen(
            list(argv),
            env=self.env(env),
            cwd=cwd,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.close()  # the child holds its own descriptor
        self.procs[name] = proc
        return proc

    def run(
        self,
        argv: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
        timeout: float = 120,
    ) -> subprocess.CompletedProcess:
        """Run a command (``prefect work-pool create``, ``prefect deploy``) against the server; raises
        with its output when it fails."""
        res = subprocess.run(
            list(argv), env=self.env(env), cwd=cwd, capture_output=True, text=True, timeout=timeout
        )
        if res.returncode != 0:
            raise AssertionError(f"{' '.join(argv)} exited {res.returncode}:\n{res.stdout}\n{res.stderr}")
        return res

    def log_tail(self, name: str, chars: int = 4000) -> str:
        path = self.logs / f"{name}.log"
        return path.read_text(errors="replace")[-chars:] if path.exists() else ""


def _die_with_parent() -> None:
    """In the child before exec (Linux): SIGKILL it when the test process dies without its finalizers
    (``kill`` of pytest), so no server outlives a killed test run; elsewhere nothing."""
    os.setsid()
    if sys.platform.startswith("linux"):
        import ctypes

        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def _stop(proc: subprocess.Popen, grace: float = 10.0) -> None:
    """SIGTERM to the process group, SIGKILL to what is left after ``grace`` seconds."""
    if proc.poll() is not None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)  # children the leader left behind
        return
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(grace)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(5)


@contextlib.contextmanager
def local_prefect_server(
    folder: Path, *, port: int | None = None, env: Mapping[str, str] | None = None, timeout: float = 120
) -> Iterator[LocalPrefectServer]:
    """``prefect server start --host 127.0.0.1 --port PORT`` with its own ``PREFECT_HOME`` under
    ``folder``; yields once ``/api/health`` answers; stops the server and everything started through the
    yielded object, even when the body fails."""
    port = port or free_port()
    home, logs = folder / "prefect-home", folder / "logs"
    home.mkdir(parents=True, exist_ok=True)
    logs.mkdir(parents=True, exist_ok=True)
    server = LocalPrefectServer(api_url=f"http://127.0.0.1:{port}/api", home=home, logs=logs)
    try:
        proc = server.start(
            "server", [*PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(port)], env=env
        )
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"prefect server exited {proc.returncode}:\n{server.log_tail('server')}")
            try:
                with urllib.request.urlopen(f"{server.api_url}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"prefect server not healthy after {timeout} s:\n{server.log_tail('server')}"
                )
            time.sleep(0.5)
        yield server
    finally:
        for name in reversed(list(server.procs)):  # workers before the server they report to
            _stop(server.procs[name])
