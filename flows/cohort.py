"""The cohort flow: slides -> tile stores -> features -> K-means -> label maps -> outputs -> run report.

Stages (each a Prefect task whose body is one library call; the flow only submits and waits):

1. ``tile`` per input: :func:`equislide.tiling.tile_slide` -> ``OUT/tiles/<sample>.zarr``.
2. ``backbone`` once: :func:`equislide.models.pipeline.calibrated_backbone` (given weights, or a seeded
   random initialisation with BatchNorm recalibrated on the cohort's tiles, saved under ``OUT/models``).
3. ``features`` per sample: :func:`~equislide.models.pipeline.extract_store_features` (float16, beside
   the tiles). Annotated ``resources={"GPU": 1}`` only when the cluster has workers advertising a GPU.
4. ``kmeans`` once (``fit="cohort"``): :func:`~equislide.models.pipeline.fit_cohort_stores`.
5. ``segment`` per sample: :func:`~equislide.models.pipeline.segment_store` -> ``OUT/samples/<sample>``
   ``.ome.zarr`` / ``.png`` / ``.geojson`` (fitting K-means per sample first when ``fit="per-sample"``).
6. ``report``: :func:`equislide.storage.write_manifest` -> ``OUT/run.json``; Prefect artifacts (progress,
   a per-sample table, a markdown summary).

Resume: every library stage skips results already finished from the same inputs and parameters (done
markers in the stores, keyed model files, ``<sample>.segment.json``), so Prefect's own result caching is
off (``cache_policy=NO_CACHE``): a cache hit could not tell that an output was deleted, and arrays are
never pickled into Prefect's result storage. Task run names carry the sample ID; logs go to the Prefect
UI through :func:`prefect.get_run_logger`.

A bad input never stops the others: its task fails (slide errors are not retried; I/O errors are), the
flow records one line saying why, and every other sample goes on.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import dask
from prefect import flow, get_run_logger, task
from prefect.artifacts import (
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)
from prefect.cache_policies import NO_CACHE
from prefect.context import FlowRunContext
from prefect.futures import as_completed
from prefect_dask import DaskTaskRunner

from equislide.flows._inputs import assign_sample_ids, failed_record, reason_of
from equislide.models import pipeline as seg
from equislide.storage import RunManifest, clean_partials, write_manifest
from equislide.tiling import SlideError, tile_slide

__all__ = ["SCHEDULER_ENV", "cohort_flow", "make_task_runner", "run_cohort", "set_progress_callback"]

#: Environment variable naming an existing Dask scheduler (``tcp://host:8786``).
SCHEDULER_ENV = "EQUISLIDE_SCHEDULER"
#: ``callback(stage, done, total)``: called in the flow's process as stages progress (the CLI's bar).
ProgressCallback = Callable[[str, int, int], None]
_PROGRESS: list[ProgressCallback] = []


def set_progress_callback(callback: ProgressCallback | None) -> None:
    """Register (or clear, with None) the progress callback of flows run in this process."""
    _PROGRESS.clear()
    if callback is not None:
        _PROGRESS.append(callback)


def _notify(stage: str, done: int, total: int) -> None:
    for cb in _PROGRESS:
        cb(stage, done, total)


def _transient(task_, task_run, state) -> bool:
    """Retry I/O hiccups and lost workers, never a bad slide or a bad parameter."""
    try:
        err = state.result(raise_on_failure=False)
    except Exception:  # the exception itself could not be read back: do not retry blindly
        return False
    return isinstance(err, (OSError, TimeoutError)) and not isinstance(err, SlideError)


_TASK = {"cache_policy": NO_CACHE, "persist_result": False}


@task(name="tile", retries=2, retry_delay_seconds=[2, 10], retry_condition_fn=_transient, **_TASK)
def tile_task(path: str, tiles_root: str, sample_id: str, options: dict[str, Any]) -> list:
    """Tile one input into per-sample stores."""
    get_run_logger().info("tiling %s as %s", path, sample_id)
    return tile_slide(path, tiles_root, sample_id=sample_id, **options)


@task(name="backbone", retries=1, retry_delay_seconds=5, retry_condition_fn=_transient, **_TASK)
def backbone_task(stores: list[str], models_dir: str, options: dict[str, Any]) -> dict[str, Any]:
    """The checkpoint every feature task loads (random weights: BatchNorm recalibrated on the cohort)."""
    get_run_logger().info("preparing %s for %d samples", options.get("backbone"), len(stores))
    return seg.calibrated_backbone(stores, models_dir, **options)


@task(name="features", retries=2, retry_delay_seconds=[2, 10], retry_condition_fn=_transient, **_TASK)
def features_task(store: str, backbone: dict[str, Any], device: str = "auto") -> dict[str, Any]:
    """Float16 features of every tile of one sample, beside its tiles."""
    get_run_logger().info("features of %s", store)
    return seg.extract_store_features(store, backbone, device=device)


@task(name="kmeans", retries=1, retry_delay_seconds=5, retry_condition_fn=_transient, **_TASK)
def kmeans_task(stores: list[str], models_dir: str, options: dict[str, Any]) -> dict[str, Any]:
    """One K-means model for the cohort, from a stratified sample of every store's tissue vectors."""
    get_run_logger().info("fitting K-means (k=%s) on %d samples", options.get("k"), len(stores))
    return seg.fit_cohort_stores(stores, models_dir, **options)


