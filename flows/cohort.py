"""The cohort flow: slides -> tile stores -> features -> K-means -> label maps -> outputs -> run report.

Stages (Prefect tasks whose bodies are library calls; the flow only submits and waits). Per-sample
stages run in contiguous groups of samples, about two tasks per worker (:func:`groups`): each Prefect
task run costs API calls and state changes, while a group's samples still succeed or fail one by one.

0. ``cluster``: the first use of the task runner starts a local cluster (timed apart in ``run.json``).
1. ``plan`` per input: :func:`equislide.stages.tile.plan_slide` (hash, thumbnail, tissue mask, TMA
   cores, tile grids); then ``tile`` per group of its samples: :func:`equislide.stages.tile.write_samples`
   -> ``OUT/tiles/<sample>.zarr``, so the cores of one TMA slide are tiled on several workers.
2. ``backbone`` once: :func:`equislide.stages.backbone.calibrated_backbone` (given weights, or a seeded
   random initialisation with BatchNorm recalibrated on the cohort's tiles, saved under ``OUT/models``).
3. ``features`` per work unit (:func:`~equislide.flows._common.plan_units`: a large sample's
   shard-aligned tile ranges over several tasks, small samples grouped, largest first):
   :func:`equislide.stages.features.extract_store_features` (float16, beside the tiles); the share that
   completes a sample publishes it and (``fit="cohort"``) draws its share of the K-means vectors
   (:func:`~equislide.stages.features.draw_store_vectors`). Annotated ``resources={"GPU": 1}`` only
   when the cluster has workers advertising a GPU.
4. ``kmeans`` once (``fit="cohort"``): :func:`equislide.stages.cluster.fit_cohort_stores` stacks the
   draws and fits.
5. ``segment`` per work unit, planned as the features are: :func:`equislide.stages.segment.segment_share`
   (a whole sample: ``segment_store``; a large sample's share of tile ranges: ``segment_store_ranges``,
   whose last share writes the outputs from the band-stitched map) -> ``OUT/samples/<sample>``
   ``.ome.zarr`` / ``.png`` / ``.geojson`` (fitting K-means per sample first when ``fit="per-sample"``);
   then ``tma`` once: :func:`equislide.stages.segment.write_tma_geojson` -> ``OUT/samples/<slide>``
   ``.tma.geojson`` per TMA slide (its grid as QuPath ``tmaCore`` objects).
6. ``report``: :func:`equislide.storage.write_manifest` -> ``OUT/run.json``.

After every stage the run's Prefect artifacts are brought up to date (:mod:`equislide.flows.monitor`):
a progress bar weighted by the stages' measured costs, the per-sample table and the markdown summary
with overlay thumbnails, each one artifact per key, updated in place.

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
import functools
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import dask
from prefect import flow, get_run_logger, task

from equislide.flows._common import (
    LOCK_HOOKS,
    TASK_OPTIONS,
    RunState,
    backbone_stage,
    barrier,
    budget_of,
    collect,
    consistency_task,
    deployment_runner,
    each_sample,
    failure,
    groups,
    label_of,
    outcome,
    plan_units,
    report_task,
    resolve_stage,
    run_flow,
    set_progress_callback,
    start_run,
    tile_stage,
    tiles_per_s,
    timed,
    transient,
    unit_label,
    weights_note,
    worker_address,
)
from equislide.flows.cluster import (
    SCHEDULER_ENV,
    all_cores,
    gpu_workers,
    make_task_runner,
)
from equislide.flows.monitor import Monitor, stage_weights
from equislide.specs import BackboneRef, ClusterSpec, FeatureSpec, KMeansRef, TilingSpec
from equislide.stages.budget import BudgetSpec, run_within
from equislide.stages.cluster import fit_cohort_stores, split_native
from equislide.stages.consistency import SERVICE_SPEC, ConsistencySpec, budget_plan, figures
from equislide.stages.features import (
    DRAWS_DIR,
    feature_ranges,
    store_share_and_draw,
)
from equislide.stages.inputs import SETTLE_SECONDS
from equislide.stages.segment import prepare_pictures, segment_share, tma_slides, write_tma_geojson
from equislide.storage import RunManifest, thumbnail_data_uri
from equislide.text import one_line, path_text

#: ``progress(fraction)``: how much of a stage is done (0..1), told as its task groups finish.
Progress = Callable[[float], None]

#: Overlay thumbnails embedded in the run's markdown artifact (~8 kB each, stored in Prefect's database).
_MAX_THUMBNAILS = 48

__all__ = ["SCHEDULER_ENV", "cohort_flow", "make_task_runner", "run_cohort", "set_progress_callback"]


@task(
    name="features",
    task_run_name="features {label}",
    retries=2,
    retry_delay_seconds=[2, 10],
    retry_condition_fn=transient,
    **TASK_OPTIONS,
)
def features_task(
    items: list[tuple[str, tuple[str, list[tuple[int, int]] | None]]],
    backbone: BackboneRef,
    spec: FeatureSpec,
    draws_dir: str | None,
    cluster: ClusterSpec,
    label: str,
    budget: float | None = None,
) -> list[dict[str, Any]]:
    """Float16 features of some samples (``(sample_id, (store, ranges))``; ranges None = all of it, else
    a share of a large sample's tile ranges), beside their tiles; then, with ``draws_dir``, the share
    that completes a sample publishes it and draws its share of the cohort K-means' vectors (so the
    fit only stacks)."""
    one = functools.partial(
        store_share_and_draw, backbone=backbone, spec=spec, draws_dir=draws_dir, cluster=cluster
    )
    worker = worker_address()
    get_run_logger().info("features %s on worker %s", label, worker)
    out = each_sample(items, "features", one, budget=budget_of(budget, "features"))
    for item in out:  # which worker ran which share: the Prefect UI and the run's tests show it
        if "result" in item:
            item["result"]["worker"] = worker
    return out


@task(
    name="pictures",
    task_run_name="pictures {sample_id}",
    retries=1,
    retry_delay_seconds=5,
    **TASK_OPTIONS,
)
def pictures_task(sample_id: str, store: str, budget: float | None = None) -> dict[str, Any]:
    """The overlay's picture and the OME-Zarr image levels of a large sample, kept in its tile store
    while its features run, so the segment stage's publishing unit (serial, the run's last step) only
    copies the levels and draws the labels."""
    seconds = budget_of(budget, "segment")
    return run_within(seconds, f"pictures of {sample_id}", prepare_pictures, store)


def kmeans_run_name(parameters: dict[str, Any]) -> str:
    n = len(parameters["stores"])
    return f"kmeans cohort k={parameters['spec'].k} ({n} sample{'' if n == 1 else 's'})"


def tma_run_name(parameters: dict[str, Any]) -> str:
    slides = sorted({sid.rsplit("/", 1)[0] for sid, _ in parameters["items"] if "/" in sid})
    shown = ", ".join(slides[:3]) + (f" and {len(slides) - 3} more" if len(slides) > 3 else "")
    return f"tma grids of {shown or 'no TMA slide'}"


@task(
    name="kmeans",
    task_run_name=kmeans_run_name,
    retries=1,
    retry_delay_seconds=5,
    retry_condition_fn=transient,
    **TASK_OPTIONS,
)
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
    retry_condition_fn=transient,
    **TASK_OPTIONS,
)
def segment_task(
    items: list[tuple[str, tuple[str, list[tuple[int, int]] | None]]],
    samples_dir: str,
    layer: int,
    spec: ClusterSpec,
    kmeans: KMeansRef | None,
    label: str,
    budget: float | None = None,
) -> list[dict[str, Any]]:
    """Label maps and outputs (OME-Zarr, overlay PNG, GeoJSON) of some samples (``(sample_id, (store,
    ranges))``; ranges None = all of it, else a share of a large sample's tile ranges, whose last share
    to finish writes the outputs)."""
    one = functools.partial(segment_share, out_dir=samples_dir, layer=layer, spec=spec, kmeans=kmeans)
    worker = worker_address()
    get_run_logger().info("segment %s on worker %s", label, worker)
    out = each_sample(items, "segmenting", one, budget=budget_of(budget, "segment"))
    for item in out:
        if "result" in item:
            item["result"]["worker"] = worker
    return out


@task(
    name="tma",
    task_run_name=tma_run_name,
    retries=1,
    retry_delay_seconds=5,
    retry_condition_fn=transient,
    **TASK_OPTIONS,
)
def tma_task(items: list[tuple[str, str]], samples_dir: str) -> list[dict[str, Any]]:
    """Each TMA slide's grid (``<slide>.tma.geojson``) from its tiled cores (``(sample_id, store)``)."""
    slides = tma_slides([store for _, store in items])
    return each_sample(
        [(slide, (slide, stores)) for slide, stores in slides.items()],
        "writing the TMA grid of",
        lambda job: {"path": write_tma_geojson(job[0], job[1], samples_dir), "stores": job[1]},
    )


