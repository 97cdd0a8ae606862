"""``equislide consistency SLIDE... --out DIR``: the rotation study (the paper's experiment) as one command.

Runs :func:`equislide.flows.consistency.consistency_flow` on the same Dask and Prefect machinery as
``segment``: every sample (a TMA core, or up to ``--regions`` regions of a whole slide) is rotated by
``--angles`` steps, segmented (K-means per sample at 0 degrees), rotated back and scored (Cohen's kappa,
mean Dice, feature-level ICC) for each backbone. Writes ``metrics.csv``, ``summary.csv``,
``angles.csv``, ``consistency.png`` and ``rotations.png``. Exit status 0 when every sample was scored
for every backbone, 1 when some failed (one line each on stderr), 2 on a usage error.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from equislide.commands._common import add_input_arguments, add_precision_argument, add_width_argument
from equislide.specs import BACKBONE_ALIASES, ClusterSpec, TilingSpec

_PREFIX = "equislide consistency"
SCHEDULER_ENV = "EQUISLIDE_SCHEDULER"
_TILING, _CLUSTER = TilingSpec(), ClusterSpec()


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``consistency`` on the CLI's subparsers."""
    p = subparsers.add_parser(
        "consistency",
        help="rotation study: kappa, Dice and ICC of each backbone's segmentation under rotation",
        description=(
            "Rotate every sample (TMA core, or regions of a whole slide) by --angles steps, segment "
            "each rotated copy (K-means per sample fitted at 0 degrees), rotate the label maps back and "
            "score their agreement with the 0-degree map (Cohen's kappa, mean Dice; feature-level "
            "ICC(3,1)) for each backbone. Writes DIR/metrics.csv, summary.csv, angles.csv, "
            "consistency.png and rotations.png. Exit status 0 when all were scored, 1 when some "
            "failed or the run stopped on a fault (recorded in DIR/run.json), 2 on a usage error or when "
            "another run holds DIR (DIR/.equislide.lock)."
        ),
    )
    add_input_arguments(p)
    p.add_argument("--out", required=True, metavar="DIR", help="study folder")
    p.add_argument(
        "--backbones",
        default="srenet,resnet18,e2cnn",
        help="comma-separated: srenet, resnet18, e2cnn (default all three)",
    )
    p.add_argument("--angles", type=int, default=12, metavar="N", help="rotation steps (default 12: 30°)")
    p.add_argument("--layer", type=int, choices=(1, 2, 3, 4), default=4, help="feature stage (default 4)")
    p.add_argument(
        "--layers", default=None, metavar="L,L", help="several stages, e.g. 1,2,3,4 (overrides --layer)"
    )
    p.add_argument(
        "--weights",
        action="append",
        default=[],
        metavar="BACKBONE=FILE|random",
        help="weights of a backbone, e.g. srenet=srenet.safetensors or resnet18=random (repeatable; "
        "'random' alone: every backbone). Default: the backbone's packaged default weights where the "
        "package makes some the default (README, Weights; none is today), else seeded random weights "
        "with BatchNorm recalibrated",
    )
    p.add_argument(
        "--annotations",
        default=None,
        metavar="DIR",
        help="label images (<sample or slide id>.png/.tif; integer classes or colours) to score the "
        "0° clusters against: per-class Dice, ARI, NMI in DIR/annotations.csv",
    )
    p.add_argument("--regions", type=int, default=4, help="regions per whole slide (default 4)")
    p.add_argument("--region", type=int, default=1024, help="side of a region, analysis px (default 1024)")
    p.add_argument("--clusters", type=int, default=_CLUSTER.k, help=f"K-means k (default {_CLUSTER.k})")
    p.add_argument("--mpp", type=float, default=_TILING.mpp, help=f"analysis µm/px (default {_TILING.mpp})")
    p.add_argument("--input-mpp", type=float, default=None, metavar="X", help="µm per level-0 px, all inputs")
    p.add_argument("--tma", choices=("auto", "yes", "no"), default=_TILING.tma, help="split TMAs into cores")
    add_width_argument(p)
    add_precision_argument(p)
    p.add_argument("--seed", type=int, default=0, help="seed of weights, regions and K-means")
    p.add_argument(
        "--scheduler", default=os.environ.get(SCHEDULER_ENV), metavar="ADDR", help="existing Dask scheduler"
    )
    from equislide.commands._tls import add_tls_arguments

    add_tls_arguments(p)
    p.add_argument("--workers", type=int, default=None, help="local Dask workers (default: CPU cores)")
    return p


