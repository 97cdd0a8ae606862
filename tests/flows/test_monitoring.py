"""Monitoring that tells the truth, read back from the Prefect server of the test harness.

One small cohort (a 6-position phantom TMA and a file that is not a slide) on the session's Dask
cluster: the flow run's state name and message, the task-run names, the progress bar's values as the
run went, the per-sample table and summary published after every stage (one artifact per key), the
failure counts in the logs; and a run whose every input fails ends FAILED with its report intact.
"""

from __future__ import annotations

import asyncio
import json
import re
from pathlib import Path

import pytest

OPTIONS = {"mpp": 5.0, "tile": 128, "halo": 16, "layer": 3, "model_kwargs": {"width": 8}, "clusters": 3}


def test_stage_weights_follow_the_measured_costs():
    from equislide.flows.monitor import stage_weights

    for random_weights in (False, True):
        for consistency in (False, True):
            w = stage_weights(random_weights=random_weights, consistency=consistency)
            assert sum(w.values()) == pytest.approx(1.0)
            assert max(w, key=w.get) == "features"
            assert ("consistency" in w) == consistency
    given = stage_weights(random_weights=False, consistency=False)
    assert given["features"] > 0.7 and given["backbone"] < 0.02
    assert stage_weights(random_weights=True, consistency=False)["backbone"] > 0.2


@pytest.fixture(scope="module")
def phantom(tmp_path_factory) -> Path:
    from equislide.tiling import write_phantom

    return write_phantom(
        tmp_path_factory.mktemp("phantom") / "tma.tiff", cores=6, core_diameter_um=800.0, seed=3
    ).image_path


