"""``equislide phantom OUT.tiff``: write a synthetic H&E TMA (default) or, with ``--whole-slide``, a large
whole-slide section, each with its ground truth."""

from __future__ import annotations

import argparse


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``phantom`` on the CLI's subparsers."""
    p = subparsers.add_parser(
        "phantom",
        help="write a synthetic H&E slide (a TMA, or --whole-slide a large section) with ground-truth labels",
        description=(
            "Write a pyramidal tiled TIFF of a synthetic H&E TMA (round cores of glands, dense nuclei, "
            "stroma and fat on glass; some grid positions empty; the array slightly rotated), plus "
            "<stem>.labels.tiff (uint8 labels) and <stem>.json (seed, mpp, grid, core centres). "
            "With --whole-slide: a large whole-slide section instead (a few irregular tissue pieces of the "
            "same four classes, 512 px JPEG tiles, streamed tile by tile in flat memory), plus "
            "<stem>.truth.png (uint8 labels at about 16 µm/px) and <stem>.json (sizes, mpp, pieces, seed)."
        ),
    )
    p.add_argument("out", help="output TIFF path, e.g. phantom.tiff")
    p.add_argument(
        "--whole-slide",
        action="store_true",
        help="write a whole-slide section (--width x --height px) instead of a TMA",
    )
    p.add_argument("--cores", type=int, default=16, help="TMA: grid positions (default 16: a 4 x 4 array)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0); same seed, same bytes")
    p.add_argument(
        "--mpp",
        type=float,
        default=None,
        help="microns per level-0 pixel (default 0.5 for a TMA, 0.25 for --whole-slide)",
    )
    p.add_argument(
        "--core-diameter-um", type=float, default=1200.0, help="TMA: core diameter in µm (default 1200)"
    )
    p.add_argument("--missing", type=int, default=None, help="TMA: empty grid positions (default cores // 8)")
    p.add_argument(
        "--width", type=int, default=80000, help="--whole-slide: level-0 width in px (default 80000)"
    )
    p.add_argument(
        "--height", type=int, default=60000, help="--whole-slide: level-0 height in px (default 60000)"
    )
    p.add_argument("--pieces", type=int, default=5, help="--whole-slide: tissue pieces, 1-32 (default 5)")
    return p


def run(args: argparse.Namespace) -> int:
    """Write the phantom and print where its files are; returns the exit status."""
    import sys
    import time

    t0 = time.perf_counter()
    if args.whole_slide:
        from equislide.tiling.phantom_slide import write_whole_slide_phantom

        try:
            info = write_whole_slide_phantom(
                args.out,
                width=args.width,
                height=args.height,
                mpp=0.25 if args.mpp is None else args.mpp,
                seed=args.seed,
                pieces=args.pieces,
            )
        except (ValueError, OSError) as err:
            print(f"equislide phantom: {args.out}: {err}", file=sys.stderr)
            return 2
        w, h = info.l0_size
        print(
            f"phantom: whole slide, {len(info.pieces)} tissue pieces, {w} x {h} px at {info.mpp} µm/px, "
            f"{info.level_count} levels, {time.perf_counter() - t0:.1f} s"
        )
        print(f"  image: {info.image_path}")
        print(
            f"  truth: {info.truth_path} (downsample {info.label_downsample}; {', '.join(info.label_names)})"
        )
        print(f"  info:  {info.json_path}")
        return 0

    from equislide.tiling.phantom import write_phantom

    try:
        info = write_phantom(
            args.out,
            cores=args.cores,
            seed=args.seed,
            mpp=0.5 if args.mpp is None else args.mpp,
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
