"""Where a cohort runs: the Dask task runner, the Prefect API its workers report to, and what the cluster has.

Why the worker environment matters: Dask's nanny starts workers with ``MALLOC_TRIM_THRESHOLD_=65536``,
and setting any glibc malloc threshold turns off glibc's adaptive mmap threshold, so every tensor over
128 KiB is mmap-ed and unmapped again, page faults included: SRENet features ran 2.1x slower in a Dask
worker than in a plain process (0.273 vs 0.129 s per TMA core, width 16, layer 3, one thread). Local
clusters here start their workers with ``MALLOC_MMAP_THRESHOLD_`` at glibc's own adaptive ceiling
(32 MiB), which restores the plain-process speed and keeps Dask's trimming; :func:`worker_warnings`
tells when the workers of an existing cluster lack it.

Why the addresses matter: everything equislide starts itself listens on loopback only. A local cluster
is private to one run, so its scheduler, workers, nannies and HTTP endpoints bind ``127.0.0.1``
(:data:`LOCAL_HOST`); the temporary Prefect server is Prefect's own and binds ``127.0.0.1`` too. Only
the scheduler's dashboard can be moved, deliberately: ``EQUISLIDE_DASHBOARD=0.0.0.0:8787``. Servers
meant to be reached from elsewhere (a shared scheduler, ``prefect server start``) are started by
``deploy/``, with TLS and API auth.

Why the API matters: with no ``PREFECT_API_URL`` Prefect starts a temporary server *per process* on
first use. The flow's settings travel with every task to the Dask workers, and in that mode they hold
no URL, so each worker process would start its own uvicorn server on the same SQLite database: about
6 s of start-up per worker on its first task (measured on 2 CPU cores), an extra ~250 MB process per
worker, and task runs that never reach the server the user watches. :func:`shared_prefect_api` starts
the one temporary server up front and points the flow (and through its settings, every task) at it.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlparse

from prefect.context import FlowRunContext
from prefect_dask import DaskTaskRunner

__all__ = [
    "DASHBOARD_ENV",
    "LOCAL_HOST",
    "PRELOAD",
    "dask_client",
    "local_cluster_spec",
    "SCHEDULER_ENV",
    "WORKER_PRE_SPAWN_ENV",
    "all_cores",
    "api_reachable_from",
    "cluster_description",
    "gpu_workers",
    "make_task_runner",
    "scheduler_problem",
    "shared_prefect_api",
    "worker_environment",
    "worker_warnings",
]

#: Environment variable naming an existing Dask scheduler (``tcp://host:8786``).
SCHEDULER_ENV = "EQUISLIDE_SCHEDULER"
#: Module every local worker imports at start (``dask worker --preload`` for an existing cluster).
PRELOAD = "equislide.flows._preload"
#: Environment of every local worker process from its start (Dask's nanny "pre-spawn" environment).
WORKER_PRE_SPAWN_ENV = {"MALLOC_MMAP_THRESHOLD_": str(32 * 2**20)}
#: Interface every server of a local cluster binds.
LOCAL_HOST = "127.0.0.1"
#: Environment variable: where a local cluster serves its Dask dashboard (default: nowhere but loopback).
DASHBOARD_ENV = "EQUISLIDE_DASHBOARD"
_LOCAL_HOSTS = {"127.0.0.1", "localhost", "::1", "0.0.0.0", ""}


#: Least time the temporary local Prefect server gets to start, s.
EPHEMERAL_STARTUP_S = 90


@contextlib.contextmanager
def shared_prefect_api() -> Iterator[str | None]:
    """Run the block with ``PREFECT_API_URL`` set: the configured server, else one temporary local one.

    Yields:
        The API URL the flow and its tasks use (None when ephemeral mode is off and no URL is set;
        Prefect then raises its own error on first use).
    """
    from prefect.settings import PREFECT_API_URL, get_current_settings, temporary_settings

    settings = get_current_settings()
    if settings.api.url:
        yield str(settings.api.url)
        return
    if not settings.server.ephemeral.enabled:
        yield None
        return
    from prefect.server.api.server import SubprocessASGIServer

    server = SubprocessASGIServer()  # the process-wide instance Prefect's own clients would start
    # Prefect's 20 s default is too short on a loaded 2-core node (the demo timed out at load 10).
    server.start(timeout=max(settings.server.ephemeral.startup_timeout_seconds, EPHEMERAL_STARTUP_S))
    with temporary_settings(updates={PREFECT_API_URL: server.api_url}):
        yield server.api_url


@contextlib.contextmanager
def worker_environment() -> Iterator[None]:
    """Dask config for the block: worker processes started in it get :data:`WORKER_PRE_SPAWN_ENV`."""
    import dask

    key = "distributed.nanny.pre-spawn-environ"
    with dask.config.set({f"{key}.{name}": value for name, value in WORKER_PRE_SPAWN_ENV.items()}):
        yield


def _worker_malloc_env() -> dict[str, str | None]:
    return {k: os.environ.get(k) for k in ("MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_")}


def worker_warnings(client: Any | None = None) -> list[str]:
    """One line per problem with the Dask workers of ``client`` (by default the running flow's): each worker
    advertising a GPU its torch cannot use, and workers lacking the malloc setting."""
    client = client or _runner_client()
    if client is None:
        return []
    envs = client.run(_worker_malloc_env)
    slow = sorted(
        a for a, e in envs.items() if e["MALLOC_TRIM_THRESHOLD_"] and not e["MALLOC_MMAP_THRESHOLD_"]
    )
    lines = [
        f"Dask worker {name} advertises GPU=1 but its torch ({version}) sees no CUDA device: its feature "
        "tasks run on the CPU and none is GPU-annotated for it; start it without --resources GPU=1, or "
        "with a CUDA build of torch"
        for name, version in _gpu_claims(client)[1]
    ]
    if slow:
        lines.append(
            f"{len(slow)} of {len(envs)} Dask workers set MALLOC_TRIM_THRESHOLD_ without "
            "MALLOC_MMAP_THRESHOLD_: feature extraction runs about 2x slower there; start them with "
            "MALLOC_MMAP_THRESHOLD_=33554432 in their environment"
        )
    return lines


@contextlib.contextmanager
def all_cores() -> Iterator[int]:
    """Let torch use every core this process may run on, for the block; yields that count.

    For barrier stages (BatchNorm calibration, the cohort K-means): one task runs while every other
    worker waits for it, so the single-threaded worker (Dask pins BLAS/OpenMP to one thread) may borrow
    the node's idle cores. Restores the previous thread count after.
    """
    import torch

    before = torch.get_num_threads()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    torch.set_num_threads(cores)
    try:
        yield cores
    finally:
        torch.set_num_threads(before)


def api_reachable_from(scheduler: str | None, api_url: str | None) -> str | None:
    """A warning when workers behind ``scheduler`` on another host cannot reach ``api_url``, else None."""
    if not scheduler or not api_url:
        return None
    sched_host = urlparse(scheduler if "://" in scheduler else f"tcp://{scheduler}").hostname or ""
    api_host = urlparse(api_url).hostname or ""
    if api_host in _LOCAL_HOSTS and sched_host not in _LOCAL_HOSTS:
        return (
            f"the Prefect API {api_url} is local to this machine but the Dask scheduler {scheduler} is not: "
            "workers on other hosts cannot report to it; run `prefect server start` on a reachable host "
            "and set PREFECT_API_URL here"
        )
    return None


def _runner_client() -> Any | None:
    ctx = FlowRunContext.get()
    runner = getattr(ctx, "task_runner", None) if ctx else None
    return runner.client if isinstance(runner, DaskTaskRunner) else None


def _torch_cuda() -> tuple[bool, str]:
    import torch

    return bool(torch.cuda.is_available()), str(torch.__version__)


def _gpu_claims(client: Any) -> tuple[list[str], list[tuple[str, str]]]:
    """Workers advertising a ``GPU`` resource: ``(addresses whose torch sees CUDA, [(name, torch version)]
    of those whose torch does not)``.

    ``--resources GPU=1`` is only a label the operator gives a worker. Trusted blindly on a worker whose
    torch has no CUDA (a CPU wheel, no driver), every GPU-annotated feature task would queue for that one
    worker while the others idle, and run on its CPU anyway.
    """
    workers = client.scheduler_info(n_workers=-1)["workers"]
    claimed = sorted(a for a, w in workers.items() if (w.get("resources") or {}).get("GPU", 0) >= 1)
    if not claimed:
        return [], []
    # A worker gone since scheduler_info is simply not counted.
    answers = client.run(_torch_cuda, workers=claimed, on_error="ignore")
    usable = [a for a in claimed if a in answers and answers[a][0]]
    without = [
        (f"{workers[a].get('name')} ({a})" if workers[a].get("name") not in (None, a) else a, answers[a][1])
        for a in claimed
        if a in answers and not answers[a][0]
    ]
    return usable, without


def gpu_workers() -> int:
    """Workers of the running flow's Dask cluster advertising a ``GPU`` resource whose torch sees CUDA
    (0 off Dask)."""
    client = _runner_client()
    if client is None:
        return 0
    return len(_gpu_claims(client)[0])


def cluster_description() -> dict[str, Any]:
    """The running flow's task runner: scheduler, workers, threads, GPU workers (for the report)."""
    ctx = FlowRunContext.get()
    client = _runner_client()
    if client is None:
        runner = getattr(ctx, "task_runner", None) if ctx else None
        return {"task_runner": type(runner).__name__ if runner else None}
    info = client.scheduler_info(n_workers=-1)
    workers = info["workers"].values()
    return {
        "task_runner": "DaskTaskRunner",
        "scheduler": info.get("address"),
        "workers": len(workers),
        "threads": sum(int(w.get("nthreads", 0)) for w in workers),
        "gpu_workers": len(_gpu_claims(client)[0]),
    }


def local_cluster_spec(workers: int | None = None) -> tuple[str, dict[str, Any]]:
    """``(cluster class, kwargs)`` of the local cluster both ``segment`` and ``tile`` start.

    A ``dask_cuda.LocalCUDACluster`` (one worker per GPU, each advertising ``resources={"GPU": 1}``)
    when dask-cuda imports and sees GPUs; else a ``distributed.LocalCluster`` of single-threaded
    processes (Dask pins each to one BLAS/OpenMP thread, so N workers use N cores), ``workers`` of
    them (default one per CPU core). Workers preload :data:`PRELOAD`; start them inside
    :func:`worker_environment`.
    """
    try:
        from dask_cuda.utils import get_n_gpus

        n_gpus = int(get_n_gpus())
    except Exception:  # dask-cuda missing, or no NVIDIA driver
        n_gpus = 0
    # The scheduler serves HTTP (health, metrics) even without the dashboard, on 8787 of ``host`` unless
    # told otherwise: a random loopback port keeps it private and off other runs' 8787.
    dashboard = os.environ.get(DASHBOARD_ENV) or None
    common = {
        "host": LOCAL_HOST,
        "dashboard_address": dashboard or f"{LOCAL_HOST}:0",
        "silence_logs": logging.ERROR,
        "preload": [PRELOAD],
    }
    if not dashboard:
        common["scheduler_kwargs"] = {"dashboard": False}
    if n_gpus:
        kwargs = {**common, "resources": {"GPU": 1}}
        if workers:
            kwargs["n_workers"] = min(workers, n_gpus)
        return "dask_cuda.LocalCUDACluster", kwargs
    n = workers or os.cpu_count() or 1
    return "distributed.LocalCluster", {**common, "n_workers": n, "threads_per_worker": 1, "processes": True}


def scheduler_problem(address: str, *, timeout: float = 10.0) -> str | None:
    """Why this process cannot use the Dask scheduler at ``address``, in one line; None when it answers.

    Checked before a flow (and its Prefect server) starts: a scheduler that refuses this client's TLS
    certificate does so in 0.1 s, where the flow took 77 s on 2 cores to fail on it as "the Dask
    cluster was lost (StreamClosedError)". Uses the Dask TLS configuration, as the run will.
    """
    from distributed import Client

    from equislide.text import one_line

    try:
        with Client(address, timeout=timeout, set_as_default=False):
            return None
    except Exception as err:  # noqa: BLE001 - every way of failing ends the same: one line, no run
        chain, seen = [], err
        while seen is not None and len(chain) < 8:
            chain.append(seen)
            seen = seen.__cause__ or seen.__context__
        # Dask may wrap the ssl error in a comm error and keep only its text (FatalCommClosedError:
        # "... SSLError: [SSL: TLSV1_ALERT_UNKNOWN_CA] ..."), so the text counts as well as the type.
        def tls_refusal(e: BaseException) -> bool:
            return "SSL" in type(e).__name__ or "SSLError" in str(e) or "CERTIFICATE" in str(e)

        if address.startswith("tls://") and any(tls_refusal(e) for e in chain):
            cause = next(e for e in chain if tls_refusal(e))
            return (
                f"the Dask scheduler {address} and this client do not trust each other's TLS certificates "
                f"({type(cause).__name__}: {one_line(cause)[:160]}); give --tls-ca-file, --tls-cert and "
                "--tls-key from the cluster's CA"
            )
        return f"cannot reach the Dask scheduler {address} ({type(err).__name__}: {one_line(err)[:200]})"


def make_task_runner(*, scheduler: str | None = None, workers: int | None = None) -> DaskTaskRunner:
    """The Dask task runner: an existing scheduler, else the local cluster of :func:`local_cluster_spec`.

    Args:
        scheduler: ``tcp://host:8786`` of an existing cluster (default: ``$EQUISLIDE_SCHEDULER``).
        workers: Worker processes of a local cluster (default: one per CPU core, or one per GPU).
    """
    address = scheduler or os.environ.get(SCHEDULER_ENV)
    if address:
        return DaskTaskRunner(address=address)
    cluster_class, kwargs = local_cluster_spec(workers)
    return DaskTaskRunner(cluster_class=cluster_class, cluster_kwargs=kwargs)


@contextlib.contextmanager
def dask_client(*, scheduler: str | None = None, workers: int | None = None) -> Iterator[Any]:
    """A ``distributed.Client`` of an existing scheduler, or of the same local cluster a flow starts.

    For commands that use Dask without Prefect (``equislide tile``); the cluster (if local) is closed
    when the block ends.
    """
    import importlib

    from distributed import Client

    address = scheduler or os.environ.get(SCHEDULER_ENV)
    if address:
        with Client(address) as client:
            yield client
        return
    cluster_class, kwargs = local_cluster_spec(workers)
    module, _, name = cluster_class.rpartition(".")
    with worker_environment():
        cluster = getattr(importlib.import_module(module), name)(**kwargs)
    try:
        with Client(cluster) as client:
            yield client
    finally:
        cluster.close()