@task(name="segment", retries=1, retry_delay_seconds=5, retry_condition_fn=_transient, **_TASK)
def segment_task(store: str, samples_dir: str, options: dict[str, Any]) -> dict[str, Any]:
    """Label map and outputs (OME-Zarr, overlay PNG, GeoJSON) of one sample."""
    get_run_logger().info("segmenting %s", store)
    return seg.segment_store(store, samples_dir, **options)


@task(name="report", retries=2, retry_delay_seconds=2, **_TASK)
def report_task(out: str, manifest: dict[str, Any]) -> str:
    """Write ``run.json`` atomically."""
    return str(write_manifest(out, manifest))


def _gpu_workers() -> int:
    """Workers of the flow's Dask cluster advertising a ``GPU`` resource (0 off Dask)."""
    ctx = FlowRunContext.get()
    runner = getattr(ctx, "task_runner", None) if ctx else None
    if not isinstance(runner, DaskTaskRunner):
        return 0
    workers = runner.client.scheduler_info(n_workers=-1)["workers"].values()
    return sum(1 for w in workers if (w.get("resources") or {}).get("GPU", 0) >= 1)


def _cluster_description() -> dict[str, Any]:
    ctx = FlowRunContext.get()
    runner = getattr(ctx, "task_runner", None) if ctx else None
    if not isinstance(runner, DaskTaskRunner):
        return {"task_runner": type(runner).__name__ if runner else None}
    info = runner.client.scheduler_info(n_workers=-1)
    workers = info["workers"].values()
    return {
        "task_runner": "DaskTaskRunner",
        "scheduler": info.get("address"),
        "workers": len(workers),
        "threads": sum(int(w.get("nthreads", 0)) for w in workers),
        "gpu_workers": sum(1 for w in workers if (w.get("resources") or {}).get("GPU", 0) >= 1),
    }


def _failure(future) -> str | None:
    """None when the task succeeded, else the one-line reason it failed."""
    future.wait()
    state = future.state
    if not state.is_failed() and not state.is_crashed():
        return None
    err = future.result(raise_on_failure=False)
    return reason_of(err) if isinstance(err, BaseException) else f"task {state.name}: {state.message}"


def _deployment_runner() -> DaskTaskRunner | None:
    """A deployed run (no CLI to pick a runner) uses ``$EQUISLIDE_SCHEDULER`` when it is set."""
    address = os.environ.get(SCHEDULER_ENV)
    return DaskTaskRunner(address=address) if address else None


