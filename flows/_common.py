"""What every equislide flow shares: task options, group tasks, run state, the tile and backbone stages.

Per-sample stages run in contiguous groups of samples, about two tasks per worker (:func:`groups`):
each Prefect task run costs API calls and state changes, while a group's samples still succeed or
fail one by one (:func:`each_sample`). I/O errors and lost workers are retried (:func:`transient`),
a bad slide or parameter never. Prefect's result cache is off (:data:`TASK_OPTIONS`): every stage
resumes from its own done-markers, and arrays are never pickled into Prefect's result storage.
"""

from __future__ import annotations

import bisect
import contextlib
import dataclasses
import errno
import functools
import itertools
import logging
import math
import os
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.futures import as_completed
from prefect_dask import DaskTaskRunner

from equislide.flows.cluster import (
    SCHEDULER_ENV,
    all_cores,
    api_reachable_from,
    cluster_description,
    make_task_runner,
    shared_prefect_api,
    worker_environment,
    worker_warnings,
)
from equislide.specs import (
    RANDOM_WEIGHTS,
    BackboneRef,
    ClusterSpec,
    FeatureSpec,
    KMeansRef,
    TilingSpec,
)
from equislide.stages.backbone import calibrated_backbone, packaged_default
from equislide.stages.budget import BudgetSpec, run_each_within, run_within
from equislide.stages.consistency import (
    ConsistencySpec,
    sample_consistency,
)
from equislide.stages.inputs import (
    SETTLE_SECONDS,
    InputsError,
    ResolvedInputs,
    assign_sample_ids,
    duplicate_inputs,
    failed_record,
    path_text,
    reason_of,
    resolve_inputs,
)
from equislide.stages.tile import SampleResult, SlidePlan, plan_slide, sample_ranges, write_share
from equislide.storage import (
    acquire_output_lock,
    clean_partials,
    release_output_lock,
    sample_store_path,
    write_manifest,
)
from equislide.storage.confine import check_output_tree
from equislide.text import pack_path, unpack_path
from equislide.tiling import SamplePlan, SlideError

__all__ = [
    "LOCK_HOOKS",
    "PARTIAL_STATE_NAME",
    "PLAN_WORKERS_ENV",
    "TASK_OPTIONS",
    "RunState",
    "backbone_stage",
    "backbone_run_name",
    "backbone_task",
    "packaged_for",
    "barrier",
    "collect",
    "consistency_task",
    "deployment_runner",
    "each_sample",
    "failure",
    "groups",
    "label_of",
    "plan_units",
    "plan_workers",
    "unit_label",
    "worker_address",
    "notify",
    "failed_message",
    "outcome",
    "result_of",
    "plan_task",
    "release_lock",
    "report_run_name",
    "report_task",
    "resolve_stage",
    "run_flow",
    "set_progress_callback",
    "start_run",
    "tile_stage",
    "tile_task",
    "timed",
    "transient",
    "weights_note",
]

#: ``callback(stage, done, total)``: called in the flow's process as stages progress (the CLI's bar).
ProgressCallback = Callable[[str, int, int], None]
_PROGRESS: list[ProgressCallback] = []


def set_progress_callback(callback: ProgressCallback | None) -> None:
    """Register (or clear, with None) the progress callback of flows run in this process."""
    _PROGRESS.clear()
    if callback is not None:
        _PROGRESS.append(callback)


def notify(stage: str, done: int, total: int) -> None:
    for cb in _PROGRESS:
        cb(stage, done, total)


def transient(task_, task_run, state) -> bool:
    """Retry I/O hiccups and lost workers, never a bad slide or a bad parameter."""
    try:
        err = state.result(raise_on_failure=False)
    except Exception:  # the exception itself could not be read back: do not retry blindly
        return False
    return is_transient(err)


TASK_OPTIONS = {"cache_policy": NO_CACHE, "persist_result": False}


#: errno values of I/O hiccups worth a retry (network file systems, busy devices, lost connections).
_TRANSIENT_ERRNOS = frozenset(
    getattr(errno, name)
    for name in (
        "EIO",
        "EAGAIN",
        "EBUSY",
        "EINTR",
        "ETIMEDOUT",
        "ESTALE",
        "ECONNRESET",
        "ECONNREFUSED",
        "ECONNABORTED",
        "EHOSTUNREACH",
        "ENETUNREACH",
        "ENETDOWN",
        "ENOLCK",
        "EREMOTEIO",
    )
    if hasattr(errno, name)
)