def _tma_stage(state: RunState) -> None:
    """The TMA grids, from every tiled core (a core failing later is still on the slide); a grid that
    cannot be written is a warning of its input, not a failed sample."""
    tiled = [(sid, s["store"]) for sid, s in sorted(state.samples.items()) if "tiles" in s]
    by_store = {store: sid for sid, store in tiled}
    fut = tma_task.submit(tiled, str(state.samples_dir))
    reason = failure(fut)
    if reason is not None:
        get_run_logger().warning("TMA grids not written: %s", reason)
        return
    for item in fut.result():
        if "reason" in item:
            get_run_logger().warning("TMA grid of %s not written: %s", item["sample_id"], item["reason"])
            continue
        for store in item["result"]["stores"]:
            state.samples[by_store[store]]["tma_geojson"] = item["result"]["path"]


def _consistency_stage(
    state: RunState, spec: ConsistencySpec, cluster: ClusterSpec, device: str, progress: Progress
) -> None:
    """Score the samples :func:`~equislide.stages.consistency.budget_plan` picks (a whole slide's regions,
    or a TMA's cores spread over the array; about a quarter of the feature work) with the run's own
    network and K-means (cohort mode) or per-sample fits."""
    from equislide.storage import read_sample_meta

    described = []
    for sid, store in state.live():
        meta = read_sample_meta(store)
        described.append(
            (
                sid,
                state.samples[sid]["input"],
                int(meta["n_tiles"]),
                int(meta["tile_with_halo"]),
                meta.get("kind"),
            )
        )
    plan = budget_plan(described, spec)
    items = [(sid, store) for sid, store in state.live() if sid in plan]
    regions = {sid: plan[sid] for sid, _ in items}

    def done(sid: str, doc: dict[str, Any]) -> None:
        state.samples[sid]["consistency"] = figures(doc)
        state.timings[sid]["consistency_s"] = doc["seconds"]

    kmeans = state.kmeans if cluster.fit == "cohort" else None
    samples_dir = str(state.samples_dir)
    submitted = {
        consistency_task.submit(
            group,
            samples_dir,
            state.backbone,
            spec,
            cluster,
            kmeans,
            device,
            label_of(group),
            regions=regions,
            budget=state.budgets.consistency,
        ): group
        for group in groups(items, state.workers)
    }
    collect("consistency", submitted, done, state.fail, progress=progress)