@flow(name="equislide-cohort", persist_result=False, log_prints=False, task_runner=_deployment_runner())
def cohort_flow(
    inputs: list[str],
    out: str,
    *,
    backbone: str = "srenet18",
    weights: str | None = None,
    layer: int = 4,
    clusters: int = 3,
    fit: str = "cohort",
    kmeans: str = "auto",
    per_sample: int = 2000,
    mpp: float = 2.5,
    tile: int = 512,
    halo: int = 32,
    input_mpp: float | None = None,
    tma: str = "auto",
    seed: int = 0,
    model_kwargs: dict[str, Any] | None = None,
    calibration_tiles: int = 16,
    device: str = "auto",
    command: list[str] | None = None,
) -> dict[str, Any]:
    """Segment a cohort of slides; returns the run report (also written to ``OUT/run.json``).

    Args:
        inputs: Slide or image files.
        out: Run folder: ``tiles/``, ``models/``, ``samples/`` and ``run.json``.
        backbone: ``srenet18``, ``resnet18`` or ``e2cnn_resnet18``.
        weights: A checkpoint; None = seeded random weights, BatchNorm recalibrated on the cohort.
        layer: Feature stage 1-4.
        clusters: K-means k.
        fit: ``"cohort"`` (one model for all samples) or ``"per-sample"`` (the paper's protocol).
        kmeans: K-means backend: ``auto``, ``cuml``, ``torch`` or ``sklearn``.
        per_sample: Tissue vectors drawn per sample for the fit.
        mpp, tile, halo, input_mpp, tma: Tiling (see :func:`equislide.tiling.tile_slide`).
        seed: Seeds the random weights, the vector draws and K-means.
        model_kwargs: Builder arguments for random weights (e.g. ``{"width": 16}``).
        calibration_tiles: Tiles BatchNorm is recalibrated on (random weights).
        device: Feature device on the workers (``auto``: CUDA when the worker has one).
        command: The command line, for the report.
    """
    logger = get_run_logger()
    if fit not in ("cohort", "per-sample"):
        raise ValueError(f"fit={fit!r}; use 'cohort' or 'per-sample'")
    t_start = time.perf_counter()
    root = Path(out)
    tiles_root, models_dir, samples_dir = root / "tiles", root / "models", root / "samples"
    tiles_root.mkdir(parents=True, exist_ok=True)
    clean_partials(tiles_root)  # leftovers of a killed run; this run owns OUT
    paths = list(dict.fromkeys(str(p) for p in inputs))
    ids, records = assign_sample_ids(paths)
    tiling = {"mpp": mpp, "tile": tile, "halo": halo, "input_mpp": input_mpp, "tma": tma}
    cluster = _cluster_description()
    logger.info("cohort of %d inputs on %s -> %s", len(paths), cluster, root)
    progress_id = create_progress_artifact(0.0, key="equislide-progress", description="samples done / total")

    # 1. tile every input
    timings: dict[str, dict[str, float]] = {}
    samples: dict[str, dict[str, Any]] = {}  # sample_id -> {"store", "input", ...}
    errors: dict[str, str] = {}  # sample_id -> reason
    t0 = time.perf_counter()
    futures = {tile_task.submit(p, str(tiles_root), ids[p], tiling): p for p in ids}
    for i, fut in enumerate(as_completed(list(futures)), 1):
        path = futures[fut]
        reason = _failure(fut)
        if reason is not None:
            err = fut.result(raise_on_failure=False)
            records[path] = failed_record(path, reason, type(err).__name__, sample_id=ids[path])
            logger.warning("FAILED %s: %s", path, reason)
        else:
            results = fut.result()
            records[path] = {
                "path": path,
                "sample_id": ids[path],
                "sha256": results[0].input_sha256 if results else None,
                "status": "ok",
                "reason": None,
                "samples": [r.sample_id for r in results],
                "tiles": sum(r.n_tiles for r in results),
                "warnings": sorted({w for r in results for w in r.warnings}),
            }
            for r in results:
                samples[r.sample_id] = {"store": str(r.store), "input": path, "tiles": r.status}
                timings[r.sample_id] = {"tile_s": round(r.seconds, 3)}
        _notify("tile", i, len(futures))
    stage_s = {"tile_s": time.perf_counter() - t0}
    logger.info("tiled %d inputs into %d samples (%d failed)", len(futures), len(samples), len(errors))

    def fail(sample_id: str, reason: str) -> None:
        errors[sample_id] = reason
        logger.warning("FAILED %s: %s", sample_id, reason)

    # 2. the backbone every worker loads
    t0 = time.perf_counter()
    backbone_info: dict[str, Any] | None = None
    if samples:
        opts = {
            "backbone": backbone,
            "layer": layer,
            "weights": weights,
            "seed": seed,
            "model_kwargs": model_kwargs,
            "calibration_tiles": calibration_tiles,
        }
        fut = backbone_task.submit(sorted(s["store"] for s in samples.values()), str(models_dir), opts)
        reason = _failure(fut)
        if reason is None:
            backbone_info = fut.result()
        else:
            for sid in samples:
                fail(sid, f"backbone: {reason}")
    stage_s["backbone_s"] = time.perf_counter() - t0

    # 3. features per sample (GPU-annotated only where workers advertise a GPU: CPU clusters never hang)
    t0 = time.perf_counter()
    live = [sid for sid in sorted(samples) if sid not in errors]
    gpu = _gpu_workers() > 0
    annotate = dask.annotate(resources={"GPU": 1}) if gpu else contextlib.nullcontext()
    with annotate:
        futures = {features_task.submit(samples[sid]["store"], backbone_info, device): sid for sid in live}
    for i, fut in enumerate(as_completed(list(futures)), 1):
        sid = futures[fut]
        reason = _failure(fut)
        if reason is not None:
            fail(sid, f"features: {reason}")
        else:
            res = fut.result()
            samples[sid]["features"] = res["status"]
            timings[sid]["features_s"] = res["seconds"]
        _notify("features", i, len(futures))
    stage_s["features_s"] = time.perf_counter() - t0

    # 4. K-means for the cohort
    t0 = time.perf_counter()
    live = [sid for sid in sorted(samples) if sid not in errors]
    kmeans_info: dict[str, Any] | None = None
    if fit == "cohort" and live:
        opts = {"layer": layer, "k": clusters, "per_sample": per_sample, "backend": kmeans, "seed": seed}
        fut = kmeans_task.submit([samples[sid]["store"] for sid in live], str(models_dir), opts)
        reason = _failure(fut)
        if reason is None:
            kmeans_info = fut.result()
        else:
            for sid in live:
                fail(sid, f"kmeans: {reason}")
    stage_s["kmeans_s"] = time.perf_counter() - t0

    # 5. label maps and outputs per sample
    t0 = time.perf_counter()
    live = [sid for sid in sorted(samples) if sid not in errors]
    opts = {"layer": layer, "kmeans": kmeans_info, "k": clusters, "per_sample": per_sample, "backend": kmeans}
    opts["seed"] = seed
    futures = {segment_task.submit(samples[sid]["store"], str(samples_dir), opts): sid for sid in live}
    total = len(samples)
    for done, fut in enumerate(as_completed(list(futures)), 1):
        sid = futures[fut]
        reason = _failure(fut)
        if reason is not None:
            fail(sid, f"segment: {reason}")
        else:
            res = fut.result()
            samples[sid]["segment"] = res
            timings[sid]["segment_s"] = res["seconds"]
        update_progress_artifact(progress_id, 100.0 * done / max(total, 1))
        _notify("segment", done, len(futures))
    stage_s["segment_s"] = time.perf_counter() - t0

    # 6. the report
    for sid, reason in errors.items():  # an input with a failed sample is a failed input
        rec = records[samples[sid]["input"]]
        rec["status"] = "failed"
        rec["reason"] = "; ".join(filter(None, [rec.get("reason"), f"{sid}: {reason}"]))
    manifest = RunManifest(
        parameters={
            "backbone": backbone,
            "weights": weights,
            "weights_note": _weights_note(backbone_info, weights),
            "layer": layer,
            "clusters": clusters,
            "fit": fit,
            "kmeans": kmeans,
            "per_sample": per_sample,
            "seed": seed,
            "model_kwargs": model_kwargs or {},
            "calibration_tiles": calibration_tiles,
            **tiling,
            "backbone_checkpoint": backbone_info,
            "kmeans_model": kmeans_info,
            "input_records": [records[p] for p in paths],
        },
        inputs=[
            {"path": p, "sha256": records[p].get("sha256"), "status": records[p]["status"]}
            | ({"reason": records[p]["reason"]} if records[p]["status"] == "failed" else {})
            for p in paths
        ],
        command=list(command or []),
        device={**cluster, "feature_device": device},
    )
    for sid in sorted(samples):
        seg_res = samples[sid].get("segment") or {}
        reused = all(samples[sid].get(k) == "skipped" for k in ("tiles", "features")) and (
            seg_res.get("status") == "skipped"
        )
        status = "failed" if sid in errors else ("skipped" if reused else "done")
        manifest.set_sample(
            sid,
            status,
            error=errors.get(sid),
            timings=timings.get(sid, {}),
            outputs=seg_res.get("outputs", {}) | {"tiles": samples[sid]["store"]},
        )
    for p in paths:  # inputs that gave no sample at all
        if records[p]["status"] == "failed" and not records[p].get("samples"):
            manifest.set_sample(records[p]["sample_id"] or Path(p).name, "failed", error=records[p]["reason"])
    manifest.timings = {k: round(v, 3) for k, v in stage_s.items()}
    manifest.timings["total_s"] = round(time.perf_counter() - t_start, 3)
    report_path = report_task.submit(str(root), manifest.to_dict()).result()
    report = manifest.to_dict()
    report["path"] = report_path
    _artifacts(report)
    logger.info("\n%s", summary_text(report))
    return report


