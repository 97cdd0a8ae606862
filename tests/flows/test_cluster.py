"""Where a cohort runs: one Prefect API for the flow and its Dask workers, and the workers' environment."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile

import pytest

from equislide.flows.cluster import api_reachable_from, worker_environment, worker_warnings


def test_remote_scheduler_with_a_local_api_is_flagged() -> None:
    local_api = "http://127.0.0.1:4200/api"
    assert api_reachable_from(None, local_api) is None
    assert api_reachable_from("tcp://127.0.0.1:8786", local_api) is None
    assert api_reachable_from("tcp://localhost:8786", local_api) is None
    assert api_reachable_from("tcp://gpu-node-3:8786", "http://prefect.lab:4200/api") is None
    warning = api_reachable_from("tcp://gpu-node-3:8786", local_api)
    assert warning and "gpu-node-3" in warning and "PREFECT_API_URL" in warning and "\n" not in warning


@pytest.mark.parametrize("configured", [False, True])
def test_worker_malloc_environment(configured: bool, monkeypatch) -> None:
    """Dask's nanny sets MALLOC_TRIM_THRESHOLD_ (2x slower torch); local clusters add the mmap threshold."""
    from distributed import Client, LocalCluster

    kwargs = {"n_workers": 1, "threads_per_worker": 1, "processes": True, "dashboard_address": None}
    if configured:
        with worker_environment():
            cluster = LocalCluster(**kwargs)
    else:
        # Only Dask's own pre-spawn environment: after an in-process `segment` on the session cluster
        # (tests/cli) the variable was found in this process's own environment, which workers inherit
        # (not set by equislide's code; most likely a nanny's spawn).
        monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_", raising=False)
        cluster = LocalCluster(**kwargs)
    with cluster, Client(cluster) as client:
        env = next(iter(client.run(os.environ.get, "MALLOC_MMAP_THRESHOLD_").values()))
        warnings = worker_warnings(client)
    if configured:
        assert env == str(32 * 2**20) and warnings == []
    else:
        assert env is None
        assert len(warnings) == 1 and "MALLOC_MMAP_THRESHOLD_" in warnings[0]


_ONE_API = r"""
import os
from prefect import flow, task
from prefect.cache_policies import NO_CACHE
from prefect_dask import DaskTaskRunner
from equislide.flows.cluster import shared_prefect_api

@task(cache_policy=NO_CACHE, persist_result=False)
def api_of_worker():
    from prefect.client.orchestration import get_client
    with get_client(sync_client=True) as client:
        return str(client.api_url), os.getpid()

@flow(persist_result=False)
def probe():
    return api_of_worker.submit().result()

if __name__ == "__main__":
    with shared_prefect_api() as url:
        runner = DaskTaskRunner(cluster_class="distributed.LocalCluster",
                                cluster_kwargs={"n_workers": 1, "processes": True, "dashboard_address": None})
        worker_url, pid = probe.with_options(task_runner=runner)()
    print("RESULT", url, worker_url.rstrip("/"), pid != os.getpid())
"""


@pytest.mark.slow
def test_workers_report_to_the_flows_temporary_server(tmp_path) -> None:
    """Without PREFECT_API_URL, the flow's one temporary server is the workers' API too.

    Regression: each Dask worker process started its own temporary server on first use (about 6 s per
    worker, one more uvicorn process each, task runs missing from the server the user watches).
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API")}
    env["PREFECT_HOME"] = tempfile.mkdtemp(dir=tmp_path)
    script = tmp_path / "probe.py"
    script.write_text(_ONE_API)
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=300)
    line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
    assert proc.returncode == 0 and line, proc.stderr[-3000:]
    _, url, worker_url, other_process = line.split()
    assert url.startswith("http://127.0.0.1:") and url.rstrip("/") == worker_url
    assert other_process == "True"


def test_gpu_claim_without_cuda_is_named_once_and_not_counted() -> None:
    """A worker labelled GPU=1 whose torch has no CUDA: one warning naming it; not a GPU worker."""
    import torch
    from distributed import Client, LocalCluster

    from equislide.flows import cluster as cluster_module

    if torch.cuda.is_available():
        pytest.skip("this torch sees CUDA: the label would be true")
    kwargs = {"n_workers": 1, "threads_per_worker": 1, "processes": True, "dashboard_address": None}
    with worker_environment():
        local = LocalCluster(resources={"GPU": 1}, **kwargs)
    with local, Client(local) as client:
        ((address, info),) = client.scheduler_info()["workers"].items()
        named = f"{info['name']} ({address})"  # LocalCluster names its workers 0, 1, ...
        warnings = worker_warnings(client)
        usable, without = cluster_module._gpu_claims(client)
    assert usable == [] and [name for name, _ in without] == [named]
    assert len(warnings) == 1, warnings
    assert f"Dask worker {named} advertises GPU=1" in warnings[0] and torch.__version__ in warnings[0]


def test_lost_cluster_line_names_the_scheduler_in_whole_sentences() -> None:
    from distributed.client import FutureCancelledError

    from equislide.commands._common import fault_line

    text = "Client lost the connection to the scheduler. Please check your connection and re-run your work."
    err = FutureCancelledError("features_task-0123", reason="scheduler-connection-lost", msg=text)
    line = fault_line(err, scheduler="tcp://10.0.0.7:8786")
    assert line.startswith("the Dask cluster was lost (scheduler tcp://10.0.0.7:8786): FutureCancelledError")
    assert line.endswith("lost the connection to the scheduler; rerun when it is back (work is kept)"), line
    assert "\n" not in line and "Please check your c" not in line
    assert "(scheduler" not in fault_line(err)  # a local cluster: no address to name
