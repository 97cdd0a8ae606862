"""``equislide segment --scheduler`` on a real cluster of processes that loses a node, or its head.

All real: ``dask scheduler`` and ``dask worker`` started as a user starts them (``tests/_dask_cluster.py``:
the documented environment, ``--preload``, one thread each, 127.0.0.1), the CLI as a subprocess with its
own temporary Prefect server, a phantom TMA whose cores are the samples. A worker is killed with SIGKILL
(its whole process group: a node gone) while it runs a feature task, the scheduler likewise; the outputs
are compared byte for byte with a clean run.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _dask_cluster import dask_processes  # noqa: E402

pytestmark = pytest.mark.slow

SEGMENT = ["--mpp", "5", "--tile", "128", "--halo", "16", "--layer", "3", "--width", "8"]
ENV = {**os.environ, "PYTHONUNBUFFERED": "1"}
FEATURES_DONE = "tiles/**/_equislide_features_done.json"


@pytest.fixture(scope="module")
def phantom(tmp_path_factory) -> Path:
    from equislide.tiling import write_phantom

    # 8 grid positions, one left empty: 7 samples in 4 feature tasks (about two per worker), ~3 s each.
    return write_phantom(
        tmp_path_factory.mktemp("phantom") / "tma.tiff", cores=8, core_diameter_um=800.0, seed=3
    ).image_path


def _segment(phantom: Path, out: Path, address: str) -> list[str]:
    return [sys.executable, "-m", "equislide", "segment", str(phantom), "--out", str(out), *SEGMENT,
            "--scheduler", address]  # fmt: skip


def _outputs(out: Path) -> dict[str, Any]:
    """Everything a run leaves for its users: each file under samples/ and models/ (bytes), and
    run.json's per-sample results without their timings (paths relative to ``out``)."""
    found: dict[str, Any] = {
        str(p.relative_to(out)): p.read_bytes()
        for folder in ("samples", "models")
        for p in sorted((out / folder).rglob("*"))
        if p.is_file()
    }
    samples = json.loads((out / "run.json").read_text().replace(str(out), "DIR"))["samples"]
    for s in samples.values():
        s.pop("timings", None)
    found["run.json samples"] = samples
    return found


def _assert_same(outputs: dict[str, Any], reference: dict[str, Any]) -> None:
    assert sorted(outputs) == sorted(reference)
    differ = [k for k in reference if outputs[k] != reference[k]]
    assert not differ, f"{len(differ)} outputs differ from the clean run, e.g. {differ[:5]}"


def _holds(predicate) -> Any:
    """``predicate()``; a folder renamed while it is globbed (a store being published) is "not yet"."""
    try:
        return predicate()
    except FileNotFoundError:
        return None


def _wait_for(predicate, proc: subprocess.Popen, what: str, timeout: float = 600) -> Any:
    deadline = time.monotonic() + timeout
    while not (found := _holds(predicate)):
        assert proc.poll() is None, f"the run ended before {what}: {proc.communicate()[1][-3000:]}"
        assert time.monotonic() < deadline, f"no {what} in {timeout} s"
        time.sleep(0.3)
    return found


def _group_members(pgid: int) -> list[str]:
    """Processes still in process group ``pgid`` a few seconds after its leader exited (zombies aside)."""
    import psutil

    def members() -> list[str]:
        found = []
        for p in psutil.process_iter(["name", "status"]):
            with contextlib.suppress(psutil.Error, ProcessLookupError):
                if os.getpgid(p.pid) == pgid and p.info["status"] != psutil.STATUS_ZOMBIE:
                    found.append(f"{p.pid} {p.info['name']}")
        return found

    deadline = time.monotonic() + 20
    while (found := members()) and time.monotonic() < deadline:
        time.sleep(0.5)
    return found


@pytest.fixture(scope="module")
def reference(phantom, tmp_path_factory) -> dict[str, Any]:
    """A clean run on two workers, the first started with ``--resources GPU=1`` on this CPU-only torch."""
    folder = tmp_path_factory.mktemp("reference")
    out = folder / "run"
    with dask_processes(folder / "cluster", workers=0) as cluster:
        cluster.start_workers(1, resources="GPU=1")
        cluster.start_workers(1)
        t0 = time.perf_counter()
        run = subprocess.run(
            _segment(phantom, out, cluster.address), env=ENV, capture_output=True, text=True, timeout=900
        )
        seconds = time.perf_counter() - t0
        logs = {name: p.log.read_text() for name, p in cluster.named.items()}
    assert run.returncode == 0, run.stderr[-3000:]
    print(f"clean run on the real cluster: {seconds:.1f} s")
    return {"run": run, "logs": logs, "out": out, "outputs": _outputs(out), "address": cluster.address}