def _options(args: argparse.Namespace) -> tuple[dict, str | None]:
    """The flow's keyword arguments, or the first problem in words."""
    from equislide.commands._common import (
        check_clusters,
        check_precision,
        check_seed,
        check_weights,
        check_weights_option,
    )
    from equislide.specs import RANDOM_WEIGHTS

    names = [b.strip() for b in args.backbones.split(",") if b.strip()]
    unknown = [b for b in names if b not in BACKBONE_ALIASES]
    if not names or unknown:
        return {}, f"--backbones {args.backbones}: use srenet, resnet18, e2cnn"
    try:
        layers = [int(v) for v in args.layers.split(",")] if args.layers else [args.layer]
    except ValueError:
        return {}, f"--layers {args.layers}: give stages as 1,2,3,4"
    if any(v not in (1, 2, 3, 4) for v in layers):
        return {}, f"--layers {args.layers}: stages are 1-4"
    weights = {}
    for item in args.weights:
        if item == RANDOM_WEIGHTS:
            weights.update({BACKBONE_ALIASES[b]: RANDOM_WEIGHTS for b in names})
            continue
        name, _, path = item.partition("=")
        if name not in BACKBONE_ALIASES or not path:
            return {}, (
                f"--weights {item}: give BACKBONE=FILE or BACKBONE=random with BACKBONE srenet, resnet18 "
                "or e2cnn, or 'random' for every backbone"
            )
        if path != RANDOM_WEIGHTS and (
            problem := check_weights(path, BACKBONE_ALIASES[name], option=f"--weights {name}=")
        ):
            return {}, problem.replace(f"--weights {name}= {path}", f"--weights {item}", 1)
        weights[BACKBONE_ALIASES[name]] = path
    for b in names:
        full = BACKBONE_ALIASES[b]
        if full not in weights and (problem := check_weights_option(None, full)):
            return {}, problem
    if args.angles < 2:
        return {}, f"--angles {args.angles} must be >= 2"
    if args.regions < 1 or args.region < 64 or args.region % 8:
        return {}, f"--regions {args.regions} must be >= 1 and --region {args.region} a multiple of 8, >= 64"
    if not 0 < args.mpp < 1e6 or (args.input_mpp is not None and not args.input_mpp > 0):
        return {}, "--mpp and --input-mpp must be positive numbers of µm per pixel"
    if problem := check_clusters(args.clusters) or check_seed(args.seed):
        return {}, problem
    if args.annotations is not None and not Path(args.annotations).is_dir():
        return {}, f"--annotations {args.annotations}: no such folder"
    if problem := check_precision(args.precision, args.scheduler):
        return {}, problem
    return {
        "backbones": [BACKBONE_ALIASES[b] for b in names],
        "weights": weights,
        "layers": layers,
        "angles": args.angles,
        "regions": args.regions,
        "region": args.region,
        "clusters": args.clusters,
        "mpp": args.mpp,
        "input_mpp": args.input_mpp,
        "tma": args.tma,
        "seed": args.seed,
        "model_kwargs": {"width": args.width} if args.width else None,
        "precision": args.precision,
        "annotations": args.annotations,
        "manifest_csv": args.manifest,
        "settle_seconds": args.settle_seconds,
    }, None


def run(args: argparse.Namespace) -> int:
    """Run the study; print its table and one line per failure; return the exit status."""
    import logging

    from equislide.commands._common import check_inputs, check_out_dir, locked_run, usage_error
    from equislide.commands._tls import apply_tls, tls_problem

    options, problem = _options(args)
    problem = problem or check_inputs(args) or tls_problem(args) or check_out_dir(args.out)
    if problem:
        return usage_error(_PREFIX, problem)
    apply_tls(args)
    if args.scheduler:
        from equislide.flows.cluster import scheduler_problem

        if problem := scheduler_problem(args.scheduler):
            print(f"{_PREFIX}: error: {problem}", file=sys.stderr)
            return 1
    logging.getLogger("distributed").setLevel(logging.WARNING)
    from equislide.flows.consistency import run_study, study_text

    command = ["equislide", "consistency", *sys.argv[2:]]
    status, report = locked_run(
        _PREFIX,
        args.out,
        command,
        lambda: run_study(args.slides, args.out, scheduler=args.scheduler, workers=args.workers, **options),
        inputs=args.slides,
        scheduler=args.scheduler,
    )
    if report is None:
        return status
    print(study_text(report))
    for what, reason in report["failed"].items():
        print(f"{_PREFIX}: FAILED {what}: {reason}", file=sys.stderr)
    return 1 if report["failed"] else 0
