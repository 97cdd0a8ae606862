"""Whole-slide scale: one large slide's features over 1 and 2 workers, and the slide's work / critical path.

    python bench/wholeslide.py [--size 80000x60000 | --slide FILE] [--mpp 2.5] [--repeats 3]
                               [--workers 1,2] [--weights [FILE]] [--plan-workers N] [--out DIR]

The whole-slide phantom (``equislide phantom --whole-slide``, ``--size`` at 0.25 µm/px; or ``--slide``)
is tiled once (``segment``'s defaults: 2.5 µm/px, 512 px tiles, SRENet-18 layer 4); then:

1. The features stage of that one sample on a ``LocalCluster`` of each ``--workers`` count: its work
   units (``flows._common.plan_units``, shard-aligned tile ranges) submitted longest first, one Dask
   task each, on a fresh copy of the tiles every repeat; medians, and the speedup against 1 worker
   measured in the same run.
2. One whole cohort flow of the slide on the largest cluster, its Dask task stream recorded: work = the
   sum of its tasks' compute durations, critical path = the longest dependency chain of the slide
   (plan -> the longest tile unit -> backbone -> the longest features unit or the pictures task beside
   them -> kmeans -> segment -> report; for one slide the stages are barriers, so each stage's longest
   task is on it), told apart
   by the stage's task name in the Dask key; and tiles/s of each stage from ``run.json``. ``--weights``
   gives the flow a checkpoint (bare: the one this bench calibrated), the production path without the
   BatchNorm calibration barrier; ``--plan-workers N`` plans the flow's work units as for N workers
   (``$EQUISLIDE_PLAN_WORKERS``) while it runs on ``--workers``: work / critical path asks how many
   workers the slide alone could keep busy, which units planned for 2 workers cannot show.
3. The number of features task runs a 1000-sample cohort of mixed sizes makes (planned, not run).
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_HOME", tempfile.mkdtemp(prefix="equislide-bench-prefect-"))


def write_slide(path: Path, width: int, height: int, *, mpp: float = 0.25, seed: int = 0) -> Path:
    """The whole-slide phantom (``equislide phantom --whole-slide``): a pyramidal JPEG TIFF."""
    from equislide.tiling import write_whole_slide_phantom

    write_whole_slide_phantom(path, width=width, height=height, mpp=mpp, seed=seed)
    return path


def fresh_copy(store: Path, dst: Path) -> Path:
    """The tiled store without features (a fresh features stage)."""
    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(store, dst, ignore=shutil.ignore_patterns("features"))
    return dst


def features_stage(client, store: Path, backbone, spec, workers: int) -> tuple[float, list[float], int]:
    """Wall seconds of one sample's features stage on ``client``; each unit's seconds; the unit count."""
    from distributed import wait

    from equislide.flows._common import plan_units
    from equislide.stages.features import feature_ranges, publish_features, store_share_and_draw
    from equislide.storage import read_sample_meta

    n = int(read_sample_meta(store)["n_tiles"])
    t0 = time.perf_counter()
    units = plan_units([((store.stem, str(store)), n)], workers, pieces=lambda item: feature_ranges(item[1]))
    futures = [
        client.submit(store_share_and_draw, (str(store), ranges), backbone, spec, pure=False)
        for unit in units
        for (_, _), ranges in unit
    ]
    wait(futures)
    results = [f.result() for f in futures]
    publish_features(store, backbone)  # a no-op: the last unit published it
    wall = time.perf_counter() - t0
    assert any(r["published"] for r in results), "no unit published the sample"
    return wall, [r["seconds"] for r in results], len(units)


def cluster(workers: int):
    from distributed import LocalCluster

    from equislide.flows.cluster import PRELOAD, worker_environment

    with worker_environment():
        return LocalCluster(
            n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None, preload=[PRELOAD]
        )


def flow_task_stream(image: Path, out: Path, workers: int, options: dict) -> tuple[list[dict], int]:
    """Run the cohort flow of one slide; its Dask task stream (compute start/stop per task) and the
    number of features units it planned."""
    from distributed import Client, get_task_stream

    from equislide.flows.cohort import run_cohort

    with cluster(workers) as lc, Client(lc) as client:
        with get_task_stream(client) as ts:
            report = run_cohort([str(image)], str(out), scheduler=lc.scheduler_address, **options)
        data = list(ts.data)
    assert all(s["status"] == "done" for s in report["samples"].values()), report["samples"]
    spans = []
    for rec in data:
        for ss in rec.get("startstops", ()):
            if ss["action"] == "compute":
                worker, key = rec.get("worker"), str(rec["key"])
                spans.append({"start": ss["start"], "stop": ss["stop"], "worker": worker, "key": key})
    spans.sort(key=lambda s: s["start"])
    return spans, report


def task_runs_of_a_large_cohort(workers: int) -> tuple[int, int]:
    """Features task runs planned for 1000 samples (TMA cores to three whole slides); and samples."""
    from equislide.flows._common import plan_units

    rnd = random.Random(0)
    sizes = [rnd.choice([5, 20, 50, 200]) for _ in range(997)] + [20000, 8000, 3000]
    units = plan_units(
        [((f"s{i:04d}", n), n) for i, n in enumerate(sizes)],
        workers,
        pieces=lambda item: [(a, min(item[1], a + 32)) for a in range(0, item[1], 32)],
    )
    return len(units), len(sizes)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", default="80000x60000", help="phantom WxH at 0.25 µm/px (default 80000x60000)")
    ap.add_argument("--slide", type=Path, help="an existing slide instead of a new phantom")
    ap.add_argument("--mpp", type=float, default=2.5, help="analysis µm/px (default 2.5, segment's)")
    ap.add_argument("--tile", type=int, default=512)
    ap.add_argument("--halo", type=int, default=32)
    ap.add_argument("--layer", type=int, default=4)
    ap.add_argument("--width", type=int, default=64, help="network width (64: SRENet-18 itself)")
    ap.add_argument(
        "--repeats", type=int, default=3, help="features-stage repeats per worker count (0: skip)"
    )
    ap.add_argument("--workers", default="1,2")
    ap.add_argument("--no-flow", action="store_true", help="skip the work / critical path flow run")
    ap.add_argument(
        "--weights",
        nargs="?",
        const="calibrated",
        default=None,
        help="the flow's backbone checkpoint (bare: the one this bench calibrated; default: random "
        "weights, BatchNorm recalibrated in the flow)",
    )
    ap.add_argument("--plan-workers", type=int, default=None, help="plan the flow's work units for N workers")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()

    from distributed import Client

    from equislide import stages
    from equislide.specs import FeatureSpec

    root = args.out or Path(tempfile.mkdtemp(prefix="equislide-wholeslide-"))
    root.mkdir(parents=True, exist_ok=True)
    if args.slide is not None:
        image = args.slide
    else:
        width, height = (int(v) for v in args.size.lower().split("x"))
        t0 = time.perf_counter()
        image = write_slide(root / "wholeslide.tiff", width, height)
        print(f"phantom {width} x {height} px written in {time.perf_counter() - t0:.1f} s")
    t0 = time.perf_counter()
    [tiled] = stages.tile_slide(image, root / "tiles", mpp=args.mpp, tile=args.tile, halo=args.halo)
    print(
        f"slide {Path(image).name}, {tiled.n_tiles} tiles of {args.tile} px at {args.mpp} µm/px "
        f"(tiled in {time.perf_counter() - t0:.1f} s)"
    )
    spec = FeatureSpec(
        layer=args.layer, model_kwargs={"width": args.width}, calibration_tiles=8, device="cpu"
    )
    # Calibrated only when something uses it: a given checkpoint and no features repeats need none.
    need = args.repeats > 0 or args.weights == "calibrated"
    backbone = stages.calibrated_backbone([tiled.store], root / "models", spec) if need else None

    counts = [int(w) for w in args.workers.split(",")]
    walls: dict[int, list[float]] = {}
    for w in counts if args.repeats > 0 else []:
        with cluster(w) as lc, Client(lc) as client:
            walls[w] = []
            for r in range(args.repeats):
                store = fresh_copy(Path(tiled.store), root / f"w{w}" / "wholeslide.zarr")
                wall, unit_s, n_units = features_stage(client, store, backbone, spec, w)
                walls[w].append(wall)
                print(
                    f"  features, {w} worker(s), repeat {r + 1}: {wall:.1f} s wall, {n_units} units, "
                    f"work {sum(unit_s):.1f} s, longest unit {max(unit_s):.1f} s "
                    f"(work / longest {sum(unit_s) / max(max(unit_s), 1e-9):.1f})"
                )
    if walls:
        base = statistics.median(walls[counts[0]])
        print(f"\n| workers | features s (median of {args.repeats}) | speedup vs {counts[0]} |")
        print("|---|---|---|")
        for w in counts:
            med = statistics.median(walls[w])
            print(f"| {w} | {med:.1f} | {base / med:.2f}x |")

    if not args.no_flow:
        w = max(counts)
        options = {
            "mpp": args.mpp,
            "tile": args.tile,
            "halo": args.halo,
            "layer": args.layer,
            "model_kwargs": {"width": args.width},
            "clusters": 3,
        }
        if args.weights:
            options["weights"] = str(backbone.path) if args.weights == "calibrated" else args.weights
        if args.plan_workers:
            from equislide.flows._common import PLAN_WORKERS_ENV

            os.environ[PLAN_WORKERS_ENV] = str(args.plan_workers)  # read where the flow plans
        t0 = time.perf_counter()
        spans, report = flow_task_stream(image, root / "flow", w, options)
        print(
            f"flow run {time.perf_counter() - t0:.1f} s wall on {w} workers, planned for "
            f"{args.plan_workers or w}; weights {options.get('weights', 'random (calibrated in the flow)')}"
        )
        stages = ("plan", "tile", "backbone", "pictures", "features", "kmeans", "segment", "tma", "report")
        by_stage: dict[str, list[float]] = {k: [] for k in stages}
        for sp in spans:
            name = next((k for k in stages if f"{k}_task" in sp["key"]), None)
            if name is not None:
                by_stage[name].append(sp["stop"] - sp["start"])
        # The stages are barriers for one slide (plan -> its tile units -> backbone -> features units
        # -> kmeans -> segment -> report): the critical path holds each stage's longest task.
        chain = {k: max(v) for k, v in by_stage.items() if v}
        # The pictures task runs beside the features units (both after backbone, before kmeans).
        side = max(chain.pop("pictures", 0.0), chain.get("features", 0.0))
        if "features" in chain:
            chain["features"] = side
        work = sum(sum(v) for v in by_stage.values())
        t = report["timings"]
        print(
            f"\nflow on {w} workers: {len(spans)} tasks ("
            + ", ".join(f"{k} {len(v)}" for k, v in by_stage.items() if v)
            + "); stage s: "
            + ", ".join(f"{k} {v:.1f}" for k, v in t.items() if isinstance(v, (int, float)))
        )
        print(
            f"work {work:.1f} s, critical path {sum(chain.values()):.1f} s ("
            + ", ".join(f"{k} {v:.1f}" for k, v in chain.items())
            + ")"
        )
        for k in ("tile", "features", "segment"):
            top = sorted(by_stage[k], reverse=True)
            print(
                f"  {k} tasks s, longest first: "
                + ", ".join(f"{v:.1f}" for v in top[:6])
                + (" ..." if len(top) > 6 else "")
            )
        feats = by_stage["features"]
        print(
            f"work / critical path: {work / max(sum(chain.values()), 1e-9):.2f}  "
            f"(features alone: {sum(feats) / max(max(feats, default=0), 1e-9):.1f})"
        )
        if not any(by_stage.values()):
            print("flow: no task key names a stage (" + ", ".join(sp["key"] for sp in spans[:3]) + ")")
        n_tiles = tiled.n_tiles
        stage_s = {k: t.get(f"{k}_s") for k in ("tile", "features", "kmeans", "segment")}
        print(
            f"{n_tiles} tiles; tiles/s per stage: "
            + ", ".join(f"{k} {n_tiles / v:.2f}" for k, v in stage_s.items() if v)
        )
    for w in (2, 16, 64):
        runs, n = task_runs_of_a_large_cohort(w)
        print(f"features task runs for a {n}-sample cohort on {w} workers: {runs}")


if __name__ == "__main__":
    main()
