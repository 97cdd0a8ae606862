"""The cohort flow: slides -> tile stores -> features -> K-means -> label maps -> outputs -> run report.

Stages (Prefect tasks whose bodies are library calls; the flow only submits and waits). Per-sample
stages run in contiguous groups of samples, about two tasks per worker (:func:`_groups`): each Prefect
task run costs API calls and state changes, while a group's samples still succeed or fail one by one.

0. ``cluster``: the first use of the task runner starts a local cluster (timed apart in ``run.json``).
1. ``plan`` per input: :func:`equislide.tiling.plan_slide` (hash, thumbnail, tissue mask, TMA cores,
   tile grids); then ``tile`` per group of its samples: :func:`equislide.tiling.write_samples` ->
   ``OUT/tiles/<sample>.zarr``, so the cores of one TMA slide are tiled on several workers.
2. ``backbone`` once: :func:`equislide.models.pipeline.calibrated_backbone` (given weights, or a seeded
   random initialisation with BatchNorm recalibrated on the cohort's tiles, saved under ``OUT/models``).
3. ``features`` per group: :func:`~equislide.models.pipeline.extract_store_features` (float16, beside
   the tiles), then (``fit="cohort"``) :func:`~equislide.models.pipeline.draw_store_vectors`, the
   sample's share of the K-means vectors. Annotated ``resources={"GPU": 1}`` only when the cluster has
   workers advertising a GPU.
4. ``kmeans`` once (``fit="cohort"``): :func:`~equislide.models.pipeline.fit_cohort_stores` stacks the
   draws and fits.
5. ``segment`` per group: :func:`~equislide.models.pipeline.segment_store` -> ``OUT/samples/<sample>``
   ``.ome.zarr`` / ``.png`` / ``.geojson`` (fitting K-means per sample first when ``fit="per-sample"``).
6. ``report``: :func:`equislide.storage.write_manifest` -> ``OUT/run.json``; Prefect artifacts (progress,
   a per-sample table, a markdown summary with overlay thumbnails).

The two barrier stages (2 and 4: one task while every other worker waits) let torch use every core of
their node (:func:`~equislide.flows.cluster.all_cores`). Where the flow runs and which Prefect API its
workers report to: :mod:`equislide.flows.cluster`.

Resume: every library stage skips results already finished from the same inputs and parameters (done
markers in the stores, keyed model and draw files, ``<sample>.segment.json``), so Prefect's own result
caching is off (``cache_policy=NO_CACHE``): a cache hit could not tell that an output was deleted, and
arrays are never pickled into Prefect's result storage. Task run names carry the sample IDs; logs go to
the Prefect UI through :func:`prefect.get_run_logger`.

A bad input never stops the others: its task fails (slide errors are not retried; I/O errors are), the
flow records one line saying why, and every other sample goes on; a sample that fails inside a group
fails alone.
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
from prefect.futures import as_completed
from prefect_dask import DaskTaskRunner

from equislide.flows._inputs import assign_sample_ids, failed_record, one_line, reason_of
from equislide.flows.cluster import (
    SCHEDULER_ENV,
    all_cores,
    api_reachable_from,
    cluster_description,
    gpu_workers,
    make_task_runner,
    shared_prefect_api,
    worker_environment,
    worker_warnings,
)
from equislide.models import pipeline as seg
from equislide.storage import (
    RunManifest,
    clean_partials,
    sample_store_path,
    thumbnail_data_uri,
    write_manifest,
)
from equislide.tiling import SamplePlan, SampleResult, SlideError, SlidePlan, plan_slide, write_samples

__all__ = ["SCHEDULER_ENV", "cohort_flow", "make_task_runner", "run_cohort", "set_progress_callback"]

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
    return _is_transient(err)


_TASK = {"cache_policy": NO_CACHE, "persist_result": False}
#: Overlay thumbnails embedded in the run's markdown artifact (~8 kB each, stored in Prefect's database).
_MAX_THUMBNAILS = 48


def _is_transient(err: BaseException) -> bool:
    return isinstance(err, (OSError, TimeoutError)) and not isinstance(err, SlideError)


def _each_sample(items: list[tuple[str, Any]], verb: str, fn: Callable[[Any], Any]) -> list[dict[str, Any]]:
    """``fn(x)`` for each ``(sample_id, x)`` of a group task; a sample's own error is its result.

    A transient error (I/O, a timeout) is raised instead, so Prefect retries the group; samples already
    finished are skipped on the retry (every stage resumes), so a retry redoes only what failed.
    """
    logger = get_run_logger()
    out = []
    for sample_id, x in items:
        logger.info("%s %s", verb, sample_id)
        try:
            out.append({"sample_id": sample_id, "result": fn(x)})
        except Exception as err:
            if _is_transient(err):
                raise
            out.append({"sample_id": sample_id, "reason": reason_of(err)})
    return out


def _groups(items: list[Any], workers: int) -> list[list[Any]]:
    """Contiguous groups, about two per worker: few enough that Prefect's per-task cost (API calls and
    state changes: ~0.13 s from submit to result for an empty task, measured) stays small beside the
    work, enough to balance the workers."""
    size = -(-len(items) // (2 * max(1, workers))) if items else 1
    return [items[i : i + size] for i in range(0, len(items), size)]


def _label(sample_ids: list[str]) -> str:
    return sample_ids[0] + (f" .. {sample_ids[-1]} ({len(sample_ids)})" if len(sample_ids) > 1 else "")


@task(
    name="plan",
    task_run_name="plan {sample_id}",
    retries=2,
    retry_delay_seconds=[2, 10],
    retry_condition_fn=_transient,
    **_TASK,
)
def plan_task(path: str, tiles_root: str, sample_id: str, options: dict[str, Any]) -> SlidePlan:
    """Hash, mask and dearray one input; lay out its samples' tiles."""
    get_run_logger().info("planning %s as %s", path, sample_id)
    return plan_slide(path, tiles_root, sample_id=sample_id, **options)


