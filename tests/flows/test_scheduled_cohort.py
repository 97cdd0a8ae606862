"""Scheduled cohorts against a real ``prefect server start`` (a separate process, not the harness): the
work pool, ``prefect deploy`` of ``deploy/prefect.yaml``'s cohort deployment over an inbox glob, a
process worker, a run through the API and one through a one-minute cron; then a new slide in the
inbox, and only it is computed."""

from __future__ import annotations

import datetime as dt
import json
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _prefect_server import PREFECT, local_prefect_server  # noqa: E402

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
DEPLOYMENT = "equislide-cohort/inbox-cohort"
POOL = "equislide-test"
# Small but real: each slide one whole-slide sample of a few 64 px tiles at 10 µm/px, through a ResNet-18
# of width 8 at layer 2 (the scheduling is under test here; the network has its own tests). Fixed weights
# and per-sample K-means, as deploy/prefect.yaml's inbox deployment: a network calibrated on the cohort or
# a cohort K-means changes with every slide that arrives, and every sample is then recomputed.
OPTIONS = {
    "mpp": 10.0,
    "tile": 64,
    "halo": 8,
    "tma": "no",
    "backbone": "resnet18",
    "layer": 2,
    "fit": "per-sample",
}


@pytest.fixture
def server(tmp_path):
    # The scheduler service looks for due runs every 2 s instead of 60: the cron test waits for a minute
    # boundary, not for the service's loop as well.
    extra = {"PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS": "2", "PREFECT_UI_ENABLED": "false"}
    with local_prefect_server(tmp_path / "prefect", env=extra) as s:
        yield s


def _deployment_file(folder: Path, inbox: Path, out: Path) -> Path:
    """deploy/prefect.yaml's cohort deployment, pointed at the test's inbox, pool, weights and a paused
    cron."""
    import yaml

    from equislide.models import create_model, save_checkpoint

    weights = save_checkpoint(
        create_model("resnet18", width=8), folder / "models" / "resnet18-w8.safetensors"
    )

    doc = yaml.safe_load((REPO / "deploy" / "prefect.yaml").read_text())
    dep = next(d for d in doc["deployments"] if d["name"] == "inbox-cohort")
    dep["work_pool"]["name"] = POOL
    inputs = [str(inbox / "**" / "*.tiff")]
    dep["parameters"] = {
        **dep["parameters"],
        "inputs": inputs,
        "out": str(out),
        **OPTIONS,
        "weights": str(weights),
    }
    dep["parameters"]["settle_seconds"] = 1
    dep["schedules"] = [{"cron": "* * * * *", "timezone": "UTC", "active": False}]
    dep["job_variables"] = {}  # no Dask cluster here: the flow's default task runner
    doc["deployments"] = [dep]
    path = folder / "prefect.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def _read_back(client, flow_run_id):
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    run = client.read_flow_run(flow_run_id)
    only = FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id]))
    tasks = client.read_task_runs(flow_run_filter=only)
    artifacts = client.read_artifacts(flow_run_filter=only)
    return run, tasks, artifacts


def _arrive(folder: Path, inbox_file: Path, seed: int) -> None:
    """A small phantom TMA slide lands in the inbox as a finished copy does: written elsewhere, renamed in
    (its ground truth stays outside the inbox)."""
    from equislide.tiling import write_phantom

    info = write_phantom(folder / f"src-{seed}" / inbox_file.name, cores=4, core_diameter_um=800.0, seed=seed)
    inbox_file.parent.mkdir(parents=True, exist_ok=True)
    info.image_path.rename(inbox_file)


def _stamps(out: Path) -> dict[str, int]:
    """mtime (ns) of every sample's done-marker and store metadata: rewritten only when computed."""
    return {
        str(p.relative_to(out)): p.stat().st_mtime_ns
        for pattern in ("samples/**/*.segment.json", "tiles/**/zarr.json")
        for p in out.glob(pattern)
    }


