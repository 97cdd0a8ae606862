"""A real Dask cluster of processes for tests: ``dask scheduler`` and ``dask worker`` as a user runs them.

The programs are Dask's own CLI (``python -m dask scheduler`` / ``worker``: the ``dask`` script of the
venv, run by the test's interpreter, since a copied venv's script may name another interpreter in its
shebang), with the environment and options README.md ("A real Dask cluster") documents. Each process
runs in its own process group (a worker's nanny, the worker and its forked stage children together),
so a test can kill one node the way a machine dies, and teardown leaves nothing behind: it kills every
group and checks with psutil that none of their processes is left.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psutil

#: The documented worker environment (README, deploy/README.md): undoes the nanny's MALLOC_TRIM_THRESHOLD_.
WORKER_ENV = {"MALLOC_MMAP_THRESHOLD_": "33554432"}
PRELOAD = "equislide.flows._preload"


class DaskProcesses:
    """A scheduler and its workers as process groups; logs in ``folder/<name>.log``."""

    def __init__(self, folder: Path, env: dict[str, str] | None = None) -> None:
        self.folder = folder
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", **WORKER_ENV, **(env or {})}
        self.scheduler: subprocess.Popen | None = None
        self.workers: list[subprocess.Popen] = []
        self.named: dict[str, subprocess.Popen] = {}  # by ``--name``
        self.address = ""
        self._all: list[subprocess.Popen] = []
        self._members: set[psutil.Process] = set()
        self._n = 0

    def _spawn(self, name: str, args: list[str]) -> subprocess.Popen:
        log = (self.folder / f"{name}.log").open("ab")
        proc = subprocess.Popen(
            [sys.executable, "-m", "dask", *args],
            env=self.env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: one killpg ends the node
        )
        log.close()
        proc.log = self.folder / f"{name}.log"  # type: ignore[attr-defined]
        self._all.append(proc)
        return proc

    def start_scheduler(self, timeout: float = 90) -> str:
        """``dask scheduler`` on 127.0.0.1, a free port; returns its address once it wrote its file."""
        file = self.folder / "scheduler.json"
        file.unlink(missing_ok=True)
        self.scheduler = self._spawn(
            "scheduler",
            ["scheduler", "--host", "127.0.0.1", "--port", "0", "--dashboard-address", "127.0.0.1:0",
             "--scheduler-file", str(file)],
        )  # fmt: skip
        deadline = time.monotonic() + timeout
        while True:
            with contextlib.suppress(OSError, ValueError, KeyError):
                self.address = json.loads(file.read_text())["address"]
                return self.address
            assert self.scheduler.poll() is None, (
                f"dask scheduler exited: {self.scheduler.log.read_text()[-2000:]}"
            )
            assert time.monotonic() < deadline, f"dask scheduler wrote no {file} in {timeout} s"
            time.sleep(0.1)

    def start_workers(
        self, n: int, *, resources: str | None = None, timeout: float = 240
    ) -> list[subprocess.Popen]:
        """``n`` more ``dask worker`` processes (one thread, the preload); waits until the scheduler has
        them."""
        new = []
        for _ in range(n):
            self._n += 1
            args = ["worker", self.address, "--nthreads", "1", "--nworkers", "1", "--host", "127.0.0.1",
                    "--dashboard-address", "127.0.0.1:0", "--name", f"w{self._n}",
                    "--preload", PRELOAD]  # fmt: skip
            if resources:
                args += ["--resources", resources]
            new.append(self._spawn(f"worker-w{self._n}", args))
            self.named[f"w{self._n}"] = new[-1]
        self.workers += new
        self.wait_for_workers(len(self.workers), timeout=timeout)
        return new

    def client(self, timeout: float = 30):
        from distributed import Client

        return Client(self.address, timeout=timeout, set_as_default=False)

    def wait_for_workers(self, n: int, timeout: float = 240) -> None:
        with self.client() as client:
            client.wait_for_workers(n, timeout=timeout)
        self._remember()

    def _remember(self) -> None:
        """Every process of the groups so far (workers fork children): teardown checks each one is gone."""
        for p in self._all:
            with contextlib.suppress(psutil.Error):
                top = psutil.Process(p.pid)
                self._members |= {top, *top.children(recursive=True)}

    def processing(self, contains: str) -> list[tuple[subprocess.Popen, str]]:
        """``(worker process, key)`` of each task a worker runs now whose key contains ``contains``."""

        def keys(dask_scheduler) -> list[tuple[str, str]]:
            return [
                (str(ws.name), str(ts.key)) for ws in dask_scheduler.workers.values() for ts in ws.processing
            ]

        with self.client() as client:
            found = client.run_on_scheduler(keys)
        return [(self.named[name], key) for name, key in found if contains in key and name in self.named]

    def kill(self, proc: subprocess.Popen) -> None:
        """SIGKILL the process group of ``proc`` (a node gone: nanny, worker and their children)."""
        self._remember()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()

    def close(self) -> None:
        self._remember()
        for p in self._all:
            self.kill(p)
        deadline = time.monotonic() + 30
        left = [p for p in self._members if _alive(p)]
        while left and time.monotonic() < deadline:
            time.sleep(0.2)
            left = [p for p in left if _alive(p)]
        for p in left:
            with contextlib.suppress(psutil.Error):
                p.kill()
        assert not left, f"processes left after teardown: {[(p.pid, p.name()) for p in left]}"


def _alive(p: psutil.Process) -> bool:
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


@contextlib.contextmanager
def dask_processes(
    folder: Path, *, workers: int = 2, resources: str | None = None, env: dict[str, str] | None = None
) -> Iterator[DaskProcesses]:
    """A running scheduler and ``workers`` workers on 127.0.0.1; everything killed after (also on failure)."""
    folder.mkdir(parents=True, exist_ok=True)
    cluster = DaskProcesses(folder, env)
    try:
        cluster.start_scheduler()
        if workers:
            cluster.start_workers(workers, resources=resources)
        yield cluster
    finally:
        cluster.close()