def _features_stage(state: RunState, spec: FeatureSpec, cluster: ClusterSpec, progress: Progress) -> None:
    """Features in work units (:func:`~equislide.flows._common.plan_units`): a large sample's
    shard-aligned tile ranges spread over several tasks, small samples grouped; the largest units are
    submitted first, so a cohort of mixed sizes ends close to total work / workers. The share that
    finishes a sample's last range publishes it (no barrier over the cohort). GPU-annotated only where
    workers advertise a GPU: CPU clusters never hang."""
    gpu = gpu_workers() > 0  # asked again, not from the start: GPU workers may have joined since
    draws = str(state.models_dir / DRAWS_DIR) if cluster.fit == "cohort" else None
    live = state.live()
    sizes = _tile_counts(live)
    units = plan_units(
        [((sid, store), sizes[sid]) for sid, store in live],
        state.workers,
        pieces=_ranges_of,
    )
    shares: dict[str, list[dict[str, Any]]] = {}
    workers = state.stage_figures.setdefault("features", {}).setdefault("workers", {})

    def done(sid: str, res: dict[str, Any]) -> None:
        shares.setdefault(sid, []).append(res)
        got = shares[sid]
        written = any(r["status"] == "written" for r in got)
        state.samples[sid]["features"] = "written" if written else "skipped"
        # features_s: the sum of the sample's ranges' seconds, whichever tasks ran them.
        state.timings[sid]["features_s"] = round(sum(r["seconds"] for r in got), 3)
        state.samples[sid]["features_workers"] = sorted({r.get("worker") or "" for r in got} - {""})
        state.samples[sid]["features_tiles"] = sum(int(r.get("tiles_done", 0)) for r in got)
        if res.get("tiles_done"):  # a share that only found its ranges done ran no forward pass
            w = workers.setdefault(res.get("worker") or "local", {"tiles": 0, "seconds": 0.0})
            w["tiles"] += int(res["tiles_done"])
            w["seconds"] = round(w["seconds"] + float(res["seconds"]), 3)
            w["tiles_per_s"] = tiles_per_s(w["tiles"], w["seconds"])

    # Samples spread over several units: their pictures are drawn beside their features (CPU work,
    # so not GPU-annotated), submitted first so a wide cluster runs them while the units run.
    split = sorted({(sid, store) for unit in units for (sid, store), ranges in unit if ranges is not None})
    pictures = {sid: pictures_task.submit(sid, store, state.budgets.segment) for sid, store in split}
    with dask.annotate(resources={"GPU": 1}) if gpu else contextlib.nullcontext():
        submitted, weights = {}, {}
        for unit in units:
            items = [(sid, (store, ranges)) for (sid, store), ranges in unit]
            fut = features_task.submit(
                items, state.backbone, spec, draws, cluster, unit_label(unit), state.budgets.features
            )
            submitted[fut] = [(sid, store) for (sid, store), _ in unit]
            weights[fut] = sum(
                sizes[sid] if ranges is None else sum(b - a for a, b in ranges) for (sid, _), ranges in unit
            )
    collect("features", submitted, done, state.fail, progress=progress, weights=weights)
    for sid, got in shares.items():
        if sid not in state.errors and not any(r.get("published") for r in got):
            # Every share reports whether it found the sample complete; the last one always does.
            state.fail(sid, "features: every range ran but none of its tasks published the sample")
    for sid, fut in pictures.items():
        reason = failure(fut)
        if reason is not None:  # the publishing unit draws it then
            get_run_logger().warning(
                "pictures of %s not kept ahead (the segment stage draws them): %s", sid, reason
            )