def test_gpu_resource_without_cuda_runs_on_cpu_with_one_warning(reference):
    """A worker that advertises GPU=1 while its torch has no CUDA is named once; its claim is not trusted
    (no feature task is GPU-annotated, so they spread over both workers) and it computes on the CPU."""
    import torch

    if torch.cuda.is_available():
        pytest.skip("this torch sees CUDA: the worker's GPU claim would be true")
    stderr = reference["run"].stderr
    warnings = [ln for ln in stderr.splitlines() if "advertises GPU=1" in ln]
    assert len(warnings) == 1, stderr[-3000:]
    assert "Dask worker w1 (tcp://127.0.0.1:" in warnings[0] and "sees no CUDA device" in warnings[0]
    assert "feature tasks run on the CPU" in warnings[0]
    assert "MALLOC_MMAP_THRESHOLD_" not in stderr, (
        "the documented worker environment did not reach the workers"
    )
    report = json.loads((reference["out"] / "run.json").read_text())
    assert report["device"]["workers"] == 2 and report["device"]["gpu_workers"] == 0, report["device"]
    for name, log in reference["logs"].items():  # annotated GPU=1, all of them would queue for w1
        assert "Task run 'features " in log, f"worker {name} ran no feature task"
    assert all(s["status"] == "done" for s in report["samples"].values()), report["samples"]


def test_worker_killed_during_features_run_completes_identical(phantom, reference, tmp_path):
    """SIGKILL to a worker's process group while it runs a feature task: Dask reschedules the task on the
    other worker (the worker's death is no task error) and the run ends as a clean one does."""
    out = tmp_path / "run"
    with dask_processes(tmp_path / "cluster", workers=2) as cluster:
        run = subprocess.Popen(
            _segment(phantom, out, cluster.address), env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        try:
            victim, key = _wait_for(lambda: cluster.processing("features"), run, "a feature task")[0]
            time.sleep(1.0)  # into the task's tiles, past Prefect's start-up of the task run
            cluster.kill(victim)
            t_kill = time.perf_counter()
            stdout, stderr = run.communicate(timeout=900)
        finally:
            if run.poll() is None:
                run.kill()
        after_s = time.perf_counter() - t_kill
        assert victim.returncode == -signal.SIGKILL
        killed_log = victim.log.read_text()
    assert run.returncode == 0, stderr[-3000:]
    assert "Task run 'features " in killed_log, "the killed worker never started a feature task"
    print(f"worker killed in {key}; the run finished {after_s:.1f} s later")
    _assert_same(_outputs(out), reference["outputs"])


def test_scheduler_killed_one_line_then_rerun_resumes_identical(phantom, reference, tmp_path):
    """SIGKILL to the scheduler once some samples' features are written: exit 1 within a bound with one
    line naming the scheduler; a rerun on a new cluster keeps the finished tile stores and features."""
    out = tmp_path / "run"
    with dask_processes(tmp_path / "cluster", workers=2) as cluster:
        address = cluster.address
        run = subprocess.Popen(
            _segment(phantom, out, address),
            env=ENV,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,  # its group: whatever it started (its Prefect server) must end with it
        )
        try:
            _wait_for(lambda: any(out.glob(FEATURES_DONE)), run, "a sample's finished features")
            cluster.kill(cluster.scheduler)
            t_kill = time.perf_counter()
            stdout, stderr = run.communicate(timeout=300)
        finally:
            if run.poll() is None:
                run.kill()
        after_s = time.perf_counter() - t_kill
        left = _group_members(run.pid)
    assert not left, f"the failed run left processes behind: {left}"
    assert run.returncode == 1, stderr[-3000:]
    assert "Traceback" not in stderr, stderr[-3000:]
    errors = [ln for ln in stderr.splitlines() if ln.startswith("equislide segment: error: ")]
    assert len(errors) == 1, stderr[-3000:]
    assert f"the Dask cluster was lost (scheduler {address})" in errors[0], errors[0]
    assert after_s < 120, after_s
    print(f"scheduler killed: the CLI exited {after_s:.1f} s later: {errors[0]}")
    finished = {
        p: (p.stat().st_ino, p.stat().st_mtime_ns)
        for p in [*out.glob("tiles/**/_equislide_done.json"), *out.glob(FEATURES_DONE)]
    }
    n_features = len(list(out.glob(FEATURES_DONE)))
    assert n_features >= 1

    with dask_processes(tmp_path / "cluster2", workers=2) as cluster:
        rerun = subprocess.run(
            _segment(phantom, out, cluster.address), env=ENV, capture_output=True, text=True, timeout=900
        )
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    redone = [
        p for p, (ino, mtime) in finished.items() if (p.stat().st_ino, p.stat().st_mtime_ns) != (ino, mtime)
    ]
    assert not redone, f"finished work was redone: {redone}"
    print(f"rerun kept {len(finished)} done-markers ({n_features} samples' features)")
    _assert_same(_outputs(out), reference["outputs"])
