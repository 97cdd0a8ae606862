"""Infrastructure faults, one run per output folder, damaged done-markers, the flow run's final state.

All real: ``equislide segment`` processes, a Dask scheduler process killed mid-run, the session's Prefect
server and Dask cluster, stores on disk damaged the ways the issue found.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

SEGMENT = ["--mpp", "5", "--tile", "128", "--halo", "16", "--layer", "3", "--width", "8"]
OPTIONS = {"mpp": 5.0, "tile": 128, "halo": 16, "layer": 3, "model_kwargs": {"width": 8}}
ENV = {**os.environ, "PYTHONUNBUFFERED": "1"}


@pytest.fixture(scope="module")
def phantom(tmp_path_factory) -> Path:
    from equislide.tiling import write_phantom

    return write_phantom(
        tmp_path_factory.mktemp("phantom") / "tma.tiff", cores=6, core_diameter_um=800.0, seed=3
    ).image_path


def _segment(phantom: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "equislide", "segment", str(phantom), "--out", str(out), *SEGMENT, *extra]


def _holds(predicate) -> bool:
    """``predicate()``; a folder renamed while it is globbed (a store being published) is "not yet"."""
    try:
        return bool(predicate())
    except FileNotFoundError:
        return False


def _wait_for(predicate, proc: subprocess.Popen, what: str, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not _holds(predicate):
        assert proc.poll() is None, f"the run ended before {what}: {proc.communicate()[1][-2000:]}"
        assert time.monotonic() < deadline, f"no {what} in {timeout} s"
        time.sleep(0.02)


def _no_traceback(stderr: str) -> None:
    assert "Traceback" not in stderr, stderr[-3000:]


# --- one run per output folder --------------------------------------------------------------------


def test_second_run_refused_then_stale_lock_of_killed_run_taken_over(phantom, tmp_path):
    """Run A holds OUT; run B on OUT is refused in seconds naming A; A is killed with SIGKILL (its lock
    file stays); run C takes the stale lock over with a warning, resumes and finishes."""
    out = tmp_path / "run"
    lock = out / ".equislide.lock"
    a = subprocess.Popen(
        _segment(phantom, out, "--workers", "1"),
        env=ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        _wait_for(lock.exists, a, "lock file")
        t0 = time.perf_counter()
        b = subprocess.run(_segment(phantom, out), env=ENV, capture_output=True, text=True, timeout=120)
        refused_s = time.perf_counter() - t0
        assert b.returncode == 2, b.stderr[-2000:]
        (line,) = b.stderr.strip().splitlines()
        assert line.startswith("equislide segment: error: ") and f"in use by another run: pid {a.pid}" in line
        assert refused_s < 30, refused_s  # imports only: no Prefect server, no cluster
        _wait_for(lambda: any(out.glob("tiles/**/_equislide_features_done.json")), a, "features")
    finally:
        os.killpg(a.pid, signal.SIGKILL)
        a.wait()
    assert json.loads(lock.read_text())["pid"] == a.pid  # the killed run's lock is left behind
    c = subprocess.run(_segment(phantom, out), env=ENV, capture_output=True, text=True, timeout=600)
    assert c.returncode == 0, c.stderr[-3000:]
    assert f"stale lock of a run that is gone: pid {a.pid}" in c.stderr
    assert not lock.exists()
    report = json.loads((out / "run.json").read_text())
    assert report["samples"] and all(s["status"] in ("done", "skipped") for s in report["samples"].values())


# --- the Dask scheduler lost mid-run ---------------------------------------------------------------


def _limit_file_size(limit: int):
    """``preexec_fn``: every file this process writes stops growing at ``limit`` bytes (EFBIG, the
    signal ignored), which is what a full disk does to a writer; unprivileged, unlike mounting a
    small filesystem."""

    def apply() -> None:
        import resource

        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


def _scheduler(
    folder: Path, worker_file_limit: int | None = None
) -> tuple[subprocess.Popen, subprocess.Popen, str]:
    """A Dask scheduler and one worker as separate processes, as on a real cluster."""
    file = folder / "scheduler.json"
    file.unlink(missing_ok=True)
    quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL, "start_new_session": True}
    sched = subprocess.Popen(
        [sys.executable, "-m", "distributed.cli.dask_scheduler", "--scheduler-file", str(file)], **quiet
    )
    deadline = time.monotonic() + 60
    while not file.exists() or not file.read_text().strip():
        assert time.monotonic() < deadline, "the scheduler did not start"
        time.sleep(0.1)
    time.sleep(0.3)
    address = json.loads(file.read_text())["address"]
    worker = subprocess.Popen(
        [sys.executable, "-m", "distributed.cli.dask_worker", address, "--nthreads", "1", "--no-nanny"],
        preexec_fn=None if worker_file_limit is None else _limit_file_size(worker_file_limit),
        **quiet,
    )
    return sched, worker, address


def _stop(*procs: subprocess.Popen) -> None:
    for p in procs:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(p.pid, signal.SIGKILL)
        p.wait()


def test_scheduler_lost_mid_run_one_line_run_json_and_rerun_resumes(phantom, tmp_path):
    out = tmp_path / "run"
    sched, worker, address = _scheduler(tmp_path)
    try:
        run = subprocess.Popen(
            _segment(phantom, out, "--scheduler", address),
            env=ENV,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        _wait_for(lambda: any(out.glob("tiles/**/features/layer*")), run, "feature extraction")
        os.killpg(sched.pid, signal.SIGKILL)
        t_kill = time.perf_counter()
        stdout, stderr = run.communicate(timeout=300)
        after_s = time.perf_counter() - t_kill
    finally:
        _stop(sched, worker)
    assert run.returncode == 1, stderr[-3000:]
    _no_traceback(stderr)
    errors = [ln for ln in stderr.splitlines() if ln.startswith("equislide segment: error: ")]
    assert len(errors) == 1 and "the Dask cluster was lost" in errors[0], stderr[-3000:]
    assert after_s < 120, after_s
    report = json.loads((out / "run.json").read_text())
    assert "the Dask cluster was lost" in report["error"] and "Traceback" in report["error_detail"]
    assert not (out / ".equislide.lock").exists()
    tiles = {p: p.stat().st_mtime_ns for p in out.glob("tiles/**/_equislide_done.json")}
    assert tiles, "no sample was tiled before the kill"

    sched, worker, address = _scheduler(tmp_path)
    try:
        rerun = subprocess.run(
            _segment(phantom, out, "--scheduler", address),
            env=ENV,
            capture_output=True,
            text=True,
            timeout=600,
        )
    finally:
        _stop(sched, worker)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    for marker, mtime in tiles.items():  # finished work was kept, not redone
        assert marker.stat().st_mtime_ns == mtime, marker
    report = json.loads((out / "run.json").read_text())
    assert "error" not in report and all(s["status"] == "done" for s in report["samples"].values())


# --- the disk full ------------------------------------------------------------------------------


def test_disk_full_on_the_workers_one_line_per_input_and_rerun_resumes(phantom, tmp_path):
    """The workers' files cannot grow past 48 KB (tile shards and features are larger; run.json is
    not): the run ends with exit 1, each input's one line names the full disk and the file, run.json
    is written, no traceback; a rerun with room finishes what was missing."""
    out = tmp_path / "run"
    sched, worker, address = _scheduler(tmp_path, worker_file_limit=48_000)
    try:
        t0 = time.perf_counter()
        run = subprocess.run(
            _segment(phantom, out, "--scheduler", address),
            env=ENV,
            capture_output=True,
            text=True,
            timeout=600,
        )
        seconds = time.perf_counter() - t0
    finally:
        _stop(sched, worker)
    assert run.returncode == 1, run.stderr[-3000:]
    _no_traceback(run.stderr)
    failed = [ln for ln in run.stderr.splitlines() if ln.startswith("equislide segment: FAILED")]
    assert len(failed) == 1 and "disk full writing " in failed[0] and "File too large" in failed[0], failed
    report = json.loads((out / "run.json").read_text())
    assert "disk full writing" in report["inputs"][0]["reason"]
    print(f"disk-full run: {seconds:.1f} s")

    sched, worker, address = _scheduler(tmp_path)
    try:
        rerun = subprocess.run(
            _segment(phantom, out, "--scheduler", address),
            env=ENV,
            capture_output=True,
            text=True,
            timeout=600,
        )
    finally:
        _stop(sched, worker)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    report = json.loads((out / "run.json").read_text())
    assert report["samples"] and all(s["status"] == "done" for s in report["samples"].values())


# --- damaged done-markers, and the flow run's final state ------------------------------------------


def _run(inputs, out, address: str, **options):
    """The cohort flow on the session cluster; ``(report, final state as the Prefect server has it)``."""
    from prefect.client.orchestration import get_client
    from prefect_dask import DaskTaskRunner

    from equislide.flows.cohort import cohort_flow

    runner = DaskTaskRunner(address=address)
    state = cohort_flow.with_options(task_runner=runner)(
        [str(p) for p in inputs], str(out), return_state=True, **options
    )

    async def read(flow_run_id):
        async with get_client() as client:
            return (await client.read_flow_run(flow_run_id)).state

    return state.result(), asyncio.run(read(state.state_details.flow_run_id))


def test_damaged_stores_are_repaired_and_failed_inputs_show_in_the_flow_state(
    phantom, prefect_harness, dask_cluster, tmp_path
):
    """A done-marker that vouches for something missing never makes a rerun fail: features removed
    under their marker (the issue's ``KeyError: 'layer4'``), tile arrays removed under the store's
    marker, a segment output deleted, a truncated backbone checkpoint. The rerun redoes exactly those.
    A garbage input fails alone; the flow run ends COMPLETED, named and messaged for the UI."""
    from equislide.flows._common import PARTIAL_STATE_NAME

    out = tmp_path / "run"
    report, state = _run([phantom], out, dask_cluster.scheduler_address, **OPTIONS)
    assert state.is_completed() and state.name == "Completed" and not state.message
    sids = sorted(report["samples"])
    assert len(sids) >= 3 and all(s["status"] == "done" for s in report["samples"].values())
    store = {sid: Path(report["samples"][sid]["outputs"]["tiles"]) for sid in sids}
    # 1. features gone, marker kept (what two concurrent runs left)
    feats = store[sids[0]] / "features" / "layer3"
    for p in feats.iterdir():
        if p.name != "_equislide_features_done.json":
            shutil.rmtree(p) if p.is_dir() else p.unlink()
    # 2. a tile store's arrays gone, its done-marker kept
    shutil.rmtree(store[sids[1]] / "tiles")
    # 3. a segment output deleted, its marker kept
    png = Path(report["samples"][sids[2]]["outputs"]["overlay_png"])
    png.unlink()
    # 4. the calibrated backbone truncated
    (backbone,) = (out / "models").glob("backbone-*.safetensors")
    backbone.write_bytes(backbone.read_bytes()[:1000])
    intact = [*store[sids[-1]].glob("features/layer3/_equislide_features_done.json")]
    intact.append(out / "samples" / f"{sids[-1]}.segment.json")
    untouched = {p: p.stat().st_mtime_ns for p in intact}

    bad = tmp_path / "garbage.svs"
    bad.write_bytes(b"this is not a slide" * 100)
    report, state = _run([phantom, bad], out, dask_cluster.scheduler_address, **OPTIONS)
    status = {sid: s["status"] for sid, s in report["samples"].items() if sid in sids}
    assert all(v in ("done", "skipped") for v in status.values()), report["samples"]
    assert png.is_file() and (store[sids[1]] / "tiles" / "zarr.json").is_file()
    assert (feats / "zarr.json").is_file()
    assert len(untouched) == 2
    for marker, mtime in untouched.items():  # an intact sample's features and outputs were not redone
        assert marker.stat().st_mtime_ns == mtime
    assert state.is_completed() and state.name == PARTIAL_STATE_NAME, state
    assert state.message == "1 of 2 inputs failed"