def _tile_counts(live: list[tuple[str, str]]) -> dict[str, int]:
    """Tiles of each live sample's store, for planning work units; 0 where the store cannot be read."""
    from equislide.storage import read_sample_meta

    sizes = {}
    for sid, store in live:
        try:
            sizes[sid] = int(read_sample_meta(store)["n_tiles"])
        except Exception:  # noqa: BLE001 - an unreadable store fails in its task, with its reason
            sizes[sid] = 0
    return sizes


def _ranges_of(item: tuple[str, str]) -> list[tuple[int, int]]:
    """A large sample's tile ranges; none (not split) when its store cannot say: its task fails it."""
    try:
        return feature_ranges(item[1])
    except Exception:  # noqa: BLE001 - the sample's own task names the reason
        return []


def _kmeans_stage(state: RunState, layer: int, cluster: ClusterSpec) -> None:
    live = state.live()
    if cluster.fit == "cohort" and live:
        fit, left_out = split_native([store for _, store in live], fit_native=cluster.fit_native)
        for sid, store in live:
            if store in left_out:
                note = "tiled at native pixels: left out of the cohort K-means fit (--fit-native pools it)"
                if fit:
                    state.records[state.samples[sid]["input"]].setdefault("warnings", []).append(note)
                else:
                    state.fail(
                        sid, f"{note}; no sample with a resolution to fit on (or use --fit per-sample)"
                    )
        if fit:
            fut = kmeans_task.submit(fit, str(state.models_dir), layer, cluster)
            state.kmeans = barrier(state, "kmeans", fut)


def _segment_stage(state: RunState, layer: int, cluster: ClusterSpec, progress: Progress) -> None:
    """Label maps and outputs in work units, as the features stage plans them: a large sample's tile
    ranges spread over several tasks (the share that finds every range done writes the outputs, a
    band of the map at a time), small samples grouped, the largest units first."""
    live = state.live()
    sizes = _tile_counts(live)
    units = plan_units([((sid, store), sizes[sid]) for sid, store in live], state.workers, pieces=_ranges_of)
    shares: dict[str, list[dict[str, Any]]] = {}

    def done(sid: str, res: dict[str, Any]) -> None:
        shares.setdefault(sid, []).append(res)
        got = shares[sid]
        published = [r for r in got if "outputs" in r]
        if published:
            written = any(r["status"] == "written" for r in got)
            keep = {k: v for k, v in published[0].items() if k not in ("ranges", "published", "tiles_done")}
            state.samples[sid]["segment"] = {**keep, "status": "written" if written else "skipped"}
        # segment_s: the sum of the sample's shares' seconds, whichever tasks ran them.
        state.timings[sid]["segment_s"] = round(sum(r["seconds"] for r in got), 3)
        state.samples[sid]["segment_workers"] = sorted({r.get("worker") or "" for r in got} - {""})

    samples_dir = str(state.samples_dir)
    submitted, weights = {}, {}
    for unit in units:
        items = [(sid, (store, ranges)) for (sid, store), ranges in unit]
        fut = segment_task.submit(
            items, samples_dir, layer, cluster, state.kmeans, unit_label(unit), state.budgets.segment
        )
        submitted[fut] = [(sid, store) for (sid, store), _ in unit]
        weights[fut] = sum(
            sizes[sid] if ranges is None else sum(b - a for a, b in ranges) for (sid, _), ranges in unit
        )
    collect("segment", submitted, done, state.fail, progress=progress, weights=weights)
    for sid in shares:
        if sid not in state.errors and "segment" not in state.samples[sid]:
            # The share that finds the last range done writes the outputs; one always does.
            state.fail(sid, "segment: every range ran but none of its tasks wrote the outputs")


