"""The cohort flow: slides -> tile stores -> features -> K-means -> label maps -> outputs -> run report.

Stages (Prefect tasks whose bodies are library calls; the flow only submits and waits). Per-sample
stages run in contiguous groups of samples, about two tasks per worker (:func:`_groups`): each Prefect
task run costs API calls and state changes, while a group's samples still succeed or fail one by one.

0. ``cluster``: the first use of the task runner starts a local cluster (timed apart in ``run.json``).
1. ``plan`` per input: :func:`equislide.stages.tile.plan_slide` (hash, thumbnail, tissue mask, TMA
   cores, tile grids); then ``tile`` per group of its samples: :func:`equislide.stages.tile.write_samples`
   -> ``OUT/tiles/<sample>.zarr``, so the cores of one TMA slide are tiled on several workers.
2. ``backbone`` once: :func:`equislide.stages.backbone.calibrated_backbone` (given weights, or a seeded
   random initialisation with BatchNorm recalibrated on the cohort's tiles, saved under ``OUT/models``).
3. ``features`` per group: :func:`equislide.stages.features.extract_store_features` (float16, beside
   the tiles), then (``fit="cohort"``) :func:`~equislide.stages.features.draw_store_vectors`, the
   sample's share of the K-means vectors. Annotated ``resources={"GPU": 1}`` only when the cluster has
   workers advertising a GPU.
4. ``kmeans`` once (``fit="cohort"``): :func:`equislide.stages.cluster.fit_cohort_stores` stacks the
   draws and fits.
5. ``segment`` per group: :func:`equislide.stages.segment.segment_store` -> ``OUT/samples/<sample>``
   ``.ome.zarr`` / ``.png`` / ``.geojson`` (fitting K-means per sample first when ``fit="per-sample"``).
6. ``report``: :func:`equislide.storage.write_manifest` -> ``OUT/run.json``; Prefect artifacts (progress,
   a per-sample table, a markdown summary with overlay thumbnails).

Run state (samples, stores, failures, timings) lives in one :class:`RunState`; each stage is a short
function of it, and the flow body is the list of stages.

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
import dataclasses
import logging
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
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
from equislide.specs import BackboneRef, ClusterSpec, FeatureSpec, KMeansRef, TilingSpec
from equislide.stages.backbone import calibrated_backbone
from equislide.stages.cluster import fit_cohort_stores
from equislide.stages.features import DRAWS_DIR, draw_store_vectors, extract_store_features
from equislide.stages.inputs import assign_sample_ids, failed_record, reason_of
from equislide.stages.segment import segment_store
from equislide.stages.tile import SampleResult, SlidePlan, plan_slide, write_samples
from equislide.storage import (
    RunManifest,
    clean_partials,
    sample_store_path,
    thumbnail_data_uri,
    write_manifest,
)
from equislide.text import one_line
from equislide.tiling import SamplePlan, SlideError

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


def _label(items: list[tuple[str, Any]]) -> str:
    """A task run's name part: its first sample ID, and the last and count when there are several."""
    sample_ids = [sid for sid, _ in items]
    return sample_ids[0] + (f" .. {sample_ids[-1]} ({len(sample_ids)})" if len(sample_ids) > 1 else "")


@task(
    name="plan",
    task_run_name="plan {sample_id}",
    retries=2,
    retry_delay_seconds=[2, 10],
    retry_condition_fn=_transient,
    **_TASK,
)
def plan_task(path: str, tiles_root: str, sample_id: str, spec: TilingSpec) -> SlidePlan:
    """Hash, mask and dearray one input; lay out its samples' tiles."""
    get_run_logger().info("planning %s as %s", path, sample_id)
    return plan_slide(path, tiles_root, spec, sample_id=sample_id)


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
def backbone_task(stores: list[str], models_dir: str, spec: FeatureSpec) -> BackboneRef:
    """The checkpoint every feature task loads (random weights: BatchNorm recalibrated on the cohort)."""
    get_run_logger().info("preparing %s for %d samples", spec.backbone, len(stores))
    with all_cores():  # a barrier: every other worker waits for this task
        return calibrated_backbone(stores, models_dir, spec)


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
    backbone: BackboneRef,
    spec: FeatureSpec,
    draws_dir: str | None,
    cluster: ClusterSpec,
    label: str,
) -> list[dict[str, Any]]:
    """Float16 features of every tile of some samples (``(sample_id, store)``), beside their tiles;
    then, with ``draws_dir``, each sample's share of the cohort K-means' vectors (so the fit only
    stacks)."""

    def one(store: str) -> dict[str, Any]:
        res = extract_store_features(store, backbone, spec)
        if draws_dir is not None:
            draw_store_vectors(store, draws_dir, layer=backbone.layer, spec=cluster)
        return res

    return _each_sample(items, "features", one)