def _read_back(flow_run_id):
    """The flow run, its task runs, its artifacts and its log messages as the server holds them."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        ArtifactFilter,
        ArtifactFilterFlowRunId,
        FlowRunFilter,
        FlowRunFilterId,
        LogFilter,
        LogFilterFlowRunId,
    )
    from prefect.logging.handlers import APILogWorker

    APILogWorker.drain_all(
        timeout=30, at_exit=False
    )  # the flow's last records are still in the handler's batch otherwise

    async def read():
        async with get_client() as client:
            run = await client.read_flow_run(flow_run_id)
            tasks = await client.read_task_runs(
                flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id]))
            )
            artifacts = await client.read_artifacts(
                artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]))
            )
            logs: list = []
            while batch := await client.read_logs(
                log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])), offset=len(logs)
            ):
                logs.extend(batch)
            return run, tasks, artifacts, [log.message for log in logs]

    return asyncio.run(read())


@pytest.fixture(scope="module")
def monitored_run(phantom, prefect_harness, dask_cluster, tmp_path_factory):
    """The cohort flow with one bad input; every progress value and every table the flow published."""
    from prefect_dask import DaskTaskRunner

    import equislide.flows.monitor as monitor
    from equislide.flows.cohort import cohort_flow

    bad = tmp_path_factory.mktemp("bad") / "broken.svs"
    bad.write_bytes(b"this is not a slide\n")
    out = tmp_path_factory.mktemp("run") / "run"
    progress, tables = [], []
    real_update, real_table = monitor.update_progress_artifact, monitor.Monitor.table

    def update(artifact_id, value):
        progress.append(value)
        return real_update(artifact_id, value)

    def table(self, key, rows, description):
        tables.append((key, [dict(r) for r in rows]))
        return real_table(self, key, rows, description)

    monitor.update_progress_artifact = update
    monitor.Monitor.table = table
    try:
        runner = DaskTaskRunner(address=dask_cluster.scheduler_address)
        state = cohort_flow.with_options(task_runner=runner)(
            [str(phantom), str(bad)], str(out), return_state=True, **OPTIONS
        )
    finally:
        monitor.update_progress_artifact, monitor.Monitor.table = real_update, real_table
    run, tasks, artifacts, logs = _read_back(state.state_details.flow_run_id)
    return {
        "report": state.result(),
        "run": run,
        "tasks": tasks,
        "artifacts": artifacts,
        "logs": logs,
        "progress": progress,
        "tables": tables,
        "bad": bad,
    }


def test_partial_failure_is_named_and_counted(monitored_run):
    from equislide.flows._common import PARTIAL_STATE_NAME

    state = monitored_run["run"].state
    assert state.is_completed() and state.name == PARTIAL_STATE_NAME
    assert state.message == "1 of 2 inputs failed"
    logs = monitored_run["logs"]
    tiled = [m for m in logs if m.startswith("tiled ")]
    assert tiled == [tiled[0]] and "(1 inputs failed, 0 samples failed)" in tiled[0], tiled
    assert not any("(0 failed)" in m for m in logs)
    assert any(m.startswith("1 of 2 inputs failed") for m in logs), logs
    assert any(m.startswith("after features: 1 of 2 inputs failed") for m in logs), logs


def test_task_runs_are_named_by_what_they_did(monitored_run):
    names = sorted(t.name for t in monitored_run["tasks"])
    n_samples = sum(1 for s in monitored_run["report"]["samples"].values() if s["status"] != "failed")
    generated = [n for n in names if re.fullmatch(r"[a-z-]+-[0-9a-f]{3}", n)]
    assert not generated, names
    assert f"kmeans cohort k=3 ({n_samples} samples)" in names, names
    assert f"report run/run.json ({n_samples + 1} samples, 1 failed)" in names, names
    assert "plan broken" in names and "plan tma" in names, names
    assert any(
        n.startswith(f"backbone srenet18 layer 3 (random init, BatchNorm recalibrated, {n_samples}")
        for n in names
    )
    assert any(re.fullmatch(r"features tma/A1 \.\. tma/\w+ \(\d+ samples\)", n) for n in names), names
    assert "tma grids of tma" in names, names


def test_progress_is_weighted_monotone_and_reaches_100_only_at_the_end(monitored_run):
    values = monitored_run["progress"]
    assert values == sorted(values) and len(set(values)) == len(values), values
    assert values[-1] == 100.0 and all(v < 100.0 for v in values[:-1])
    # Many small steps, not a jump from 0 to 100: the feature groups alone move it several times.
    assert len(values) >= 8, values
    assert any(20.0 < v < 80.0 for v in values), values
    (progress,) = [a for a in monitored_run["artifacts"] if a.type == "progress"]
    assert float(progress.data) == 100.0


def test_table_and_summary_are_published_after_every_stage(monitored_run):
    tables = [rows for key, rows in monitored_run["tables"] if key == "equislide-samples"]
    assert len(tables) == 6  # tile, backbone, features, kmeans, segment, report
    first, last = tables[0], tables[-1]
    samples = sorted(s for s, v in monitored_run["report"]["samples"].items())
    assert sorted(r["sample"] for r in last) == samples
    running = [r for r in first if r["status"] == "running"]
    assert running and all(r["stage"] == "tile" and not r["overlay"] for r in running)
    assert {r["status"] for r in last} == {"done", "failed"}
    for r in last:
        if r["status"] == "done":
            assert r["stage"] == "segment" and r["overlay"].startswith("samples/") and r["seconds"] > 0
            assert r["tiles_per_s"] > 0, r  # the features of this run were computed, not reused
            assert re.fullmatch(r"(\d+:\d+ ?)+", r["clusters"]), r
        else:
            assert r["stage"] == "plan" and "broken" in r["sample"] and r["error"]
    by_key: dict[str, list] = {}
    for a in monitored_run["artifacts"]:
        by_key.setdefault(a.key, []).append(a)
    # One artifact per key for the run: updated in place, not a new version per stage.
    assert {k: len(v) for k, v in by_key.items()} == {
        "equislide-progress": 1,
        "equislide-samples": 1,
        "equislide-summary": 1,
    }
    stored = json.loads(by_key["equislide-samples"][0].data)
    assert stored == json.loads(json.dumps(last))
    summary = by_key["equislide-summary"][0].data
    assert summary.count("data:image/jpeg;base64,") == len([r for r in last if r["status"] == "done"])
    assert "1 of 2 inputs ok" in summary


def test_a_run_whose_every_input_failed_is_failed(prefect_harness, dask_cluster, tmp_path):
    from prefect_dask import DaskTaskRunner

    from equislide.flows._common import result_of
    from equislide.flows.cohort import cohort_flow

    bad = []
    for name in ("a.svs", "b.tiff"):
        bad.append(tmp_path / name)
        bad[-1].write_bytes(b"not a slide " * 10)
    runner = DaskTaskRunner(address=dask_cluster.scheduler_address)
    state = cohort_flow.with_options(task_runner=runner)(
        [str(p) for p in bad], str(tmp_path / "out"), return_state=True, **OPTIONS
    )
    run, tasks, artifacts, logs = _read_back(state.state_details.flow_run_id)
    assert run.state.is_failed() and run.state.message == "2 of 2 inputs failed", run.state
    report = result_of(state)  # what the CLI prints and counts its exit status from
    assert [i["status"] for i in report["inputs"]] == ["failed", "failed"]
    assert json.loads((tmp_path / "out" / "run.json").read_text())["inputs"][0]["status"] == "failed"
    assert any(m.startswith("2 of 2 inputs failed") for m in logs), logs
    assert {a.key for a in artifacts} == {"equislide-progress", "equislide-samples", "equislide-summary"}
