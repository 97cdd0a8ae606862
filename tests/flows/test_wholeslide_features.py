"""One large sample's tiles, features and label maps spread over every worker: several tasks of
shard-aligned tile ranges on a real 2-worker Dask cluster with a real Prefect server, and the same bytes
(stores and outputs) as a 1-worker run."""

from __future__ import annotations

import asyncio
import hashlib
import re
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _large import write_large_image  # noqa: E402

pytestmark = pytest.mark.slow

# ~170 tiles of 32 px at 4 µm/px from one 2048 px image: a "whole slide" that runs in seconds.
OPTIONS = {
    "mpp": 4.0,
    "input_mpp": 1.0,
    "tile": 32,
    "halo": 8,
    "layer": 1,
    "model_kwargs": {"width": 8},
    "clusters": 3,
}


def _logs(flow_run_id) -> list[str]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    async def read():
        async with get_client() as client:
            logs: list = []
            while batch := await client.read_logs(
                log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])), offset=len(logs)
            ):
                logs.extend(batch)
            return [log.message for log in logs]

    return asyncio.run(read())


def _run(image: Path, out: Path, address: str):
    from prefect_dask import DaskTaskRunner

    from equislide.flows.cohort import cohort_flow

    flow = cohort_flow.with_options(task_runner=DaskTaskRunner(address=address))
    state = flow([str(image)], str(out), return_state=True, **OPTIONS)
    return state.result(), _logs(state.state_details.flow_run_id)


def _digests(out: Path) -> dict[str, str]:
    return {
        str(p.relative_to(out)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(out.rglob("*"))
        if p.is_file() and p.name != "run.json"
    }


def test_large_sample_features_run_on_both_workers_with_single_worker_bytes(
    prefect_harness, dask_cluster, tmp_path
):
    from distributed import LocalCluster

    from equislide.flows.cluster import PRELOAD, worker_environment
    from equislide.stages.features import feature_ranges

    image = write_large_image(tmp_path / "big.tiff")
    two, logs = _run(image, tmp_path / "two", dask_cluster.scheduler_address)
    sample = two["samples"]["big"]
    assert sample["status"] == "done", sample
    ranges = feature_ranges(tmp_path / "two" / "tiles" / "big.zarr")
    assert len(ranges) >= 16

    shares = [m for m in logs if re.fullmatch(r"features big tiles \d+-\d+ on worker tcp://\S+", m)]
    workers = {m.rsplit(" ", 1)[1] for m in shares}
    assert len(shares) >= 4 and len(workers) == 2, logs
    covered = sorted(tuple(map(int, m.split()[3].split("-"))) for m in shares)
    assert covered[0][0] == 0 and covered[-1][1] == ranges[-1][1]
    assert all(b == c for (_, b), (c, _) in zip(covered, covered[1:], strict=False))  # each tile once
    assert sample["timings"]["features_s"] > 0
    # The tile stage spreads the slide's shard ranges the same way, and one share published the store.
    tiled = [m for m in logs if re.fullmatch(r"tile big tiles \d+-\d+ on worker tcp://\S+", m)]
    assert len(tiled) >= 2 and len({m.rsplit(" ", 1)[1] for m in tiled}) == 2, logs
    assert sample["timings"]["tile_s"] > 0
    # So does the segment stage: range shares on both workers, the last one writing the outputs.
    segmented = [m for m in logs if re.fullmatch(r"segment big tiles \d+-\d+ on worker tcp://\S+", m)]
    assert len(segmented) >= 2 and len({m.rsplit(" ", 1)[1] for m in segmented}) == 2, logs
    spans = sorted(tuple(map(int, m.split()[3].split("-"))) for m in segmented)
    assert spans[0][0] == 0 and spans[-1][1] == ranges[-1][1]
    assert all(b == c for (_, b), (c, _) in zip(spans, spans[1:], strict=False))
    assert sample["timings"]["segment_s"] > 0 and Path(sample["outputs"]["geojson"]).stat().st_size > 0
    assert not list((tmp_path / "two" / "samples").glob("*.segment.partial"))
    # Its pictures were drawn during the features stage (a task of its own) and kept in the store, so
    # the publishing segment unit only copied the image levels and drew the labels.
    from equislide.stages.segment import _kept_image_levels, _kept_picture

    kept = tmp_path / "two" / "tiles" / "big.zarr"
    assert _kept_picture(kept) is not None and _kept_image_levels(kept) is not None

    with worker_environment():
        single = LocalCluster(
            n_workers=1, threads_per_worker=1, processes=True, dashboard_address=None, preload=[PRELOAD]
        )
    with single:
        one, _ = _run(image, tmp_path / "one", single.scheduler_address)
    assert one["samples"]["big"]["status"] == "done"
    a, b = _digests(tmp_path / "two"), _digests(tmp_path / "one")
    assert any(k.startswith("tiles/big.zarr/features/layer1/c/") for k in a)
    assert {
        "tiles/big.zarr/overlay_picture/zarr.json",
        "tiles/big.zarr/ome_image_levels/0/zarr.json",
    } <= a.keys()
    assert a == b, sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))[:10]