@flow(
    name="equislide-cohort",
    persist_result=False,
    log_prints=False,
    task_runner=deployment_runner(),
    **LOCK_HOOKS,
)
def cohort_flow(
    inputs: list[str] | None,
    out: str,
    *,
    manifest_csv: str | None = None,
    settle_seconds: float = SETTLE_SECONDS,
    backbone: str = FeatureSpec.backbone,
    weights: str | None = None,
    layer: int = FeatureSpec.layer,
    clusters: int = ClusterSpec.k,
    fit: str = ClusterSpec.fit,
    kmeans: str = ClusterSpec.backend,
    per_sample: int = ClusterSpec.per_sample,
    cohort_vectors: int = ClusterSpec.cohort_vectors,
    mpp: float = TilingSpec.mpp,
    tile: int = TilingSpec.tile,
    halo: int = TilingSpec.halo,
    input_mpp: float | None = None,
    force_mpp: float | None = None,
    native_pixels: bool = TilingSpec.native_pixels,
    fit_native: bool = ClusterSpec.fit_native,
    max_tiles: int = TilingSpec.max_tiles,
    tma: str = TilingSpec.tma,
    seed: int = 0,
    model_kwargs: dict[str, Any] | None = None,
    calibration_tiles: int = FeatureSpec.calibration_tiles,
    device: str = FeatureSpec.device,
    precision: str = FeatureSpec.precision,
    consistency: bool = False,
    angles: int | None = None,
    regions: int = SERVICE_SPEC.regions,
    budgets: dict[str, float] | None = None,
    command: list[str] | None = None,
) -> dict[str, Any]:
    """Segment a cohort of slides; returns the run report (also written to ``OUT/run.json``).

    The parameters are flat (Prefect shows and deploys them as they are); the flow turns them into
    :class:`~equislide.specs.TilingSpec`, :class:`~equislide.specs.FeatureSpec` and
    :class:`~equislide.specs.ClusterSpec`, whose defaults these are.

    Args:
        inputs: Slide or image files, globs (``/data/inbox/**/*.svs``) or folders
            (:func:`~equislide.stages.inputs.resolve_inputs`).
        out: Run folder: ``tiles/``, ``models/``, ``samples/`` and ``run.json``.
        manifest_csv: A CSV of inputs: ``path`` (relative to the CSV), optional ``mpp`` (fills in
            missing metadata, as ``input_mpp``) and ``sample_id``; a bad row fails alone, in one line.
        settle_seconds: Files found by a glob, folder or manifest that were modified this recently, or
            change over this long, are left for the next run (as are ``.part``/``.tmp`` names);
            ``run.json`` counts them (``parameters.input_selection``).
        backbone: ``srenet18``, ``resnet18`` or ``e2cnn_resnet18``.
        weights: A checkpoint; None = the backbone's packaged default weights where the package
            makes some the default, else (and with ``"random"``) seeded random weights, BatchNorm
            recalibrated on the cohort.
        layer: Feature stage 1-4.
        clusters: K-means k.
        fit: ``"cohort"`` (one model for all samples) or ``"per-sample"`` (the paper's protocol).
        kmeans: K-means backend: ``auto``, ``cuml``, ``torch`` or ``sklearn``.
        per_sample: Tissue vectors drawn per sample for the fit.
        cohort_vectors: Most vectors of a cohort fit (:class:`~equislide.specs.ClusterSpec`).
        mpp, tile, halo, input_mpp, force_mpp, native_pixels, max_tiles, tma: Tiling
            (:class:`~equislide.specs.TilingSpec`).
        fit_native: Pool native-pixel samples into the cohort fit (:class:`~equislide.specs.ClusterSpec`).
        seed: Seeds the random weights, the vector draws and K-means.
        model_kwargs: Builder arguments for random weights (e.g. ``{"width": 16}``).
        calibration_tiles: Tiles BatchNorm is recalibrated on (random weights).
        device: Feature device on the workers (``auto``: CUDA when the worker has one).
        precision: Forward precision of the features: ``auto`` (bf16 where the backbone stage's
            device computes it in hardware, else fp32), ``fp32``, ``bf16`` or ``fp16`` (GPU only).
            The resolved one is in ``run.json`` (``parameters.precision``) and keys the features.
        consistency: Also score rotation consistency (:mod:`equislide.stages.consistency`) of up to
            ``regions`` samples or regions per input: ``<sample>.consistency.json``, figures in
            ``run.json`` and the Prefect table.
        angles: Rotation steps around the circle (``12``: every 30 degrees); None = 0 and 30 degrees.
        regions: Regions per whole slide, cores per TMA slide scored for consistency.
        budgets: Seconds one stage call may take per input or sample, by stage (``plan``, ``tile``,
            ``features``, ``segment``, ``consistency``; ``0`` = none), over
            :class:`~equislide.stages.budget.BudgetSpec`'s defaults and ``$EQUISLIDE_BUDGET``. An input
            that overruns is killed and fails alone.
        command: The command line, for the report.
    """
    tiling = TilingSpec(
        mpp=mpp,
        tile=tile,
        halo=halo,
        input_mpp=input_mpp,
        force_mpp=force_mpp,
        native_pixels=native_pixels,
        max_tiles=max_tiles,
        tma=tma,
    )
    features = FeatureSpec(
        backbone=backbone,
        layer=layer,
        weights=weights,
        seed=seed,
        model_kwargs=model_kwargs or {},
        calibration_tiles=calibration_tiles,
        device=device,
        precision=precision,
    )
    cluster = ClusterSpec(
        k=clusters,
        fit=fit,
        backend=kmeans,
        per_sample=per_sample,
        cohort_vectors=cohort_vectors,
        seed=seed,
        fit_native=fit_native,
    )
    rotations = dataclasses.replace(
        SERVICE_SPEC if angles is None else ConsistencySpec.steps(angles, region=SERVICE_SPEC.region),
        regions=regions,
        seed=seed,
    )
    logger = get_run_logger()
    t_start = time.perf_counter()
    resolved = resolve_stage(inputs, manifest_csv, settle_seconds, force_mpp=force_mpp)
    state = start_run(resolved, out)
    state.budgets = dataclasses.replace(BudgetSpec.from_env(), **(budgets or {}))
    monitor = Monitor(
        stage_weights(random_weights=weights is None, consistency=consistency),
        key="equislide-progress",
        description="work done, stages weighted by their measured cost",
    )
    thumbs: dict[str, str] = {}

    def part(stage: str) -> Progress:
        return functools.partial(monitor.advance, stage)

    with timed(state, "tile"):
        tile_stage(state, tiling, part("tile"))
    logger.info(
        "tiled %d inputs into %d samples (%d inputs failed, %d samples failed)",
        len(state.ids),
        len(state.samples),
        failed_inputs(state),
        len(state.errors),
    )
    _publish(monitor, state, "tile", thumbs)
    with timed(state, "backbone"):
        backbone_stage(state, features)
    _publish(monitor, state, "backbone", thumbs)
    with timed(state, "features"):
        _features_stage(state, features, cluster, part("features"))
    _publish(monitor, state, "features", thumbs)
    with timed(state, "kmeans"):
        _kmeans_stage(state, layer, cluster)
    _publish(monitor, state, "kmeans", thumbs)
    with timed(state, "segment"):
        _segment_stage(state, layer, cluster, part("segment"))
        _tma_stage(state)
    _publish(monitor, state, "segment", thumbs)
    if consistency and state.backbone is not None:
        with timed(state, "consistency"):
            _consistency_stage(state, rotations, cluster, device, part("consistency"))
        _publish(monitor, state, "consistency", thumbs)

    manifest = _manifest(state, tiling, features, cluster, command)
    manifest.parameters["input_selection"] = resolved.describe()
    if consistency:
        manifest.parameters["consistency"] = {
            "angles": list(rotations.angles),
            "regions": rotations.regions,
            "region": rotations.region,
        }
    manifest.timings["total_s"] = round(time.perf_counter() - t_start, 3)
    report_path = report_task.submit(str(state.root), manifest.to_dict()).result()
    report = manifest.to_dict()
    report["path"] = report_path
    _publish(monitor, state, "report", thumbs, report)
    monitor.finish()
    # One line here: the CLI prints the whole summary, and a deployed run has it as an artifact.
    logger.info("%s; summary in artifact equislide-summary", summary_text(report).splitlines()[0])
    failed = sum(1 for i in report["inputs"] if i["status"] == "failed")
    return outcome(report, failed, len(report["inputs"]))


