"""``equislide segment SLIDE... | --manifest FILE.csv --out DIR``: the cohort flow (tile, features,
K-means, outputs, report).

Runs :func:`equislide.flows.cohort.cohort_flow` on a Dask cluster (a local one sized to the machine, or
``--scheduler`` / ``EQUISLIDE_SCHEDULER``) under Prefect (the ephemeral local server, or the one
``PREFECT_API_URL`` names). Exit status 0 when every input succeeded, 1 when some failed (one line each
on stderr), 2 on a usage error.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from equislide.commands._common import (
    WEIGHTS_HELP,
    add_input_arguments,
    add_mpp_arguments,
    add_precision_argument,
    add_width_argument,
    check_mpp_arguments,
    check_precision,
)
from equislide.specs import BACKBONE_ALIASES, ClusterSpec, FeatureSpec, TilingSpec
from equislide.stages.budget import BudgetSpec
from equislide.text import printable

_TILING, _FEATURES, _CLUSTER = TilingSpec(), FeatureSpec(), ClusterSpec()
_PREFIX = "equislide segment"
SCHEDULER_ENV = "EQUISLIDE_SCHEDULER"


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``segment`` on the CLI's subparsers."""
    p = subparsers.add_parser(
        "segment",
        help="segment slides and TMA cores into tissue clusters (Prefect flow on Dask)",
        description=(
            "Tile every input, extract rotation-equivariant features on Dask workers, fit K-means "
            "(one model for the cohort, or one per sample), and write per sample an OME-Zarr (NGFF 0.5: "
            "the image at the analysis resolution as a pyramid, labels/clusters and labels/tissue on "
            "every level, placed on the slide), an overlay PNG of the whole slide with legend and scale "
            "bar and a QuPath GeoJSON (valid polygons, UUID ids), per TMA slide its grid as QuPath "
            "tmaCore objects (DIR/samples/<slide>.tma.geojson), plus DIR/run.json. "
            "Rerunning over the same DIR resumes. Runs report to the Prefect server PREFECT_API_URL "
            "names, else to one temporary local server (flow and workers alike); the run's state there "
            "is Completed, 'Completed with failures' ('N of M inputs failed') or Failed (every input "
            "failed), with progress, a per-sample table and a summary updated after every stage. "
            "Exit status 0 when "
            "every input succeeded, 1 when some failed or the run stopped on a fault (a lost cluster, a full "
            "disk: one line, recorded in DIR/run.json), 2 on a usage error or when another run holds DIR "
            "(DIR/.equislide.lock). --out, --weights, --seed and --clusters are checked before any work. "
            "Inputs may be globs, folders or a --manifest CSV: a scheduled run over an inbox takes the "
            "slides that arrived since the last one, skips finished ones, and leaves slides still being "
            "copied for the next run (DIR/run.json: parameters.input_selection)."
        ),
        epilog=(
            "Feature workers: EQUISLIDE_PREFETCH=0 reads each tile shard in line instead of on a "
            "background thread while the previous one runs forward (default on); EQUISLIDE_COMPILE=1 runs "
            "the backbone through torch.compile (falls back to eager with one warning; default off); "
            "EQUISLIDE_RING_KERNEL=0 takes SRE-Conv ring sums with torch instead of the C kernel that "
            "is built with cc on first use (default on; torch is used where it cannot build). On "
            "CUDA the forward batch is sized from free GPU memory (at most one feature shard) and the "
            "model runs channels_last."
        ),
    )
    add_input_arguments(p)
    p.add_argument("--out", required=True, metavar="DIR", help="run folder")
    p.add_argument("--weights", default=None, metavar="FILE|random", help=WEIGHTS_HELP)
    p.add_argument("--backbone", choices=sorted(BACKBONE_ALIASES), default="srenet", help="default srenet")
    p.add_argument(
        "--layer",
        type=int,
        choices=(1, 2, 3, 4),
        default=_FEATURES.layer,
        help=f"feature stage (default {_FEATURES.layer})",
    )
    p.add_argument("--clusters", type=int, default=_CLUSTER.k, help=f"K-means k (default {_CLUSTER.k})")
    p.add_argument(
        "--fit",
        choices=("cohort", "per-sample"),
        default=_CLUSTER.fit,
        help="one K-means for all samples (default), or one per sample on 2000 vectors (the paper)",
    )
    p.add_argument("--kmeans", choices=("auto", "cuml", "torch", "sklearn"), default=_CLUSTER.backend)
    p.add_argument(
        "--cohort-vectors",
        type=int,
        default=_CLUSTER.cohort_vectors,
        metavar="N",
        help=f"most vectors of the cohort K-means fit, shared equally by the samples past it; keeps the "
        f"fit's memory flat in cohort size (default {_CLUSTER.cohort_vectors})",
    )
    p.add_argument(
        "--mpp", type=float, default=_TILING.mpp, help=f"analysis resolution, µm/px (default {_TILING.mpp})"
    )
    p.add_argument(
        "--tile", type=int, default=_TILING.tile, help=f"tile interior side, px (default {_TILING.tile})"
    )
    p.add_argument(
        "--halo", type=int, default=_TILING.halo, help=f"context per side, px (default {_TILING.halo})"
    )
    add_mpp_arguments(p, cohort=True)
    p.add_argument("--tma", choices=("auto", "yes", "no"), default=_TILING.tma, help="split TMAs into cores")
    add_width_argument(p)
    add_precision_argument(p)
    p.add_argument("--seed", type=int, default=0, help="seed of weights, vector draws and K-means")
    p.add_argument(
        "--scheduler",
        default=os.environ.get(SCHEDULER_ENV),
        metavar="ADDR",
        help=f"existing Dask scheduler, e.g. tcp://host:8786 or tls://host:8786 (default: ${SCHEDULER_ENV})",
    )
    from equislide.commands._tls import add_tls_arguments

    add_tls_arguments(p)
    p.add_argument("--workers", type=int, default=None, help="local Dask workers (default: CPU cores)")
    p.add_argument(
        "--consistency",
        action="store_true",
        help="also score rotation consistency (kappa, Dice, feature ICC) of whole-slide regions or TMA "
        "cores, as many per input as keep it near a quarter of the feature work (at least one, at most "
        "--regions): <sample>.consistency.json, figures in run.json and the summary",
    )
    p.add_argument(
        "--angles",
        type=int,
        default=None,
        metavar="N",
        help="with --consistency: N rotation steps around the circle (12 = every 30°; default: 0 and 30°)",
    )
    p.add_argument(
        "--regions",
        type=int,
        default=4,
        help="with --consistency: most regions per whole slide, cores per TMA slide (default 4)",
    )
    from equislide.commands.tile import add_budget_option

    add_budget_option(p)
    return p