def test_deployed_cohort_picks_up_new_slides(server, tmp_path):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL, temporary_settings

    t0 = time.monotonic()
    inbox, out = tmp_path / "inbox", tmp_path / "run"
    _arrive(tmp_path, inbox / "a" / "tma1.tiff", seed=1)
    (inbox / "a" / "tma9.tiff.part").write_bytes(b"a copy still in progress")
    server.run([*PREFECT, "work-pool", "create", POOL, "--type", "process"])
    server.run(
        [*PREFECT, "--no-prompt", "deploy", "--prefect-file", str(_deployment_file(tmp_path, inbox, out)),
         "--name", DEPLOYMENT],
        env={"EQUISLIDE_HOME": str(tmp_path)},
        cwd=tmp_path,
        timeout=180,
    )  # fmt: skip
    server.start(
        "worker", [*PREFECT, "worker", "start", "--pool", POOL, "--type", "process"],
        env={"PREFECT_WORKER_QUERY_SECONDS": "2"}, cwd=tmp_path,
    )  # fmt: skip

    with temporary_settings({PREFECT_API_URL: server.api_url}), get_client(sync_client=True) as client:
        # 1. Through the API: the inbox's one slide is computed, the .part file left for later.
        first = run_deployment(DEPLOYMENT, timeout=240)
        run, tasks, artifacts = _read_back(client, first.id)
        assert run.state.is_completed(), (run.state, server.log_tail("worker"))
        names = {t.name for t in tasks}
        assert {"plan tma1", "tile tma1", "features tma1", "segment tma1"} <= names, names
        assert all(t.state.is_completed() for t in tasks), [(t.name, t.state.name) for t in tasks]
        assert {"equislide-samples", "equislide-summary"} <= {a.key for a in artifacts}
        report = json.loads((out / "run.json").read_text())
        assert report["parameters"]["input_selection"]["left_for_later"] == 1
        assert report["parameters"]["input_selection"]["waiting"] == [str(inbox / "a" / "tma9.tiff.part")]
        assert {sid: s["status"] for sid, s in report["samples"].items()} == {"tma1": "done"}
        stamps1 = _stamps(out)

        # 2. Through the schedule (one-minute cron): nothing new arrived, so nothing is recomputed.
        deployment = client.read_deployment_by_name(DEPLOYMENT)
        schedule = deployment.schedules[0]
        client.update_deployment_schedule(deployment.id, schedule.id, active=True)
        only_dep = DeploymentFilter(id=DeploymentFilterId(any_=[deployment.id]))
        deadline = time.monotonic() + 150
        scheduled = None
        while scheduled is None and time.monotonic() < deadline:
            for fr in client.read_flow_runs(deployment_filter=only_dep):
                if fr.auto_scheduled and fr.state is not None and fr.state.is_final():
                    scheduled = fr
            time.sleep(2)
        client.update_deployment_schedule(deployment.id, schedule.id, active=False)
        for fr in client.read_flow_runs(deployment_filter=only_dep):  # runs queued for later minutes
            if fr.auto_scheduled and fr.state is not None and fr.state.is_scheduled():
                client.delete_flow_run(fr.id)
        assert scheduled is not None, f"no scheduled run finished in 150 s:\n{server.log_tail('worker')}"
        run, tasks, artifacts = _read_back(client, scheduled.id)
        assert run.state.is_completed(), (run.state, server.log_tail("worker"))
        assert run.expected_start_time.astimezone(dt.timezone.utc).second == 0  # on the cron's minute
        assert tasks and {"equislide-samples", "equislide-summary"} <= {a.key for a in artifacts}
        report = json.loads((out / "run.json").read_text())
        assert {s["status"] for s in report["samples"].values()} == {"skipped"}, report["samples"]
        assert _stamps(out) == stamps1

        # 3. A new slide arrives; the next run computes it alone.
        _arrive(tmp_path, inbox / "b" / "tma2.tiff", seed=2)
        time.sleep(1.5)  # older than settle_seconds: arrived
        third = run_deployment(DEPLOYMENT, timeout=240)
        run, tasks, _ = _read_back(client, third.id)
        assert run.state.is_completed(), (run.state, server.log_tail("worker"))
        report = json.loads((out / "run.json").read_text())
        status = {sid: s["status"] for sid, s in report["samples"].items()}
        assert status == {"tma1": "skipped", "tma2": "done"}, status
        stamps3 = _stamps(out)
        assert {k: v for k, v in stamps3.items() if k in stamps1} == stamps1  # tma1 untouched
        assert any("tma2" in k for k in set(stamps3) - set(stamps1))
        assert {"plan tma1", "plan tma2", "tile tma2"} <= {t.name for t in tasks}
        assert "tile tma1" not in {t.name for t in tasks}  # its plan found the store finished
    print(f"scheduled-cohort test: {time.monotonic() - t0:.0f} s")