def is_transient(err: BaseException) -> bool:
    """An I/O hiccup or a lost connection, not the file's own fault.

    A reader's ``OSError`` about the file itself (``EINVAL`` seeking in a bad header, PIL's plain
    ``OSError("Truncated File Read")`` without an errno, a symlink loop) would fail the same way on
    every retry, and Prefect prints a traceback when retries run out: such errors are not transient.
    """
    if isinstance(err, SlideError):
        return False
    if isinstance(err, TimeoutError):
        return True
    if not isinstance(err, OSError):
        return False
    if err.errno is None:
        return type(err) is not OSError  # subclasses without an errno: comms (distributed's CommClosedError)
    return err.errno in _TRANSIENT_ERRNOS


def budget_of(budget: float | None, stage: str) -> float:
    """A task's budget: the one the flow passed, else the worker's default (``$EQUISLIDE_BUDGET``)."""
    return float(getattr(BudgetSpec.from_env(), stage)) if budget is None else float(budget)


def each_sample(
    items: list[tuple[str, Any]], verb: str, fn: Callable[[Any], Any], *, budget: float = 0.0
) -> list[dict[str, Any]]:
    """``fn(x)`` for each ``(sample_id, x)`` of a group task; a sample's own error is its result.

    With a ``budget`` (seconds), the group's samples run in turn in one child process
    (:func:`~equislide.stages.budget.run_each_within`; ``fn`` must then pickle: a module-level function
    or a ``functools.partial`` of one), each against its own budget: the child's start and what it
    caches (the network) are paid once per group, and a sample that overruns or crashes fails alone
    while a fresh child takes the rest. A transient error (I/O, a lost worker) is raised instead, so
    Prefect retries the group; samples already finished are skipped on the retry (every stage
    resumes), so a retry redoes only what failed.
    """
    logger = get_run_logger()
    out = []
    answers = run_each_within(budget, [(f"{verb} {sid}", x) for sid, x in items], fn)
    t0 = time.perf_counter()
    try:
        for (sample_id, _), (ok, value) in zip(items, answers, strict=True):
            seconds, t0 = time.perf_counter() - t0, time.perf_counter()
            if not ok and is_transient(value):
                raise value
            if ok:
                out.append({"sample_id": sample_id, "result": value})
                logger.info("%s %s: %.2f s", verb, sample_id, seconds)
            else:
                out.append({"sample_id": sample_id, "reason": reason_of(value)})
                logger.info("%s %s failed after %.2f s: %s", verb, sample_id, seconds, out[-1]["reason"])
    finally:
        answers.close()  # stopped at a transient error: the child goes too
    return out