@task(name="kmeans", retries=1, retry_delay_seconds=5, retry_condition_fn=_transient, **_TASK)
def kmeans_task(stores: list[str], models_dir: str, layer: int, spec: ClusterSpec) -> KMeansRef:
    """One K-means model for the cohort, from a stratified sample of every store's tissue vectors."""
    get_run_logger().info("fitting K-means (k=%s) on %d samples", spec.k, len(stores))
    with all_cores():  # a barrier: every other worker waits for this task
        return fit_cohort_stores(stores, models_dir, layer=layer, spec=spec)


@task(
    name="segment",
    task_run_name="segment {label}",
    retries=1,
    retry_delay_seconds=5,
    retry_condition_fn=_transient,
    **_TASK,
)
def segment_task(
    items: list[tuple[str, str]],
    samples_dir: str,
    layer: int,
    spec: ClusterSpec,
    kmeans: KMeansRef | None,
    label: str,
) -> list[dict[str, Any]]:
    """Label maps and outputs (OME-Zarr, overlay PNG, GeoJSON) of some samples (``(sample_id, store)``)."""
    return _each_sample(
        items,
        "segmenting",
        lambda store: segment_store(store, samples_dir, layer=layer, spec=spec, kmeans=kmeans),
    )


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


@dataclass
class RunState:
    """What a cohort run knows as its stages go: the flow's only mutable state.

    Attributes:
        root: The run folder (``tiles/``, ``models/``, ``samples/``, ``run.json``).
        paths: The inputs, each once, in the order given.
        ids: Sample ID (of the slide) per input that has one.
        records: Report record per input (``failed_record`` or the tile stage's).
        workers: Workers of the cluster (sizes the groups).
        samples: Per sample ID: ``store``, ``input`` and each stage's status or result.
        errors: Per failed sample ID: its one-line reason, ``"<stage>: <why>"``.
        timings: Per sample ID: seconds per stage.
        stage_s: Seconds per stage of the whole run.
        backbone: The network of the run (after the backbone stage).
        kmeans: The cohort model (after the K-means stage, ``fit="cohort"``).
    """

    root: Path
    paths: list[str]
    ids: dict[str, str]
    records: dict[str, dict[str, Any]]
    workers: int = 1
    samples: dict[str, dict[str, Any]] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)
    timings: dict[str, dict[str, float]] = field(default_factory=dict)
    stage_s: dict[str, float] = field(default_factory=dict)
    backbone: BackboneRef | None = None
    kmeans: KMeansRef | None = None

    @property
    def tiles_root(self) -> Path:
        return self.root / "tiles"

    @property
    def models_dir(self) -> Path:
        return self.root / "models"

    @property
    def samples_dir(self) -> Path:
        return self.root / "samples"

    def live(self) -> list[tuple[str, str]]:
        """``(sample_id, store)`` of every sample still going, in sample-ID order."""
        return [(sid, self.samples[sid]["store"]) for sid in sorted(self.samples) if sid not in self.errors]

    def fail(self, sample_id: str, reason: str) -> None:
        self.errors[sample_id] = reason
        get_run_logger().warning("FAILED %s: %s", sample_id, reason)