def _manifest(
    state: RunState,
    tiling: TilingSpec,
    features: FeatureSpec,
    cluster: ClusterSpec,
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
            "weights_note": weights_note(state.backbone, features.weights),
            # "packaged" (the package's default weights), "random" or "file" (--weights FILE).
            "weights_source": None if state.backbone is None else state.backbone.source(),
            "layer": features.layer,
            "clusters": cluster.k,
            "fit": cluster.fit,
            "kmeans": cluster.backend,
            "per_sample": cluster.per_sample,
            "cohort_vectors": cluster.cohort_vectors,
            "fit_native": cluster.fit_native,
            "seed": features.seed,
            "model_kwargs": dict(features.model_kwargs),
            "calibration_tiles": features.calibration_tiles,
            # As resolved by the backbone stage (what the features ran at); the asked one beside it.
            "precision": None if state.backbone is None else state.backbone.precision,
            "precision_requested": features.precision,
            **dataclasses.asdict(tiling),
            "backbone_checkpoint": None if state.backbone is None else state.backbone.to_dict(),
            "kmeans_model": None if state.kmeans is None else state.kmeans.to_dict(),
            "budgets_s": state.budgets.to_dict(),
            "input_records": [records[p] for p in state.paths],
        },
        inputs=[
            {"path": path_text(p), "sha256": records[p].get("sha256"), "status": records[p]["status"]}
            | ({"reason": records[p]["reason"]} if records[p]["status"] == "failed" else {})
            for p in state.paths
        ],
        command=list(command or []),
        device={**state.cluster, "feature_device": features.device},
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
            outputs=seg_res.get("outputs", {})
            | {"tiles": sample["store"]}
            | ({"tma_geojson": sample["tma_geojson"]} if "tma_geojson" in sample else {})
            | ({"consistency": sample["consistency"]["path"]} if "consistency" in sample else {}),
            consistency=sample.get("consistency"),
        )
    for p in state.paths:  # inputs that gave no sample at all
        if records[p]["status"] == "failed" and not records[p].get("samples"):
            manifest.set_sample(
                records[p]["sample_id"] or path_text(Path(p).name), "failed", error=records[p]["reason"]
            )
    manifest.timings = {k: round(v, 3) for k, v in state.stage_s.items()}
    manifest.stages = {k: v for k, v in state.stage_figures.items() if any(v.values())}
    return manifest