@task(
    name="tile",
    task_run_name="tile {label}",
    retries=2,
    retry_delay_seconds=[2, 10],
    retry_condition_fn=_transient,
    **_TASK,
)
def tile_task(samples: list[SamplePlan], tiles_root: str, label: str) -> list[dict[str, Any]]:
    """Read and store the tiles of some samples of one input, each on its own: a region that cannot be
    read fails its sample only (OpenSlide refuses every later read on a handle that hit an error, so
    each sample opens the slide afresh; a few ms for a pyramidal TIFF or SVS)."""
    return _each_sample(
        [(s.sample_id, s) for s in samples], "tiling", lambda s: write_samples([s], tiles_root)[0]
    )


@task(name="backbone", retries=1, retry_delay_seconds=5, retry_condition_fn=_transient, **_TASK)
def backbone_task(stores: list[str], models_dir: str, options: dict[str, Any]) -> dict[str, Any]:
    """The checkpoint every feature task loads (random weights: BatchNorm recalibrated on the cohort)."""
    get_run_logger().info("preparing %s for %d samples", options.get("backbone"), len(stores))
    with all_cores():  # a barrier: every other worker waits for this task
        return seg.calibrated_backbone(stores, models_dir, **options)


@task(
    name="features",
    task_run_name="features {label}",
    retries=2,
    retry_delay_seconds=[2, 10],
    retry_condition_fn=_transient,
    **_TASK,
)
def features_task(
    items: list[tuple[str, str]],
    backbone: dict[str, Any],
    device: str,
    draw: dict[str, Any] | None,
    label: str,
) -> list[dict[str, Any]]:
    """Float16 features of every tile of some samples (``(sample_id, store)``), beside their tiles;
    then, with ``draw``, each sample's share of the cohort K-means' vectors (so the fit only stacks)."""

    def one(store: str) -> dict[str, Any]:
        res = seg.extract_store_features(store, backbone, device=device)
        if draw is not None:
            seg.draw_store_vectors(store, **draw)
        return res

    return _each_sample(items, "features", one)


@task(name="kmeans", retries=1, retry_delay_seconds=5, retry_condition_fn=_transient, **_TASK)
def kmeans_task(stores: list[str], models_dir: str, options: dict[str, Any]) -> dict[str, Any]:
    """One K-means model for the cohort, from a stratified sample of every store's tissue vectors."""
    get_run_logger().info("fitting K-means (k=%s) on %d samples", options.get("k"), len(stores))
    with all_cores():  # a barrier: every other worker waits for this task
        return seg.fit_cohort_stores(stores, models_dir, **options)


@task(
    name="segment",
    task_run_name="segment {label}",
    retries=1,
    retry_delay_seconds=5,
    retry_condition_fn=_transient,
    **_TASK,
)
def segment_task(
    items: list[tuple[str, str]], samples_dir: str, options: dict[str, Any], label: str
) -> list[dict[str, Any]]:
    """Label maps and outputs (OME-Zarr, overlay PNG, GeoJSON) of some samples (``(sample_id, store)``)."""
    return _each_sample(items, "segmenting", lambda store: seg.segment_store(store, samples_dir, **options))