def check_args(args: argparse.Namespace) -> str | None:
    """The first problem with the options, in words; None when they are usable (``--weights`` and
    ``--out`` are checked by :func:`early_problem`)."""
    from equislide.commands._common import check_clusters, check_seed

    if not 0 < args.mpp < 1e6:
        return f"--mpp {args.mpp} must be a positive number of µm per pixel"
    if hasattr(args, "force_mpp"):
        problem = check_mpp_arguments(args)
        if problem:
            return problem
    elif args.input_mpp is not None and not args.input_mpp > 0:
        return f"--input-mpp {args.input_mpp} must be positive"
    if args.tile < 8 or args.halo < 0:
        return f"--tile {args.tile} must be >= 8 and --halo {args.halo} >= 0"
    if problem := check_clusters(args.clusters) or check_seed(args.seed):
        return problem
    if args.workers is not None and args.workers < 1:
        return f"--workers {args.workers} must be >= 1"
    if args.width is not None and args.width < 1:
        return f"--width {args.width} must be >= 1"
    if getattr(args, "angles", None) is not None and args.angles < 2:
        return f"--angles {args.angles} must be >= 2 (0 degrees and at least one other)"
    if getattr(args, "regions", 4) < 1:
        return f"--regions {args.regions} must be >= 1"
    if problem := check_precision(getattr(args, "precision", "auto"), args.scheduler):
        return problem
    try:
        BudgetSpec.parse(getattr(args, "budget", None))
    except ValueError as err:
        return f"--budget: {err}"
    return None


def early_problem(args: argparse.Namespace) -> str | None:
    """Everything checkable before any work: the options, the checkpoint's header, the run folder."""
    from equislide.commands._common import check_inputs, check_out_dir, check_weights_option
    from equislide.commands._tls import tls_problem

    return (
        check_args(args)
        or check_inputs(args)
        or tls_problem(args)
        or check_weights_option(args.weights, BACKBONE_ALIASES[args.backbone])
        or check_out_dir(args.out)
        or None
    )