@contextlib.contextmanager
def _timed(state: RunState, name: str) -> Iterator[None]:
    t0 = time.perf_counter()
    try:
        yield
    finally:
        state.stage_s[f"{name}_s"] = time.perf_counter() - t0


def _barrier(state: RunState, stage: str, future) -> Any | None:
    """The result of a one-task stage; every live sample fails with its reason when it failed."""
    reason = _failure(future)
    if reason is None:
        return future.result()
    for sid, _ in state.live():
        state.fail(sid, f"{stage}: {reason}")
    return None


def _backbone_stage(state: RunState, spec: FeatureSpec) -> None:
    live = state.live()
    if live:
        fut = backbone_task.submit(sorted(store for _, store in live), str(state.models_dir), spec)
        state.backbone = _barrier(state, "backbone", fut)


def _features_stage(state: RunState, spec: FeatureSpec, cluster: ClusterSpec) -> None:
    """Features per group (GPU-annotated only where workers advertise a GPU: CPU clusters never hang)."""
    gpu = gpu_workers() > 0  # asked again, not from the start: GPU workers may have joined since
    draws = str(state.models_dir / DRAWS_DIR) if cluster.fit == "cohort" else None

    def done(sid: str, res: dict[str, Any]) -> None:
        state.samples[sid]["features"] = res["status"]
        state.timings[sid]["features_s"] = res["seconds"]

    with dask.annotate(resources={"GPU": 1}) if gpu else contextlib.nullcontext():
        submitted = {
            features_task.submit(items, state.backbone, spec, draws, cluster, _label(items)): items
            for items in _groups(state.live(), state.workers)
        }
    _collect("features", submitted, done, state.fail)


def _kmeans_stage(state: RunState, layer: int, cluster: ClusterSpec) -> None:
    live = state.live()
    if cluster.fit == "cohort" and live:
        fut = kmeans_task.submit([store for _, store in live], str(state.models_dir), layer, cluster)
        state.kmeans = _barrier(state, "kmeans", fut)


def _segment_stage(state: RunState, layer: int, cluster: ClusterSpec, progress_id) -> None:
    def done(sid: str, res: dict[str, Any]) -> None:
        state.samples[sid]["segment"] = res
        state.timings[sid]["segment_s"] = res["seconds"]

    def progress(n: int) -> None:
        update_progress_artifact(progress_id, 100.0 * n / max(len(state.samples), 1))

    samples_dir = str(state.samples_dir)
    submitted = {
        segment_task.submit(items, samples_dir, layer, cluster, state.kmeans, _label(items)): items
        for items in _groups(state.live(), state.workers)
    }
    _collect("segment", submitted, done, state.fail, after=progress)