def groups(items: list[Any], workers: int) -> list[list[Any]]:
    """Contiguous groups, about two per worker: few enough that Prefect's per-task cost (API calls and
    state changes: ~0.13 s from submit to result for an empty task, measured) stays small beside the
    work, enough to balance the workers."""
    size = -(-len(items) // (2 * max(1, workers))) if items else 1
    return [items[i : i + size] for i in range(0, len(items), size)]


#: Units a stage aims at per worker (:func:`plan_units`): enough to balance, few task runs.
UNITS_PER_WORKER = 2
#: Extra range groups one sample holding the whole cohort's work is cut into (fewer for a smaller share):
#: enough for a work / critical path of ~16 on a large cluster, a bounded number of task runs.
SPLIT_UNITS = 16
#: A sample smaller than this is never split: a unit of fewer tiles costs more in task-run overhead
#: (~0.13 s Prefect, a budgeted child, opening the store) than it balances. Low, because a tile is
#: 512 px by default: a whole slide at 2.5 µm/px is tens of tiles and seconds of SRENet each.
MIN_SPLIT_TILES = 16


def plan_units(
    samples: Sequence[tuple[Any, int]],
    workers: int,
    *,
    pieces: Callable[[Any], Sequence[tuple[int, int]]] | None = None,
    per_worker: int = UNITS_PER_WORKER,
    split_units: int = SPLIT_UNITS,
    min_split: int = MIN_SPLIT_TILES,
) -> list[list[tuple[Any, list[tuple[int, int]] | None]]]:
    """Work units of a per-sample stage: large samples cut into range groups, small ones grouped.

    Args:
        samples: ``(item, size)`` per sample (size: its tiles), in the order small samples are grouped
            (contiguous runs: neighbouring cores share slide reads).
        workers: Workers of the cluster.
        pieces: ``pieces(item)``: the item's ranges ``[start, stop)`` a unit may hold (e.g. shard-aligned
            tile ranges); None: no sample is split.
        per_worker: Units aimed at per worker; the target unit size is ``total / (per_worker * workers)``.
        split_units: Range groups a sample holding all of the work gets at least
            (``ceil(split_units * size / total)`` for a smaller share).
        min_split: Samples below this size are never split.

    Returns:
        Units, longest (most tiles) first; each a list of ``(item, ranges)`` with ``ranges`` None for
        a whole sample. A sample is split when it is larger than the target and ``min_split``, into
        ``min(#pieces, max(ceil(size / target), ceil(split_units * size / total)))`` contiguous range
        groups of about equal size; the others are grouped as :func:`groups` does. So a stage makes at
        most about ``3 * per_worker * workers + split_units`` task runs, whatever the number of samples.
    """
    total = sum(max(0, int(size)) for _, size in samples)
    target = max(1.0, total / max(1, per_worker * max(1, workers)))
    units: list[tuple[int, list[tuple[Any, list[tuple[int, int]] | None]]]] = []
    small: list[tuple[Any, int]] = []
    for item, size in samples:
        ranges = list(pieces(item)) if pieces is not None and size > target and size >= min_split else []
        if len(ranges) < 2:
            small.append((item, size))
            continue
        k = min(len(ranges), max(math.ceil(size / target), math.ceil(split_units * size / max(total, 1))))
        ends = list(itertools.accumulate(b - a for a, b in ranges))
        # Cut where the running tile count reaches each k-th of the sample: groups of about equal size.
        cuts = [0, *(_nearest(ends, size * j / k) for j in range(1, k)), len(ranges)]
        for lo, hi in itertools.pairwise(cuts):
            if hi > lo:
                part = ranges[lo:hi]
                units.append((sum(b - a for a, b in part), [(item, part)]))
    chunk: list[tuple[Any, int]] = []
    for item, size in small:  # contiguous groups, each closed once it holds a unit's worth of tiles
        chunk.append((item, size))
        if sum(n for _, n in chunk) >= target:
            units.append((sum(n for _, n in chunk), [(it, None) for it, _ in chunk]))
            chunk = []
    if chunk:
        units.append((sum(n for _, n in chunk), [(it, None) for it, _ in chunk]))
    units.sort(key=lambda u: -u[0])  # stable: equal sizes keep their order
    return [unit for _, unit in units]


#: Plan work units for this many workers instead of those present when the run starts: a cluster
#: that scales up after the flow started, or a measure of how many workers one cohort could keep busy.
PLAN_WORKERS_ENV = "EQUISLIDE_PLAN_WORKERS"


def plan_workers(present: int) -> int:
    """Workers the stages plan their units for: ``$EQUISLIDE_PLAN_WORKERS`` when set, else ``present``.

    Raises:
        ValueError: The variable is not a positive integer (one line naming it).
    """
    raw = os.environ.get(PLAN_WORKERS_ENV, "").strip()
    if not raw:
        return max(1, int(present))
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if value < 1:
        raise ValueError(f"{PLAN_WORKERS_ENV}={raw!r}: must be a positive integer (workers to plan for)")
    return value


def tiles_per_s(tiles: int, seconds: float) -> float | None:
    """Tiles per second of extraction, or None when nothing was computed (all reused)."""
    return round(tiles / seconds, 3) if tiles and seconds > 0 else None


def worker_address() -> str:
    """The Dask worker running this task (its address), or ``"local"`` outside a worker."""
    from distributed import get_worker

    try:
        return str(get_worker().address)
    except ValueError:
        return "local"


def _nearest(ends: list[int], goal: float) -> int:
    """How many pieces (running sizes ``ends``) come closest to ``goal``: at least 1, at most all."""
    i = bisect.bisect_left(ends, goal)
    if i >= len(ends):
        return len(ends)
    return i if i > 0 and goal - ends[i - 1] <= ends[i] - goal else i + 1


def unit_label(unit: list[tuple[tuple[str, Any], list[tuple[int, int]] | None]]) -> str:
    """A unit's task run name part: :func:`label_of` of its samples, and the tiles of a sample's share."""
    (sid, _), ranges = unit[0]
    if ranges is not None:
        return f"{sid} tiles {ranges[0][0]}-{ranges[-1][1]}"
    return label_of([item for item, _ in unit])


def label_of(items: list[tuple[str, Any]]) -> str:
    """A task run's name part: its first sample ID, and the last and count when there are several."""
    sample_ids = [sid for sid, _ in items]
    return sample_ids[0] + (
        f" .. {sample_ids[-1]} ({len(sample_ids)} samples)" if len(sample_ids) > 1 else ""
    )


def _samples(n: int) -> str:
    return f"{n} sample" + ("" if n == 1 else "s")


# Task run names for tasks without a sample label: what the run did, not Prefect's ``kmeans-b29``.
# Module-level functions of the task's parameters (Prefect calls them on the worker, so they pickle).


def backbone_run_name(parameters: dict[str, Any]) -> str:
    spec, packaged = parameters["spec"], parameters.get("packaged")
    if packaged is not None:
        how = f"packaged weights {packaged.name}"
    elif spec.weights and spec.weights != RANDOM_WEIGHTS:
        how = f"weights {Path(spec.weights).name}"
    else:
        how = "random init, BatchNorm recalibrated"
    return f"backbone {spec.backbone} layer {spec.layer} ({how}, {_samples(len(parameters['stores']))})"


def report_run_name(parameters: dict[str, Any]) -> str:
    samples = parameters["manifest"].get("samples") or {}
    failed = sum(1 for s in samples.values() if s.get("status") == "failed")
    folder = Path(unpack_path(parameters["out"])).name
    return f"report {folder}/run.json ({_samples(len(samples))}, {failed} failed)"


@task(
    name="plan",
    task_run_name="plan {sample_id}",
    retries=2,
    retry_delay_seconds=[2, 10],
    retry_condition_fn=transient,
    **TASK_OPTIONS,
)
def plan_task(
    path: str, tiles_root: str, sample_id: str, spec: TilingSpec, budget: float | None = None
) -> SlidePlan:
    """Hash, mask and dearray one input; lay out its samples' tiles (killed past the plan budget)."""
    get_run_logger().info("planning %s as %s", path_text(path), sample_id)
    seconds = budget_of(budget, "plan")
    return run_within(
        seconds, f"planning {sample_id}", plan_slide, path, tiles_root, spec, sample_id=sample_id
    )


def _tile_pieces(sample: SamplePlan) -> list[tuple[int, int]]:
    """A sample's tile ranges a unit may hold: one shard each (the unit rule groups them)."""
    from equislide.storage import tile_shard_tiles

    return sample_ranges(sample, range_tiles=tile_shard_tiles(sample.grid.n_tiles))


@task(
    name="tile",
    task_run_name="tile {label}",
    retries=2,
    retry_delay_seconds=[2, 10],
    retry_condition_fn=transient,
    **TASK_OPTIONS,
)
def tile_task(
    samples: list[tuple[SamplePlan, list[tuple[int, int]] | None]],
    tiles_root: str,
    label: str,
    budget: float | None = None,
) -> list[dict[str, Any]]:
    """Read and store the tiles of a work unit of one input (:func:`plan_units`: whole samples, or
    some tile ranges of a large one, ``(sample, ranges | None)``), each sample on its own: a region
    that cannot be read fails its sample only (OpenSlide refuses every later read on a handle that
    hit an error, so each sample opens the slide afresh; a few ms for a pyramidal TIFF or SVS)."""
    get_run_logger().info("tile %s on worker %s", label, worker_address())
    return each_sample(
        [(s.sample_id, (s, ranges)) for s, ranges in samples],
        "tiling",
        functools.partial(write_share, out_root=tiles_root),
        budget=budget_of(budget, "tile"),
    )


@task(
    name="backbone",
    task_run_name=backbone_run_name,
    retries=1,
    retry_delay_seconds=5,
    retry_condition_fn=transient,
    **TASK_OPTIONS,
)
def backbone_task(stores: list[str], models_dir: str, spec: FeatureSpec, packaged: Any = None) -> BackboneRef:
    """The checkpoint every feature task loads (random weights: BatchNorm recalibrated on the cohort);
    ``packaged`` as :func:`~equislide.stages.backbone.packaged_default` gave it where the flow runs."""
    get_run_logger().info("preparing %s for %d samples", spec.backbone, len(stores))
    with all_cores():  # a barrier: every other worker waits for this task
        return calibrated_backbone(stores, models_dir, spec, packaged=packaged)


@task(name="report", task_run_name=report_run_name, retries=2, retry_delay_seconds=2, **TASK_OPTIONS)
def report_task(out: str, manifest: dict[str, Any]) -> str:
    """Write ``run.json`` atomically."""
    return str(write_manifest(out, manifest))


def failure(future) -> str | None:
    """None when the task succeeded, else the one-line reason it failed."""
    future.wait()
    state = future.state
    if not state.is_failed() and not state.is_crashed():
        return None
    err = future.result(raise_on_failure=False)
    return reason_of(err) if isinstance(err, BaseException) else f"task {state.name}: {state.message}"


def deployment_runner() -> DaskTaskRunner | None:
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
        cluster: The cluster's description (workers, GPUs, scheduler), for the report.
        budgets: Seconds a stage call may take per input or sample (:class:`BudgetSpec`).
        input_mpp: Per input, an mpp filling in missing metadata (a manifest's ``mpp`` column).
        stage_figures: Per stage, figures for ``run.json``'s ``stages`` (the feature stage's tiles
            and seconds per worker).
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
    cluster: dict[str, Any] = field(default_factory=dict)
    budgets: BudgetSpec = field(default_factory=BudgetSpec.from_env)
    input_mpp: dict[str, float] = field(default_factory=dict)
    stage_figures: dict[str, dict[str, Any]] = field(default_factory=dict)

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
def timed(state: RunState, name: str) -> Iterator[None]:
    t0 = time.perf_counter()
    try:
        yield
    finally:
        state.stage_s[f"{name}_s"] = time.perf_counter() - t0


def barrier(state: RunState, stage: str, future) -> Any | None:
    """The result of a one-task stage; every live sample fails with its reason when it failed."""
    reason = failure(future)
    if reason is None:
        return future.result()
    for sid, _ in state.live():
        state.fail(sid, f"{stage}: {reason}")
    return None


def backbone_stage(state: RunState, spec: FeatureSpec) -> None:
    live = state.live()
    if live:
        fut = backbone_task.submit(
            sorted(store for _, store in live), str(state.models_dir), spec, packaged_for(spec)
        )
        state.backbone = barrier(state, "backbone", fut)


def packaged_for(spec: FeatureSpec) -> Any:
    """The packaged default weights ``spec`` runs with, resolved here where the flow runs (None for
    random or given weights), so that every worker uses what the flow checked."""
    return None if spec.weights is not None else packaged_default(spec)


_FLOW_LOCKS: dict[str, Path] = {}  # flow run ID -> the folder whose lock it holds


def _lock_for_flow_run(root: Path) -> None:
    """Hold ``root``'s lock (:mod:`equislide.storage.lock`) until the flow run ends (:func:`release_lock`).

    Re-entrant in one process: under the CLI, which took it already, this only counts a hold; a
    deployed run (no CLI) takes it here.
    """
    from prefect.context import FlowRunContext

    ctx = FlowRunContext.get()
    run = getattr(ctx, "flow_run", None)
    acquire_output_lock(root, command=[f"prefect flow run {getattr(run, 'name', '?')}"])
    if run is not None:
        _FLOW_LOCKS[str(run.id)] = root


def release_lock(flow_, flow_run, state) -> None:
    """Flow hook (completion, failure, crash, cancellation): let go of the lock :func:`start_run` took."""
    root = _FLOW_LOCKS.pop(str(flow_run.id), None)
    if root is not None:
        release_output_lock(root)


#: Keyword arguments of ``@flow`` for flows that call :func:`start_run`.
LOCK_HOOKS = {
    "on_completion": [release_lock],
    "on_failure": [release_lock],
    "on_crashed": [release_lock],
    "on_cancellation": [release_lock],
}


#: Name of the final state of a flow run in which some inputs failed (type COMPLETED, see :func:`outcome`).
PARTIAL_STATE_NAME = "Completed with failures"


def failed_message(failed: int, total: int, what: str = "inputs") -> str:
    return f"{failed} of {total} {what} failed"


def outcome(result: Any, failed: int, total: int, what: str = "inputs") -> Any:
    """The flow's return value: ``result`` itself when nothing failed; a COMPLETED state named
    :data:`PARTIAL_STATE_NAME` with the message ``"N of M inputs failed"`` and ``result`` as its data
    when some failed; a FAILED state with that message when every one failed and no sample of the
    report (``result["samples"]``) is done or skipped.

    Some failed is not FAILED: a bad slide is the data's problem, handled as designed (the others
    finished, the CLI exits 1, ``run.json`` says why), and an operator's alerts on FAILED and CRASHED
    runs must keep meaning that nothing came out of the run (or the service broke: the flow raises).
    The state's name and message show in the Prefect UI's run list and run page without opening the
    logs, and the count is logged. :func:`run_flow` hands ``result`` back in every case.
    """
    if not failed:
        return result
    from prefect.states import Completed, Failed

    message = failed_message(failed, total, what)
    # An input counts as failed when any of its samples did (one bad core of a TMA slide); the run is
    # FAILED only when nothing came out of it.
    samples = result.get("samples", {}) if isinstance(result, dict) else {}
    produced = any(s.get("status") in ("done", "skipped") for s in samples.values())
    nothing = failed >= total and not produced
    get_run_logger().warning("%s; the flow run ends %s", message, "Failed" if nothing else PARTIAL_STATE_NAME)
    if nothing:
        return Failed(message=message, data=result)
    return Completed(message=message, name=PARTIAL_STATE_NAME, data=result)


def resolve_stage(
    inputs: list[str] | None,
    manifest_csv: str | None,
    settle_seconds: float = SETTLE_SECONDS,
    *,
    force_mpp: float | None = None,
) -> ResolvedInputs:
    """This run's files from files, globs, folders and a manifest
    (:func:`~equislide.stages.inputs.resolve_inputs`); logs how many were found and how many were left
    for the next run because they are still arriving.

    Raises:
        InputsError: The manifest cannot be read, or gives mpp beside a forced one (one line).
    """
    resolved = resolve_inputs(list(inputs or []), manifest=manifest_csv, settle_seconds=settle_seconds)
    if force_mpp is not None and resolved.input_mpp:
        raise InputsError(
            f"manifest {path_text(manifest_csv or '')}: its mpp column and force_mpp exclude each other "
            "(the manifest's mpp fills in missing metadata; force_mpp overrides every input's)"
        )
    logger = get_run_logger()
    for warning in resolved.warnings:
        logger.warning(warning)
    waiting = resolved.waiting
    logger.info(
        "%d inputs found, %d left for the next run (still arriving)%s",
        len(resolved.paths) + len(resolved.failed),
        len(waiting),
        (": " + ", ".join(path_text(p) for p in waiting[:5]) + (" ..." if len(waiting) > 5 else ""))
        if waiting
        else "",
    )
    return resolved


def start_run(inputs: list[str] | ResolvedInputs, out: str) -> RunState:
    """The run folder made and cleaned of a killed run's leftovers, every input's sample ID, and the
    cluster started (its first use: a local one starts here, timed as the ``cluster`` stage) and
    described; warnings about its workers are logged.

    ``inputs``: files, or :func:`~equislide.stages.inputs.resolve_inputs`' answer (manifest sample IDs
    and mpp per input; its bad manifest rows become failed inputs of the run).
    """
    resolved = inputs if isinstance(inputs, ResolvedInputs) else ResolvedInputs(paths=list(inputs))
    # Absolute: every worker (and its budget children) must name the same files, whatever its cwd.
    root = Path(os.path.abspath(unpack_path(str(out))))
    # Before anything below OUT is written or cleaned (a deployed run skips the CLI's check).
    check_output_tree(root)
    (root / "tiles").mkdir(parents=True, exist_ok=True)
    _lock_for_flow_run(root)
    clean_partials(root / "tiles")  # leftovers of a killed run; this run owns OUT
    paths = list(dict.fromkeys(unpack_path(str(p)) for p in resolved.paths))
    ids, records = assign_sample_ids(paths, resolved.sample_ids)
    records.update(resolved.failed)
    state = RunState(
        root=root, paths=paths + list(resolved.failed), ids=ids, records=records, input_mpp=resolved.input_mpp
    )
    with timed(state, "cluster"):
        state.cluster = cluster_description()
    state.workers = plan_workers(int(state.cluster.get("workers") or 1))
    logger = get_run_logger()
    if state.workers != max(1, int(state.cluster.get("workers") or 1)):
        logger.info("work units planned for %d workers (%s)", state.workers, PLAN_WORKERS_ENV)
    logger.info("%d inputs on %s -> %s", len(paths), state.cluster, path_text(root))
    for warning in worker_warnings():
        logger.warning(warning)
    for first, other in duplicate_inputs(paths):
        logger.warning("duplicate inputs: %s and %s hold the same bytes", path_text(first), path_text(other))
    return state


def run_flow(
    flow_: Any, inputs: list[str], out: str, *, scheduler: str | None = None, workers: int | None = None, **kw
) -> Any:
    """Run a flow on the task runner :func:`~equislide.flows.cluster.make_task_runner` picks.

    The flow and every task report to one Prefect API: ``PREFECT_API_URL`` when set, else one temporary
    local server started here (see :mod:`equislide.flows.cluster`).
    """
    with shared_prefect_api() as api_url:
        warning = api_reachable_from(scheduler or os.environ.get(SCHEDULER_ENV), api_url)
        if warning:
            logging.getLogger("equislide").warning(warning)
        runner = make_task_runner(scheduler=scheduler, workers=workers)
        with worker_environment():  # a local cluster starts inside the flow
            # Prefect encodes parameters as JSON, which refuses names that are not UTF-8: pack those.
            packed = [pack_path(p) for p in inputs]
            state = flow_.with_options(task_runner=runner)(packed, pack_path(out), return_state=True, **kw)
            return result_of(state)


def result_of(state: Any) -> Any:
    """A finished flow run's return value, also when :func:`outcome` made it FAILED (every input failed:
    the report is its data); a run that raised raises here."""
    if state.is_failed():
        data = state.result(raise_on_failure=False)
        if isinstance(data, dict):
            return data
    return state.result()


def collect(
    stage: str,
    submitted: dict[Any, list[tuple[str, Any]]],
    done: Callable[[str, dict[str, Any]], None],
    fail: Callable[[str, str], None],
    *,
    after: Callable[[int], None] | None = None,
    progress: Callable[[float], None] | None = None,
    weights: Mapping[Any, int] | None = None,
) -> None:
    """Wait for a stage's group tasks as they finish: each sample's result, or its reason to fail.

    ``after(n)`` and ``progress(fraction)`` are told as each group finishes (samples finished so far,
    and their fraction of the stage); ``weights`` (per future, e.g. its tiles) count instead of its
    samples where a sample is spread over several tasks."""
    size = (lambda fut: len(submitted[fut])) if weights is None else weights.__getitem__
    total = sum(size(fut) for fut in submitted)
    n = 0
    for fut in as_completed(list(submitted)):
        items = submitted[fut]
        reason = failure(fut)
        for item in [] if reason is not None else fut.result():
            if "reason" in item:
                fail(item["sample_id"], f"{stage}: {item['reason']}")
            else:
                done(item["sample_id"], item["result"])
        for sid, _ in items if reason is not None else []:
            fail(sid, f"{stage}: {reason}")
        n += size(fut)
        if after is not None:
            after(n)
        if progress is not None:
            progress(n / max(total, 1))
        notify(stage, n, total)


def tile_stage(state: RunState, spec: TilingSpec, progress: Callable[[float], None] | None = None) -> None:
    """Plan every input, then write its samples in groups (:func:`groups`) as the plans arrive.

    ``progress(fraction)``: half for the plans, half for the samples written (of those planned).

    Fills ``state.records`` (per input), ``samples``, ``errors`` (a sample that cannot be tiled fails
    alone) and ``timings``. Groups are contiguous runs of samples (neighbouring TMA cores share slide
    reads).
    """
    logger = get_run_logger()
    tiles_root = str(state.tiles_root)
    plans: dict[str, SlidePlan] = {}
    owner: dict[str, str] = {}  # sample ID -> input
    written: dict[str, list[SampleResult]] = {p: [] for p in state.ids}
    pending: dict[Any, list[tuple[str, SamplePlan]]] = {}
    weights: dict[Any, int] = {}
    shares: dict[str, list[dict[str, Any]]] = {}
    budgets = state.budgets
    plan_futures = {
        plan_task.submit(p, tiles_root, state.ids[p], _input_spec(state, p, spec), budgets.plan): p
        for p in state.ids
    }
    tell = progress or (lambda fraction: None)
    for n_planned, fut in enumerate(as_completed(list(plan_futures)), start=1):
        tell(0.5 * n_planned / max(len(plan_futures), 1))
        path = plan_futures[fut]
        reason = failure(fut)
        if reason is not None:
            err = fut.result(raise_on_failure=False)
            state.records[path] = failed_record(path, reason, type(err).__name__, sample_id=state.ids[path])
            logger.warning("FAILED %s: %s", path_text(path), reason)
            continue
        plan = plans[path] = fut.result()
        owner.update(dict.fromkeys(plan.sample_ids, path))
        # A whole slide's shard-aligned tile ranges spread over several tasks; a TMA's cores grouped.
        units = plan_units([(s, s.grid.n_tiles) for s in plan.todo], state.workers, pieces=_tile_pieces)
        for unit in units:
            items = [(s.sample_id, s) for s, _ in unit]
            label = unit_label([((s.sample_id, s), ranges) for s, ranges in unit])
            fut = tile_task.submit(unit, tiles_root, label, budgets.tile)
            pending[fut] = items
            weights[fut] = sum(s.grid.n_tiles if r is None else sum(b - a for a, b in r) for s, r in unit)

    def untiled(sid: str, reason: str) -> None:  # a store never finished: later stages skip the sample
        state.samples[sid] = {"store": str(sample_store_path(tiles_root, sid)), "input": owner[sid]}
        state.fail(sid, reason)

    def share_done(sid: str, share: dict[str, Any]) -> None:
        shares.setdefault(sid, []).append(share)

    collect(
        "tile",
        pending,
        share_done,
        untiled,
        progress=lambda fraction: tell(0.5 + 0.5 * fraction),
        weights=weights,
    )
    for sid, got in shares.items():
        if sid in state.errors:
            continue
        result = next((g["result"] for g in got if g["published"]), None)
        if result is None:
            untiled(sid, "tile: every range ran but none of its tasks published the sample")
            continue
        # tile_s: the sum of the sample's shares' seconds, whichever tasks ran them.
        result.seconds = sum(g["seconds"] for g in got if g["result"] is not result) + result.seconds
        if any(g["status"] == "written" for g in got):
            result.status = "written"
        written[owner[sid]].append(result)
    for path, plan in plans.items():
        results = plan.ordered(written[path])
        state.records[path] = {
            "path": path_text(path),
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


def _input_spec(state: RunState, path: str, spec: TilingSpec) -> TilingSpec:
    """The tiling of one input: a manifest's mpp fills in missing metadata as ``input_mpp`` does (a
    forced mpp still wins: the resolver refuses a manifest mpp beside one)."""
    mpp = state.input_mpp.get(path)
    if mpp is None or spec.force_mpp is not None:
        return spec
    return dataclasses.replace(spec, input_mpp=mpp)


def weights_note(backbone: BackboneRef | None, weights: str | None) -> str:
    """Which weights a run used, in words (run.json's ``weights_note``, the summary's backbone line)."""
    if backbone is not None and backbone.source() == "packaged":
        prov = backbone.provenance
        how = (
            "BatchNorm as trained"
            if "calibration" not in prov
            else f"BatchNorm recalibrated on {len(prov['calibration'])} of the cohort's tiles"
        )
        why = f"; {prov['why']}" if prov.get("why") else ""
        return f"packaged default weights {prov['name']} (sha256 {prov['sha256']}), {how}{why}"
    if weights and weights != RANDOM_WEIGHTS:
        return f"weights from {weights}"
    if backbone is None:
        return "no backbone was prepared"
    n = len(backbone.provenance["calibration"])
    return (
        f"no trained weights: {backbone.provenance['init']} with BatchNorm recalibrated on {n} of "
        f"the cohort's tiles ({backbone.path})"
    )


@task(
    name="consistency",
    task_run_name="consistency {label}",
    retries=1,
    retry_delay_seconds=5,
    retry_condition_fn=transient,
    **TASK_OPTIONS,
)
def consistency_task(
    items: list[tuple[str, str]],
    out_dir: str,
    backbone: BackboneRef,
    spec: ConsistencySpec,
    cluster: ClusterSpec,
    kmeans: KMeansRef | None,
    device: str,
    label: str,
    *,
    study: bool = False,
    annotations: str | None = None,
    regions: dict[str, int] | None = None,
    budget: float | None = None,
) -> list[dict[str, Any]]:
    """Rotation consistency of some samples (``(sample_id, store)``): ``<sample>.consistency.json``.

    ``study``: name the file by backbone and layer and save the rotated-back maps side by side (the
    study compares several networks in one folder); ``annotations``: a folder of label images;
    ``regions``: regions per sample ID, overriding ``spec.regions`` (the service's budget).
    """
    name = f".{backbone.backbone}-layer{backbone.layer}" if study else None
    one = functools.partial(
        sample_consistency,
        out_dir=out_dir,
        backbone=backbone,
        spec=spec,
        cluster=cluster,
        kmeans=kmeans,
        device=device,
        name=name,
        strip=study,
        annotations=annotations,
        regions=regions,
    )
    verb = f"consistency ({backbone.backbone}, layer {backbone.layer})"
    budget = budget_of(budget, "consistency")
    return each_sample([(sid, (sid, store)) for sid, store in items], verb, one, budget=budget)