@task(name="report", retries=2, retry_delay_seconds=2, **_TASK)
def report_task(out: str, manifest: dict[str, Any]) -> str:
    """Write ``run.json`` atomically."""
    return str(write_manifest(out, manifest))


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
    t0 = time.perf_counter()
    cluster = cluster_description()  # the first use of the cluster: a local one starts here
    cluster_s = time.perf_counter() - t0
    logger.info("cohort of %d inputs on %s -> %s", len(paths), cluster, root)
    for warning in worker_warnings():
        logger.warning(warning)
    progress_id = create_progress_artifact(0.0, key="equislide-progress", description="samples done / total")

    # 1. tile every input: plan each (thumbnail, mask, cores), then write its samples in groups
    timings: dict[str, dict[str, float]] = {}
    samples: dict[str, dict[str, Any]] = {}  # sample_id -> {"store", "input", ...}
    errors: dict[str, str] = {}  # sample_id -> reason
    t0 = time.perf_counter()
    workers = max(1, int(cluster.get("workers") or 1))
    _tile_stage(
        ids,
        str(tiles_root),
        tiling,
        workers,
        records,
        samples,
        errors,
        timings,
    )
    stage_s = {"cluster_s": cluster_s, "tile_s": time.perf_counter() - t0}
    logger.info("tiled %d inputs into %d samples (%d failed)", len(ids), len(samples), len(errors))

    def fail(sample_id: str, reason: str) -> None:
        errors[sample_id] = reason
        logger.warning("FAILED %s: %s", sample_id, reason)

    def live_items() -> list[tuple[str, str]]:
        return [(sid, samples[sid]["store"]) for sid in sorted(samples) if sid not in errors]

    # 2. the backbone every worker loads
    t0 = time.perf_counter()
    backbone_info: dict[str, Any] | None = None
    live = [sid for sid in sorted(samples) if sid not in errors]
    if live:
        opts = {
            "backbone": backbone,
            "layer": layer,
            "weights": weights,
            "seed": seed,
            "model_kwargs": model_kwargs,
            "calibration_tiles": calibration_tiles,
        }
        fut = backbone_task.submit(sorted(samples[sid]["store"] for sid in live), str(models_dir), opts)
        reason = _failure(fut)
        if reason is None:
            backbone_info = fut.result()
        else:
            for sid in live:
                fail(sid, f"backbone: {reason}")
    stage_s["backbone_s"] = time.perf_counter() - t0

    # 3. features per sample (GPU-annotated only where workers advertise a GPU: CPU clusters never hang)
    t0 = time.perf_counter()
    gpu = gpu_workers() > 0  # asked again, not from the start: GPU workers may have joined since

    def features_done(sid: str, res: dict[str, Any]) -> None:
        samples[sid]["features"] = res["status"]
        timings[sid]["features_s"] = res["seconds"]

    draw = None
    if fit == "cohort":
        draw = {
            "out_dir": str(models_dir / seg.DRAWS_DIR),
            "layer": layer,
            "per_sample": per_sample,
            "seed": seed,
        }
    with dask.annotate(resources={"GPU": 1}) if gpu else contextlib.nullcontext():
        submitted = {
            features_task.submit(items, backbone_info, device, draw, _label([i[0] for i in items])): items
            for items in _groups(live_items(), workers)
        }
    _collect("features", submitted, features_done, fail)
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
    opts = {"layer": layer, "kmeans": kmeans_info, "k": clusters, "per_sample": per_sample, "backend": kmeans}
    opts["seed"] = seed

    def segment_done(sid: str, res: dict[str, Any]) -> None:
        samples[sid]["segment"] = res
        timings[sid]["segment_s"] = res["seconds"]

    def progress(done: int) -> None:
        update_progress_artifact(progress_id, 100.0 * done / max(len(samples), 1))

    submitted = {
        segment_task.submit(items, str(samples_dir), opts, _label([i[0] for i in items])): items
        for items in _groups(live_items(), workers)
    }
    _collect("segment", submitted, segment_done, fail, after=progress)
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


def _collect(
    stage: str,
    submitted: dict[Any, list[tuple[str, Any]]],
    done: Callable[[str, dict[str, Any]], None],
    fail: Callable[[str, str], None],
    *,
    after: Callable[[int], None] | None = None,
) -> None:
    """Wait for a stage's group tasks as they finish: each sample's result, or its reason to fail."""
    total = sum(len(items) for items in submitted.values())
    n = 0
    for fut in as_completed(list(submitted)):
        items = submitted[fut]
        reason = _failure(fut)
        for item in [] if reason is not None else fut.result():
            if "reason" in item:
                fail(item["sample_id"], f"{stage}: {item['reason']}")
            else:
                done(item["sample_id"], item["result"])
        for sid, _ in items if reason is not None else []:
            fail(sid, f"{stage}: {reason}")
        n += len(items)
        if after is not None:
            after(n)
        _notify(stage, n, total)