def _figure(consistency: dict[str, Any] | None) -> str:
    """A sample's consistency in a few characters: off-90 kappa, else kappa at multiples of 90."""
    c = consistency or {}
    if c.get("kappa_off90") is not None:
        return f"  (off-90 kappa {c['kappa_off90']:.3f})"
    if c.get("kappa_90") is not None:
        return f"  (kappa at 90° {c['kappa_90']:.3f})"
    return ""


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
    scored = [s["consistency"] for s in samples.values() if s.get("consistency")]
    if scored:
        angles = report["parameters"].get("consistency", {}).get("angles", [])
        shown = ", ".join(f"{a:g}" for a in angles)
        parts = []
        named = (("kappa_off90", "off-90 kappa"), ("dice_off90", "Dice"), ("kappa_90", "kappa at 90°"))
        for key, what in named:
            vals = [c[key] for c in scored if c.get(key) is not None]
            if vals:
                parts.append(f"{what} {sum(vals) / len(vals):.3f}")
        lines.append(f"  rotation consistency ({len(scored)} samples, angles {shown}): {', '.join(parts)}")
    for sid, s in samples.items():
        if s["status"] != "failed" and s["outputs"].get("overlay_png"):
            lines.append(f"  {sid}: {s['outputs']['overlay_png']}{_figure(s.get('consistency'))}")
    for i in failed_inputs:
        lines.append(f"  FAILED {i['path']}: {i['reason']}")
    return "\n".join(lines)


#: Where each sample stands, by the key its stage leaves in ``RunState.samples``, in stage order.
_REACHED = (
    ("tile", "tiles"),
    ("features", "features"),
    ("segment", "segment"),
    ("consistency", "consistency"),
)


def _relative(path: str | None, root: Path) -> str:
    if not path:
        return ""
    with contextlib.suppress(ValueError):
        return str(Path(path).relative_to(root))
    return path_text(path)


def _cluster_counts(segment: dict[str, Any]) -> str:
    """Label map pixels per cluster, ``"1:5120 2:880"`` (0, no tissue, left out)."""
    counts = segment.get("label_counts") or {}
    return " ".join(f"{k}:{v}" for k, v in sorted(counts.items(), key=lambda kv: int(kv[0])) if k != "0")