def _weights_note(backbone_info: dict[str, Any] | None, weights: str | None) -> str:
    if weights:
        return f"weights from {weights}"
    if backbone_info is None:
        return "no backbone was prepared"
    n = len(backbone_info["provenance"]["calibration"])
    return (
        f"no trained weights: {backbone_info['provenance']['init']} with BatchNorm recalibrated on {n} of "
        f"the cohort's tiles ({backbone_info['path']})"
    )


def summary_text(report: dict[str, Any]) -> str:
    """A few lines a person reads at the end of a run."""
    samples = report["samples"]
    failed_inputs = [i for i in report["inputs"] if i["status"] == "failed"]
    n_failed = sum(1 for s in samples.values() if s["status"] == "failed")
    n_in, n_ok = len(report["inputs"]), len(report["inputs"]) - len(failed_inputs)
    lines = [
        f"equislide segment: {n_ok} of {n_in} inputs ok, {len(samples) - n_failed} of {len(samples)} "
        f"samples segmented in {report['timings']['total_s']:.1f} s",
        f"  backbone: {report['parameters']['weights_note']}",
        f"  report:   {report['path']}",
    ]
    for sid, s in samples.items():
        if s["status"] != "failed" and s["outputs"].get("overlay_png"):
            lines.append(f"  {sid}: {s['outputs']['overlay_png']}")
    for i in failed_inputs:
        lines.append(f"  FAILED {i['path']}: {i['reason']}")
    return "\n".join(lines)


