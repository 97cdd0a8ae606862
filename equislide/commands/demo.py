"""``equislide demo``: a phantom TMA through the whole cohort flow, scored against its ground truth.

Writes the synthetic H&E TMA (:func:`equislide.tiling.write_phantom`), runs the cohort flow on it with
defaults small enough for a laptop (a 3 x 3 array of 800 µm cores, 2.5 µm/px, SRENet-18 of width 32 at
layer 3, random weights with BatchNorm recalibrated on the cores unless packaged default weights or
``--weights`` are given, cohort K-means with k = 4), prints the
settings, where the outputs are, the adjusted Rand index of the clusters against the phantom's
ground-truth classes on tissue pixels, and how to look at the run in the Prefect UI.

Why these settings: the phantom has four tissue classes (glands, dense nuclei, stroma, fat), so the demo
asks for k = 4 (``segment``'s default k = 3 merges two classes by construction). ARI against the ground
truth for phantom seeds 0 / 1, measured on the shared 2-core CPU (about 50-80 s a run):

- width 16, layer 3: k = 3 0.333 / 0.475; k = 4 0.469 / 0.536
- width 16, layer 2: k = 3 0.303 / 0.492; k = 4 0.332 / 0.395
- width 32, layer 3, k = 4: 0.790 / 0.633 (chosen)
- width 64, layer 3, k = 4: 0.690 / 0.762 (no clear gain over width 32, and 1.3-1.5x slower)

The vectors are always L2-normalised (:meth:`equislide.specs.ClusterSpec.kmeans_params`); the ARI is
:func:`equislide.evaluate.phantom_agreement`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

_PREFIX = "equislide demo"
#: Feature stage, K-means k and SRENet width of the demo (measured choices: see the module docstring).
DEMO_LAYER = 3
DEMO_CLUSTERS = 4
DEMO_WIDTH = 32


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``demo`` on the CLI's subparsers."""
    p = subparsers.add_parser(
        "demo",
        help="run the whole pipeline on a synthetic TMA and score it against the ground truth",
        description=(
            "Write a synthetic H&E tissue microarray with ground truth, segment it with the Prefect "
            "cohort flow on a local Dask cluster, and print the outputs and the agreement (adjusted "
            "Rand index) of the clusters with the true tissue classes. A few minutes on 2 CPU cores."
        ),
    )
    p.add_argument("--out", default="equislide-demo", metavar="DIR", help="folder (default ./equislide-demo)")
    p.add_argument("--cores", type=int, default=9, help="TMA grid positions (default 9; one is left empty)")
    p.add_argument("--workers", type=int, default=None, help="local Dask workers (default: CPU cores)")
    p.add_argument("--seed", type=int, default=0, help="seed of the phantom and of the run")
    from equislide.commands._common import WEIGHTS_HELP

    p.add_argument(
        "--weights",
        default=None,
        metavar="FILE|random",
        help=f"SRENet-18 weights: {WEIGHTS_HELP}. Random weights have width {DEMO_WIDTH}",
    )
    return p


def demo_width(weights: str | None) -> int | None:
    """SRENet width of the demo: :data:`DEMO_WIDTH` for random weights; None (the checkpoint's own)
    for a file or packaged default weights.

    Raises:
        DefaultWeightsError: ``weights`` is None and the packaged registry is broken.
    """
    from equislide.models.defaults import packaged_weights
    from equislide.specs import RANDOM_WEIGHTS

    if weights == RANDOM_WEIGHTS or (weights is None and packaged_weights("srenet18") is None):
        return DEMO_WIDTH
    return None


def demo_args(
    out: Path, slide: Path, *, workers: int | None, seed: int, weights: str | None = None
) -> argparse.Namespace:
    """The ``segment`` options the demo runs with (small enough for 2 CPU cores)."""
    return argparse.Namespace(
        slides=[str(slide)],
        out=str(out),
        weights=weights,
        backbone="srenet",
        layer=DEMO_LAYER,
        clusters=DEMO_CLUSTERS,
        fit="cohort",
        kmeans="auto",
        mpp=2.5,
        tile=256,
        halo=16,
        input_mpp=None,
        tma="auto",
        width=demo_width(weights),
        seed=seed,
        scheduler=None,
        workers=workers,
    )


def run(args: argparse.Namespace) -> int:
    """Phantom -> cohort flow -> outputs, ARI and how to open the Prefect UI."""
    import time

    from equislide.commands._common import check_out_dir, check_weights_option, locked_run, usage_error
    from equislide.commands.segment import run_flow
    from equislide.evaluate import phantom_agreement
    from equislide.flows.cohort import summary_text
    from equislide.tiling import write_phantom

    if args.cores < 2:
        return usage_error(_PREFIX, f"--cores {args.cores} must be >= 2")
    out = Path(args.out)
    weights = getattr(args, "weights", None)
    problem = check_weights_option(weights, "srenet18") or check_out_dir(out)
    if problem:
        return usage_error(_PREFIX, problem)
    t0 = time.perf_counter()
    slide = out / "phantom" / "phantom.tiff"
    if not (slide.is_file() and slide.with_suffix(".json").is_file()):
        write_phantom(slide, cores=args.cores, core_diameter_um=800.0, seed=args.seed)
    seg_args = demo_args(out / "run", slide, workers=args.workers, seed=args.seed, weights=weights)
    network = (
        f"SRENet-18 width {seg_args.width}, layer {seg_args.layer}, random weights (BatchNorm recalibrated)"
        if seg_args.width is not None
        else f"SRENet-18 layer {seg_args.layer}, "
        + (f"weights from {weights}" if weights else "the packaged default weights")
    )
    print(
        f"demo: settings: phantom of {args.cores} positions (800 µm cores, seed {args.seed}); "
        f"{seg_args.mpp} µm/px; {network}; cohort K-means k = {seg_args.clusters} on L2-normalised "
        "vectors (k = 4: the phantom's four tissue classes)"
    )
    command = ["equislide", "demo", *sys.argv[2:]]
    Path(seg_args.out).mkdir(parents=True, exist_ok=True)  # the lock lives in it
    status, report = locked_run(
        _PREFIX,
        str(seg_args.out),
        command,
        lambda: run_flow(seg_args, command=command, prefix=_PREFIX),
        inputs=[str(slide)],
    )
    if report is None:  # another run holds the folder, or an infrastructure fault (one line printed)
        return status
    print(summary_text(report))
    agreement = phantom_agreement(report, slide.with_suffix(".json"))
    print(
        "\ndemo: adjusted Rand index of the clusters vs the phantom's tissue classes: "
        f"{agreement['ari']:.3f} "
        f"({agreement['pixels']} tissue px, {len(agreement['per_core'])} cores; 1 = perfect, 0 = chance)"
    )
    print(f"demo: phantom {slide}; outputs in {out / 'run' / 'samples'}; report {out / 'run' / 'run.json'}")
    print(
        "demo: open an OME-Zarr in napari (napari --plugin napari-ome-zarr <sample>.ome.zarr) or a GeoJSON "
        "in QuPath; to browse flow runs, artifacts and logs start a Prefect UI with `prefect server start` "
        "and run with PREFECT_API_URL=http://127.0.0.1:4200/api"
    )
    print(f"demo: {time.perf_counter() - t0:.1f} s in all")
    failed = [i for i in report["inputs"] if i["status"] == "failed"]
    return 1 if failed else 0