def sample_rows(state: RunState, report: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """The per-sample table: status, stage reached, seconds, output paths, cluster counts, consistency.

    While the run goes (no ``report``) a sample still going is ``running`` at the last stage it
    finished; a failed one names the stage it failed in. With the ``report``: ``done``, ``skipped``
    (reused from an earlier run) or ``failed``. Inputs that gave no sample are a row each too.
    """
    rows = []
    for sid in sorted(state.samples):
        sample = state.samples[sid]
        t = state.timings.get(sid, {})
        seg = sample.get("segment") or {}
        outputs = seg.get("outputs") or {}
        c = sample.get("consistency") or {}
        reached = [name for name, key in _REACHED if key in sample]
        if sid in state.errors:
            status, stage = "failed", state.errors[sid].split(":", 1)[0]
        else:
            status = report["samples"][sid]["status"] if report else "running"
            stage = reached[-1] if reached else "plan"
        rows.append(
            {
                "sample": sid,
                "status": status,
                "stage": stage,
                "seconds": round(sum(t.values()), 2),
                "tile_s": t.get("tile_s"),
                "features_s": t.get("features_s"),
                "tiles_per_s": tiles_per_s(sample.get("features_tiles", 0), t.get("features_s") or 0.0),
                "segment_s": t.get("segment_s"),
                "consistency_s": t.get("consistency_s"),
                "clusters": _cluster_counts(seg),
                "overlay": _relative(outputs.get("overlay_png"), state.root),
                "ome_zarr": _relative(outputs.get("ome_zarr"), state.root),
                "geojson": _relative(outputs.get("geojson"), state.root),
                "kappa_off90": c.get("kappa_off90"),
                "dice_off90": c.get("dice_off90"),
                "kappa_90": c.get("kappa_90"),
                "error": state.errors.get(sid, ""),
            }
        )
    for p in state.paths:  # inputs that gave no sample at all (unreadable, refused, over budget)
        rec = state.records.get(p) or {}
        if rec.get("status") == "failed" and not rec.get("samples"):
            name = rec.get("sample_id") or path_text(Path(p).name)
            rows.append(
                {"sample": name, "status": "failed", "stage": "plan", "error": rec.get("reason") or ""}
            )
    return rows


def failed_inputs(state: RunState) -> int:
    """Inputs failed so far: refused at planning, or with a sample that failed since."""
    bad = {p for p, rec in state.records.items() if rec.get("status") == "failed"}
    bad.update(state.samples[sid]["input"] for sid in state.errors if sid in state.samples)
    return len(bad)


def _thumbnail_cell(sid: str, png: str, thumbs: dict[str, str]) -> str:
    """A sample's overlay as a small JPEG data URI: the UI is served to browsers that cannot read the
    run folder, so a file path would show a broken image."""
    if png not in thumbs and len(thumbs) >= _MAX_THUMBNAILS:
        return f"`{path_text(png)}`"
    try:
        if png not in thumbs:
            thumbs[png] = thumbnail_data_uri(png)
        return f"![{sid}]({thumbs[png]})"
    except OSError as err:  # the overlay went missing: say so, the run itself is fine
        return f"`{path_text(png)}` (unreadable: {one_line(err)})"


def _summary_markdown(state: RunState, head: str, thumbs: dict[str, str], report: dict | None) -> str:
    md = ["# equislide cohort run", "", "```", head, "```", "", "| sample | status | stage | overlay |"]
    md.append("|---|---|---|---|")
    for row in sample_rows(state, report):
        seg = (state.samples.get(row["sample"]) or {}).get("segment") or {}
        png = (seg.get("outputs") or {}).get("overlay_png")
        cell = _thumbnail_cell(row["sample"], png, thumbs) if png else row.get("error", "")
        md.append(f"| {row['sample']} | {row['status']} | {row['stage']} | {cell.replace('|', '/')} |")
    return "\n".join(md)


def _publish(
    monitor: Monitor,
    state: RunState,
    stage: str,
    thumbs: dict[str, str],
    report: dict[str, Any] | None = None,
) -> None:
    """After a stage: the bar at its share, the table and the summary as they stand, failures logged."""
    monitor.advance(stage, 1.0)
    n_failed = failed_inputs(state)
    live = len(state.live())
    line = (
        f"after {stage}: {n_failed} of {len(state.paths)} inputs failed, {len(state.errors)} of "
        f"{len(state.samples)} samples failed, {live} going, {monitor.shown:.0f}% done"
    )
    if report is None:
        get_run_logger().log(logging.WARNING if state.errors or n_failed else logging.INFO, line)
    head = summary_text(report) if report is not None else f"equislide segment: running; {line}"
    monitor.table(
        "equislide-samples", sample_rows(state, report), "per-sample status, stage, outputs, timings"
    )
    monitor.markdown("equislide-summary", _summary_markdown(state, head, thumbs, report), "run summary")


def run_cohort(inputs: list[str], out: str, **options: Any) -> dict[str, Any]:
    """Run :func:`cohort_flow` (``scheduler=``, ``workers=`` pick the cluster); returns the report.

    See :func:`~equislide.flows._common.run_flow` for the Prefect API the flow and its tasks use.
    """
    return run_flow(cohort_flow, inputs, out, **options)


if __name__ == "__main__":  # DaskTaskRunner's worker processes re-import the main module
    import sys

    print(summary_text(run_cohort(sys.argv[2:], sys.argv[1])))