def _artifacts(report: dict[str, Any]) -> None:
    rows = []
    for sid, s in report["samples"].items():
        t = s.get("timings", {})
        rows.append(
            {
                "sample": sid,
                "status": s["status"],
                "tile_s": t.get("tile_s"),
                "features_s": t.get("features_s"),
                "segment_s": t.get("segment_s"),
                "error": s.get("error") or "",
            }
        )
    create_table_artifact(rows, key="equislide-samples", description="per-sample status and timings")
    md = [
        "# equislide cohort run",
        "",
        "```",
        summary_text(report),
        "```",
        "",
        "| sample | overlay |",
        "|---|---|",
    ]
    for sid, s in report["samples"].items():
        png = s["outputs"].get("overlay_png")
        if png:
            md.append(f"| {sid} | `{png}` |")
    create_markdown_artifact("\n".join(md), key="equislide-summary", description="run summary")


def make_task_runner(*, scheduler: str | None = None, workers: int | None = None) -> DaskTaskRunner:
    """The Dask task runner: an existing scheduler, else a local cluster sized to the machine.

    Args:
        scheduler: ``tcp://host:8786`` of an existing cluster (default: ``$EQUISLIDE_SCHEDULER``).
        workers: Worker processes of a local cluster (default: one per CPU core, or one per GPU).

    Returns:
        ``DaskTaskRunner(address=...)``; or a ``dask_cuda.LocalCUDACluster`` (one worker per GPU, each
        advertising ``resources={"GPU": 1}``) when dask-cuda imports and sees GPUs; else a
        ``distributed.LocalCluster`` of single-threaded processes.
    """
    address = scheduler or os.environ.get(SCHEDULER_ENV)
    if address:
        return DaskTaskRunner(address=address)
    try:
        from dask_cuda.utils import get_n_gpus

        n_gpus = int(get_n_gpus())
    except Exception:  # dask-cuda missing, or no NVIDIA driver
        n_gpus = 0
    common = {"dashboard_address": None, "silence_logs": logging.ERROR}
    if n_gpus:
        kwargs = {**common, "resources": {"GPU": 1}}
        if workers:
            kwargs["n_workers"] = min(workers, n_gpus)
        return DaskTaskRunner(cluster_class="dask_cuda.LocalCUDACluster", cluster_kwargs=kwargs)
    n = workers or os.cpu_count() or 1
    return DaskTaskRunner(
        cluster_class="distributed.LocalCluster",
        cluster_kwargs={**common, "n_workers": n, "threads_per_worker": 1, "processes": True},
    )


def run_cohort(
    inputs: list[str],
    out: str,
    *,
    scheduler: str | None = None,
    workers: int | None = None,
    **options: Any,
) -> dict[str, Any]:
    """Run :func:`cohort_flow` on the task runner :func:`make_task_runner` picks; returns the report."""
    runner = make_task_runner(scheduler=scheduler, workers=workers)
    return cohort_flow.with_options(task_runner=runner)([str(p) for p in inputs], str(out), **options)


if __name__ == "__main__":  # DaskTaskRunner's worker processes re-import the main module
    import sys

    print(summary_text(run_cohort(sys.argv[2:], sys.argv[1])))