def run_flow(args: argparse.Namespace, *, command: list[str], prefix: str = _PREFIX) -> dict[str, Any]:
    """Run the cohort flow with a rich progress display; returns the report."""
    import logging

    from equislide.commands._common import progress_bar
    from equislide.flows.cohort import run_cohort, set_progress_callback

    logging.getLogger("distributed").setLevel(logging.WARNING)
    options: dict[str, Any] = {
        "backbone": BACKBONE_ALIASES[args.backbone],
        "weights": args.weights,
        "layer": args.layer,
        "clusters": args.clusters,
        "fit": args.fit,
        "kmeans": args.kmeans,
        "cohort_vectors": getattr(args, "cohort_vectors", _CLUSTER.cohort_vectors),
        "mpp": args.mpp,
        "tile": args.tile,
        "halo": args.halo,
        "input_mpp": args.input_mpp,
        # demo builds its own arguments without the mpp options: the flow's defaults then.
        "force_mpp": getattr(args, "force_mpp", None),
        "native_pixels": getattr(args, "native_pixels", _TILING.native_pixels),
        "fit_native": getattr(args, "fit_native", _CLUSTER.fit_native),
        "max_tiles": getattr(args, "max_tiles", _TILING.max_tiles),
        "tma": args.tma,
        "seed": args.seed,
        "model_kwargs": {"width": args.width} if args.width else None,
        # demo has no --precision: the flow's default (auto) then.
        "precision": getattr(args, "precision", "auto"),
        "consistency": bool(getattr(args, "consistency", False)),
        "angles": getattr(args, "angles", None),
        "regions": getattr(args, "regions", 4),
        "budgets": BudgetSpec.parse(getattr(args, "budget", None)).to_dict(),
        "command": [printable(a) for a in command],
    }
    # demo builds its own arguments without these: the flow's defaults then.
    if getattr(args, "manifest", None) is not None:
        options["manifest_csv"] = args.manifest
    if hasattr(args, "settle_seconds"):
        options["settle_seconds"] = args.settle_seconds
    with progress_bar() as bar:
        rows = {}

        def on_progress(stage: str, done: int, total: int) -> None:
            if stage not in rows:
                rows[stage] = bar.add_task(stage, total=total)
            bar.update(rows[stage], completed=done, total=total)

        set_progress_callback(on_progress)
        try:
            return run_cohort(
                args.slides, args.out, scheduler=args.scheduler, workers=args.workers, **options
            )
        finally:
            set_progress_callback(None)


def run(args: argparse.Namespace) -> int:
    """Segment every input; print the summary and one line per failed input; return the exit status."""
    from equislide.commands._common import locked_run, usage_error
    from equislide.flows.cohort import summary_text

    problem = early_problem(args)
    if problem:
        return usage_error(_PREFIX, problem)
    from equislide.commands._tls import apply_tls

    apply_tls(args)
    if args.scheduler:
        from equislide.flows.cluster import scheduler_problem

        if problem := scheduler_problem(args.scheduler):
            print(f"{_PREFIX}: error: {problem}", file=sys.stderr)
            return 1
    command = ["equislide", "segment", *sys.argv[2:]]
    status, report = locked_run(
        _PREFIX,
        args.out,
        command,
        lambda: run_flow(args, command=command),
        inputs=args.slides,
        scheduler=args.scheduler,
    )
    if report is None:
        return status
    print(summary_text(report))
    waiting = report.get("parameters", {}).get("input_selection", {}).get("waiting", [])
    if waiting:
        shown = ", ".join(waiting)
        print(f"{_PREFIX}: {len(waiting)} inputs left for the next run (still arriving): {shown}")
    # Resolution warnings (--input-mpp contradicting the metadata, native pixels, ...) would
    # otherwise sit unseen in run.json.
    for record in report.get("parameters", {}).get("input_records", []):
        for warning in record.get("warnings") or []:
            print(f"{_PREFIX}: WARNING {record['path']}: {warning}", file=sys.stderr)
    failed = [i for i in report["inputs"] if i["status"] == "failed"]
    for i in failed:
        print(f"{_PREFIX}: FAILED {i['path']}: {i['reason']}", file=sys.stderr)
    return 1 if failed else 0