@flow(name="equislide-cohort", persist_result=False, log_prints=False, task_runner=_deployment_runner())
def cohort_flow(
    inputs: list[str],
    out: str,
    *,
    backbone: str = FeatureSpec.backbone,
    weights: str | None = None,
    layer: int = FeatureSpec.layer,
    clusters: int = ClusterSpec.k,
    fit: str = ClusterSpec.fit,
    kmeans: str = ClusterSpec.backend,
    per_sample: int = ClusterSpec.per_sample,
    mpp: float = TilingSpec.mpp,
    tile: int = TilingSpec.tile,
    halo: int = TilingSpec.halo,
    input_mpp: float | None = None,
    tma: str = TilingSpec.tma,
    seed: int = 0,
    model_kwargs: dict[str, Any] | None = None,
    calibration_tiles: int = FeatureSpec.calibration_tiles,
    device: str = FeatureSpec.device,
    command: list[str] | None = None,
) -> dict[str, Any]:
    """Segment a cohort of slides; returns the run report (also written to ``OUT/run.json``).

    The parameters are flat (Prefect shows and deploys them as they are); the flow turns them into
    :class:`~equislide.specs.TilingSpec`, :class:`~equislide.specs.FeatureSpec` and
    :class:`~equislide.specs.ClusterSpec`, whose defaults these are.

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
        mpp, tile, halo, input_mpp, tma: Tiling (:class:`~equislide.specs.TilingSpec`).
        seed: Seeds the random weights, the vector draws and K-means.
        model_kwargs: Builder arguments for random weights (e.g. ``{"width": 16}``).
        calibration_tiles: Tiles BatchNorm is recalibrated on (random weights).
        device: Feature device on the workers (``auto``: CUDA when the worker has one).
        command: The command line, for the report.
    """
    tiling = TilingSpec(mpp=mpp, tile=tile, halo=halo, input_mpp=input_mpp, tma=tma)
    features = FeatureSpec(
        backbone=backbone,
        layer=layer,
        weights=weights,
        seed=seed,
        model_kwargs=model_kwargs or {},
        calibration_tiles=calibration_tiles,
        device=device,
    )
    cluster = ClusterSpec(k=clusters, fit=fit, backend=kmeans, per_sample=per_sample, seed=seed)
    logger = get_run_logger()
    t_start = time.perf_counter()
    state = _start(inputs, out)
    with _timed(state, "cluster"):
        description = cluster_description()  # the first use of the cluster: a local one starts here
    state.workers = max(1, int(description.get("workers") or 1))
    logger.info("cohort of %d inputs on %s -> %s", len(state.paths), description, state.root)
    for warning in worker_warnings():
        logger.warning(warning)
    progress_id = create_progress_artifact(0.0, key="equislide-progress", description="samples done / total")

    with _timed(state, "tile"):
        _tile_stage(state, tiling)
    logger.info(
        "tiled %d inputs into %d samples (%d failed)", len(state.ids), len(state.samples), len(state.errors)
    )
    with _timed(state, "backbone"):
        _backbone_stage(state, features)
    with _timed(state, "features"):
        _features_stage(state, features, cluster)
    with _timed(state, "kmeans"):
        _kmeans_stage(state, layer, cluster)
    with _timed(state, "segment"):
        _segment_stage(state, layer, cluster, progress_id)

    manifest = _manifest(state, tiling, features, cluster, description, command)
    manifest.timings["total_s"] = round(time.perf_counter() - t_start, 3)
    report_path = report_task.submit(str(state.root), manifest.to_dict()).result()
    report = manifest.to_dict()
    report["path"] = report_path
    _artifacts(report)
    logger.info("\n%s", summary_text(report))
    return report


def _start(inputs: list[str], out: str) -> RunState:
    """The run folder made and cleaned of a killed run's leftovers; every input's sample ID."""
    root = Path(out)
    (root / "tiles").mkdir(parents=True, exist_ok=True)
    clean_partials(root / "tiles")  # leftovers of a killed run; this run owns OUT
    paths = list(dict.fromkeys(str(p) for p in inputs))
    ids, records = assign_sample_ids(paths)
    return RunState(root=root, paths=paths, ids=ids, records=records)


def _manifest(
    state: RunState,
    tiling: TilingSpec,
    features: FeatureSpec,
    cluster: ClusterSpec,
    description: dict[str, Any],
    command: list[str] | None,
) -> RunManifest:
    """``run.json``: parameters, inputs, per-sample status, timings."""
    records = state.records
    for sid, reason in state.errors.items():  # an input with a failed sample is a failed input
        rec = records[state.samples[sid]["input"]]
        rec["status"] = "failed"
        rec["reason"] = "; ".join(filter(None, [rec.get("reason"), f"{sid}: {reason}"]))
    manifest = RunManifest(
        parameters={
            "backbone": features.backbone,
            "weights": features.weights,
            "weights_note": _weights_note(state.backbone, features.weights),
            "layer": features.layer,
            "clusters": cluster.k,
            "fit": cluster.fit,
            "kmeans": cluster.backend,
            "per_sample": cluster.per_sample,
            "seed": features.seed,
            "model_kwargs": dict(features.model_kwargs),
            "calibration_tiles": features.calibration_tiles,
            **dataclasses.asdict(tiling),
            "backbone_checkpoint": None if state.backbone is None else state.backbone.to_dict(),
            "kmeans_model": None if state.kmeans is None else state.kmeans.to_dict(),
            "input_records": [records[p] for p in state.paths],
        },
        inputs=[
            {"path": p, "sha256": records[p].get("sha256"), "status": records[p]["status"]}
            | ({"reason": records[p]["reason"]} if records[p]["status"] == "failed" else {})
            for p in state.paths
        ],
        command=list(command or []),
        device={**description, "feature_device": features.device},
    )
    for sid in sorted(state.samples):
        sample = state.samples[sid]
        seg_res = sample.get("segment") or {}
        reused = all(sample.get(k) == "skipped" for k in ("tiles", "features")) and (
            seg_res.get("status") == "skipped"
        )
        status = "failed" if sid in state.errors else ("skipped" if reused else "done")
        manifest.set_sample(
            sid,
            status,
            error=state.errors.get(sid),
            timings=state.timings.get(sid, {}),
            outputs=seg_res.get("outputs", {}) | {"tiles": sample["store"]},
        )
    for p in state.paths:  # inputs that gave no sample at all
        if records[p]["status"] == "failed" and not records[p].get("samples"):
            manifest.set_sample(records[p]["sample_id"] or Path(p).name, "failed", error=records[p]["reason"])
    manifest.timings = {k: round(v, 3) for k, v in state.stage_s.items()}
    return manifest


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


