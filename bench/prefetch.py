"""The feature stage's prefetching reader and ``torch.compile``, each against the plain path in the same run.

    python bench/prefetch.py [--slide FILE] [--mpp 1.0] [--tile 128] [--halo 16] [--width 64]
                             [--layer 4] [--repeats 3] [--compile]

A real slide (default ``CMU-1-Small-Region.svs`` of the shared data) is tiled once; then, on a fresh copy
of its store each time, ``extract_store_features`` (the features stage of one sample, one process) runs
with ``EQUISLIDE_PREFETCH=0`` (reads in line, the baseline) and ``=1`` (the next shard read and decoded on
a background thread), alternating, ``--repeats`` times: median tiles/s of each and their ratio. The time
to only read every shard is printed too: prefetching can hide at most that much.

With ``--compile``: the same stage with ``EQUISLIDE_COMPILE=1`` in this process, its first run (which
pays ``torch.compile``) and the median of the later runs (steady), against eager in the same run.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _data import data_dir  # noqa: E402


def fresh_copy(store: Path, dst: Path) -> Path:
    """The tiled store without features (a fresh features stage)."""
    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(store, dst, ignore=shutil.ignore_patterns("features"))
    return dst


def run_stage(store: Path, work: Path, backbone, spec, env: dict[str, str]) -> tuple[float, int]:
    """Seconds of one features stage of a fresh copy of ``store`` under ``env``; the tiles computed."""
    from equislide.stages.features import extract_store_features

    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        copy = fresh_copy(store, work / store.name)
        t0 = time.perf_counter()
        res = extract_store_features(copy, backbone, spec)
        return time.perf_counter() - t0, int(res["tiles_done"])
    finally:
        for k, v in old.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)


def read_only(store: Path) -> float:
    """Seconds to read and decode every shard of the store's tiles (what prefetching can overlap)."""
    from equislide.stages.backbone import read_tiles
    from equislide.storage import feature_shard_tiles, read_sample_meta

    n = int(read_sample_meta(store)["n_tiles"])
    shard = feature_shard_tiles(n)
    t0 = time.perf_counter()
    for s0 in range(0, n, shard):
        read_tiles(store, s0, min(n, s0 + shard))
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--slide", type=Path, default=data_dir() / "slides" / "CMU-1-Small-Region.svs")
    parser.add_argument("--mpp", type=float, default=1.0)
    parser.add_argument("--tile", type=int, default=128)
    parser.add_argument("--halo", type=int, default=16)
    parser.add_argument("--width", type=int, default=64, help="SRENet-18 width (64: the product's)")
    parser.add_argument("--layer", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--compile", action="store_true", help="also measure EQUISLIDE_COMPILE=1")
    parser.add_argument("--no-prefetch-part", action="store_true", help="with --compile: only that part")
    args = parser.parse_args()
    if not args.slide.is_file():
        raise SystemExit(f"{args.slide}: no such slide; pass --slide or set EQUISLIDE_DATA")

    import torch

    from equislide import stages
    from equislide.specs import FeatureSpec

    spec = FeatureSpec(
        layer=args.layer,
        model_kwargs={"width": args.width},
        weights="random",
        calibration_tiles=4,
        device="cpu",
    )
    with tempfile.TemporaryDirectory(prefix="equislide-bench-prefetch-") as tmp:
        root = Path(tmp)
        [res] = stages.tile_slide(args.slide, root / "tiles", mpp=args.mpp, tile=args.tile, halo=args.halo)
        store = Path(res.store)
        backbone = stages.calibrated_backbone([store], root / "models", spec)
        print(
            f"{args.slide.name}: {res.n_tiles} tiles of {args.tile}+2x{args.halo} px at {args.mpp} µm/px; "
            f"srenet18 width {args.width} layer {args.layer}, batch {spec.batch_tiles}, "
            f"torch {torch.__version__}, {torch.get_num_threads()} threads"
        )
        run_stage(store, root, backbone, spec, {"EQUISLIDE_PREFETCH": "0"})  # warm-up (network, caches)
        times: dict[str, list[float]] = {"0": [], "1": []}
        reads = []
        for _ in range(0 if args.no_prefetch_part else args.repeats):
            reads.append(read_only(store))
            for mode in ("0", "1"):
                s, n = run_stage(store, root, backbone, spec, {"EQUISLIDE_PREFETCH": mode})
                times[mode].append(s)
        if reads:
            off, on = statistics.median(times["0"]), statistics.median(times["1"])
            print(f"read + decode of every shard alone: {statistics.median(reads):.2f} s (median)")
            print(f"{'reader':<22}{'s (median)':>12}{'tiles/s':>10}{'speed':>8}   each run")
            for mode, name, t in (("0", "in line (baseline)", off), ("1", "prefetching", on)):
                each = " ".join(f"{v:.2f}" for v in times[mode])
                print(f"{name:<22}{t:>12.2f}{n / t:>10.2f}{off / t:>8.2f}   {each}")

        if args.compile:
            from equislide.stages.backbone import clear_backbone_cache

            clear_backbone_cache()  # a fresh network: the compiled wrapper is made for it
            env = {"EQUISLIDE_PREFETCH": "1", "EQUISLIDE_COMPILE": "1"}
            first, n = run_stage(store, root, backbone, spec, env)
            steady = [run_stage(store, root, backbone, spec, env)[0] for _ in range(args.repeats)]
            eager = [run_stage(store, root, backbone, spec, {"EQUISLIDE_PREFETCH": "1"})[0] for _ in range(2)]
            c, e = statistics.median(steady), statistics.median(eager)
            print(f"torch.compile: first run {first:.2f} s (compile included, about {first - c:.1f} s of it)")
            print(
                f"  steady compiled {c:.2f} s = {n / c:.2f} tiles/s; eager {e:.2f} s = {n / e:.2f} tiles/s; "
            )
            print(
                f"  compiled / eager speed {e / c:.2f}x; each compiled {' '.join(f'{v:.2f}' for v in steady)}"
            )


if __name__ == "__main__":
    main()