def _tile_stage(
    ids: dict[str, str],
    tiles_root: str,
    tiling: dict[str, Any],
    workers: int,
    records: dict[str, dict[str, Any]],
    samples: dict[str, dict[str, Any]],
    errors: dict[str, str],
    timings: dict[str, dict[str, float]],
) -> None:
    """Plan every input, then write its samples in groups (:func:`_groups`) as the plans arrive.

    Fills ``records`` (per input), ``samples``, ``errors`` (a sample that cannot be tiled fails alone)
    and ``timings``. Groups are contiguous runs of samples (neighbouring TMA cores share slide reads).
    """
    logger = get_run_logger()
    plans: dict[str, SlidePlan] = {}
    owner: dict[str, str] = {}  # sample ID -> input
    written: dict[str, list[SampleResult]] = {p: [] for p in ids}
    groups: dict[Any, list[tuple[str, SamplePlan]]] = {}
    plan_futures = {plan_task.submit(p, tiles_root, ids[p], tiling): p for p in ids}
    for fut in as_completed(list(plan_futures)):
        path = plan_futures[fut]
        reason = _failure(fut)
        if reason is not None:
            err = fut.result(raise_on_failure=False)
            records[path] = failed_record(path, reason, type(err).__name__, sample_id=ids[path])
            logger.warning("FAILED %s: %s", path, reason)
            continue
        plan = plans[path] = fut.result()
        owner.update(dict.fromkeys(plan.sample_ids, path))
        for chunk in _groups(plan.todo, workers):
            label = _label([s.sample_id for s in chunk])
            groups[tile_task.submit(chunk, tiles_root, label)] = [(s.sample_id, s) for s in chunk]

    def untiled(sid: str, reason: str) -> None:  # a store never finished: later stages skip the sample
        samples[sid] = {"store": str(sample_store_path(tiles_root, sid)), "input": owner[sid]}
        errors[sid] = reason
        logger.warning("FAILED %s: %s", sid, reason)

    _collect("tile", groups, lambda sid, result: written[owner[sid]].append(result), untiled)
    for path, plan in plans.items():
        results = plan.ordered(written[path])
        records[path] = {
            "path": path,
            "sample_id": ids[path],
            "sha256": plan.input_sha256,
            "status": "ok",
            "reason": None,
            "samples": list(plan.sample_ids),
            "tiles": sum(r.n_tiles for r in results),
            "warnings": sorted({w for r in results for w in r.warnings}),
        }
        for r in results:
            samples[r.sample_id] = {"store": str(r.store), "input": path, "tiles": r.status}
            timings[r.sample_id] = {"tile_s": round(r.seconds, 3)}


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
        "| sample | status | overlay |",
        "|---|---|---|",
    ]
    embedded = 0
    for sid, s in report["samples"].items():
        png = s["outputs"].get("overlay_png")
        cell = s.get("error") or ""
        if png and embedded < _MAX_THUMBNAILS:
            try:
                cell = f"![{sid}]({thumbnail_data_uri(png)})"
                embedded += 1
            except OSError as err:  # the overlay went missing: say so, the run itself is fine
                cell = f"`{png}` (unreadable: {one_line(err)})"
        elif png:
            cell = f"`{png}`"
        md.append(f"| {sid} | {s['status']} | {cell.replace('|', '/')} |")
    create_markdown_artifact("\n".join(md), key="equislide-summary", description="run summary")


def run_cohort(
    inputs: list[str],
    out: str,
    *,
    scheduler: str | None = None,
    workers: int | None = None,
    **options: Any,
) -> dict[str, Any]:
    """Run :func:`cohort_flow` on the task runner :func:`make_task_runner` picks; returns the report.

    The flow and every task report to one Prefect API: ``PREFECT_API_URL`` when set, else one temporary
    local server started here (see :mod:`equislide.flows.cluster`).
    """
    with shared_prefect_api() as api_url:
        warning = api_reachable_from(scheduler or os.environ.get(SCHEDULER_ENV), api_url)
        if warning:
            logging.getLogger("equislide").warning(warning)
        runner = make_task_runner(scheduler=scheduler, workers=workers)
        with worker_environment():  # a local cluster starts inside the flow
            return cohort_flow.with_options(task_runner=runner)([str(p) for p in inputs], str(out), **options)


if __name__ == "__main__":  # DaskTaskRunner's worker processes re-import the main module
    import sys

    print(summary_text(run_cohort(sys.argv[2:], sys.argv[1])))