def _tile_stage(state: RunState, spec: TilingSpec) -> None:
    """Plan every input, then write its samples in groups (:func:`_groups`) as the plans arrive.

    Fills ``state.records`` (per input), ``samples``, ``errors`` (a sample that cannot be tiled fails
    alone) and ``timings``. Groups are contiguous runs of samples (neighbouring TMA cores share slide
    reads).
    """
    logger = get_run_logger()
    tiles_root = str(state.tiles_root)
    plans: dict[str, SlidePlan] = {}
    owner: dict[str, str] = {}  # sample ID -> input
    written: dict[str, list[SampleResult]] = {p: [] for p in state.ids}
    groups: dict[Any, list[tuple[str, SamplePlan]]] = {}
    plan_futures = {plan_task.submit(p, tiles_root, state.ids[p], spec): p for p in state.ids}
    for fut in as_completed(list(plan_futures)):
        path = plan_futures[fut]
        reason = _failure(fut)
        if reason is not None:
            err = fut.result(raise_on_failure=False)
            state.records[path] = failed_record(path, reason, type(err).__name__, sample_id=state.ids[path])
            logger.warning("FAILED %s: %s", path, reason)
            continue
        plan = plans[path] = fut.result()
        owner.update(dict.fromkeys(plan.sample_ids, path))
        for chunk in _groups(plan.todo, state.workers):
            items = [(s.sample_id, s) for s in chunk]
            groups[tile_task.submit(chunk, tiles_root, _label(items))] = items

    def untiled(sid: str, reason: str) -> None:  # a store never finished: later stages skip the sample
        state.samples[sid] = {"store": str(sample_store_path(tiles_root, sid)), "input": owner[sid]}
        state.fail(sid, reason)

    _collect("tile", groups, lambda sid, result: written[owner[sid]].append(result), untiled)
    for path, plan in plans.items():
        results = plan.ordered(written[path])
        state.records[path] = {
            "path": path,
            "sample_id": state.ids[path],
            "sha256": plan.input_sha256,
            "status": "ok",
            "reason": None,
            "samples": list(plan.sample_ids),
            "tiles": sum(r.n_tiles for r in results),
            "warnings": sorted({w for r in results for w in r.warnings}),
        }
        for r in results:
            state.samples[r.sample_id] = {"store": str(r.store), "input": path, "tiles": r.status}
            state.timings[r.sample_id] = {"tile_s": round(r.seconds, 3)}


def _weights_note(backbone: BackboneRef | None, weights: str | None) -> str:
    if weights:
        return f"weights from {weights}"
    if backbone is None:
        return "no backbone was prepared"
    n = len(backbone.provenance["calibration"])
    return (
        f"no trained weights: {backbone.provenance['init']} with BatchNorm recalibrated on {n} of "
        f"the cohort's tiles ({backbone.path})"
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
