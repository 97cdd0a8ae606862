"""``equislide phantom OUT.tiff``: write the synthetic H&E TMA phantom with its ground truth."""

from __future__ import annotations

import argparse


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``phantom`` on the CLI's subparsers."""
    p = subparsers.add_parser(
        "phantom",
        help="write a synthetic H&E tissue-microarray slide with ground-truth labels",
        description=(
            "Write a pyramidal tiled TIFF of a synthetic H&E TMA (round cores of glands, dense nuclei, "
            "stroma and fat on glass; some grid positions empty; the array slightly rotated), plus "
            "<stem>.labels.tiff (uint8 labels) and <stem>.json (seed, mpp, grid, core centres)."
        ),
    )
    p.add_argument("out", help="output TIFF path, e.g. phantom.tiff")
    p.add_argument("--cores", type=int, default=16, help="grid positions (default 16: a 4 x 4 array)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0); same seed, same bytes")
    p.add_argument("--mpp", type=float, default=0.5, help="microns per level-0 pixel (default 0.5)")
    p.add_argument(
        "--core-diameter-um", type=float, default=1200.0, help="core diameter in µm (default 1200)"
    )
    p.add_argument("--missing", type=int, default=None, help="empty grid positions (default cores // 8)")
    return p


def run(args: argparse.Namespace) -> int:
    """Write the phantom and print where its three files are; returns the exit status."""
    import sys
    import time

    from equislide.tiling.phantom import write_phantom

    t0 = time.perf_counter()
    try:
        info = write_phantom(
            args.out,
            cores=args.cores,
            seed=args.seed,
            mpp=args.mpp,
            core_diameter_um=args.core_diameter_um,
            missing=args.missing,
        )
    except (ValueError, OSError) as err:
        print(f"equislide phantom: {err}", file=sys.stderr)
        return 2
    present = sum(c.present for c in info.cores)
    w, h = info.l0_size
    print(
        f"phantom: {present} of {len(info.cores)} cores, {info.grid[0]} x {info.grid[1]} grid, "
        f"{w} x {h} px at {info.mpp} µm/px, {info.level_count} levels, "
        f"rotated {info.angle_deg:+.2f}°, {time.perf_counter() - t0:.1f} s"
    )
    print(f"  image:  {info.image_path}")
    print(f"  labels: {info.labels_path} (downsample {info.label_downsample}; {', '.join(info.label_names)})")
    print(f"  info:   {info.json_path}")
    return 0
