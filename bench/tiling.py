"""Measure: tiles per second of ``tile_slide`` (read, mask, resample, compress, write) vs a naive loop.

Inputs: the two real SVS slides in ../shared/data (TCGA with ``input_mpp=0.5``, it has no resolution)
and a large phantom TMA (16 cores at 0.5 µm/px, ~13.7k px square, tiled as a whole slide with
``tma="no"`` so it has many tiles). Baseline, measured in the same run on the same tiles: OpenSlide
``read_region`` at level 0 of the tile's whole footprint, RGBA -> RGB, and a PIL box resize to the tile
side, with nothing written. The pipeline rate includes opening, hashing the file, the thumbnail and tissue
mask, and zstd-compressed zarr writes. Then 1 vs 2 single-threaded Dask workers (``LocalCluster``,
processes) on four copies of the phantom; cluster start-up is timed apart.

    python bench/tiling.py [--tile 512] [--halo 32] [--mpp 2.5] [--repeats 2] [--data DIR]
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import openslide
from _data import data_dir
from PIL import Image

from equislide.commands.tile import tile_one
from equislide.stages.tile import tile_slide
from equislide.storage import read_sample_meta
from equislide.tiling import write_phantom

DEFAULT_DATA = data_dir()


def naive_rate(path: Path, store: Path, input_mpp: float | None, mpp: float) -> tuple[int, float]:
    """(tiles, seconds) of read_region at level 0 + PIL resize for every tile of a finished store."""
    meta = read_sample_meta(store)
    import zarr

    coords = zarr.open_group(str(store), mode="r")["coords"][:]
    side, halo = meta["tile_with_halo"], meta["halo"]
    t0 = time.perf_counter()
    with openslide.OpenSlide(str(path)) as osr:
        src = float(osr.properties[openslide.PROPERTY_NAME_MPP_X]) if input_mpp is None else input_mpp
        s = mpp / src
        l0_side = math.ceil(side * s)
        for l_x, l_y in coords:
            l0_xy = (round((l_x - halo) * s), round((l_y - halo) * s))
            img = osr.read_region(l0_xy, 0, (l0_side, l0_side)).convert("RGB")
            tile = np.asarray(img.resize((side, side), Image.Resampling.BOX))
            assert tile.shape == (side, side, 3)
    return len(coords), time.perf_counter() - t0


def pipeline_rate(path: Path, work: Path, **kwargs) -> tuple[int, float, Path]:
    out = work / "out"
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    results = tile_slide(path, out, **kwargs)
    seconds = time.perf_counter() - t0
    return sum(r.n_tiles for r in results), seconds, results[0].store


def dask_rate(inputs: list[Path], work: Path, workers: int, options: dict) -> tuple[int, float, float]:
    """(tiles, seconds of the work, seconds of cluster start-up) on a LocalCluster of ``workers``."""
    from distributed import Client, LocalCluster

    out = work / f"dask{workers}"
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    with (
        LocalCluster(
            n_workers=workers,
            threads_per_worker=1,
            processes=True,
            dashboard_address=None,
            silence_logs=logging.ERROR,
        ) as cluster,
        Client(cluster) as client,
    ):
        client.run(lambda: __import__("equislide.stages.tile"))  # warm imports on every worker
        t1 = time.perf_counter()
        futures = [
            client.submit(tile_one, str(p), str(out), p.stem, options, pure=False, key=f"tile-{i}")
            for i, p in enumerate(inputs)
        ]
        records = client.gather(futures)
        t2 = time.perf_counter()
    assert all(r["status"] == "ok" for r in records), records
    return sum(r["tiles"] for r in records), t2 - t1, t1 - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tile", type=int, default=512)
    parser.add_argument("--halo", type=int, default=32)
    parser.add_argument("--mpp", type=float, default=2.5)
    parser.add_argument("--repeats", type=int, default=2, help="best of N for each timing")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="equislide-bench-tiling-"))
    try:
        t0 = time.perf_counter()
        phantom = work / "phantom.tiff"
        write_phantom(phantom, cores=16, seed=0, mpp=0.5)
        print(f"phantom written in {time.perf_counter() - t0:.1f} s ({phantom.stat().st_size / 1e6:.1f} MB)")
        cases = [
            ("CMU-1-Small-Region.svs", args.data / "slides/CMU-1-Small-Region.svs", None, "auto"),
            ("TCGA-CR-7395 (input_mpp 0.5)", args.data / "slides/TCGA-CR-7395-01A-01-TS1.svs", 0.5, "auto"),
            ("phantom 16 cores, tma=no", phantom, None, "no"),
        ]
        common = {"mpp": args.mpp, "tile": args.tile, "halo": args.halo}
        print(f"\ntile {args.tile} + halo {args.halo} at {args.mpp} µm/px; best of {args.repeats}")
        print(f"{'input':32s} {'tiles':>5s} {'naive t/s':>10s} {'pipeline t/s':>13s} {'ratio':>6s}")
        tot_naive = tot_pipe = 0.0
        tot_tiles = 0
        for name, path, input_mpp, tma in cases:
            if not path.is_file():
                print(f"{name:32s} skipped: {path} not found")
                continue
            kw = dict(common, input_mpp=input_mpp, tma=tma)
            runs = [pipeline_rate(path, work, **kw) for _ in range(args.repeats)]
            n, t_pipe, store = min(runs, key=lambda r: r[1])
            t_naive = min(naive_rate(path, store, input_mpp, args.mpp)[1] for _ in range(args.repeats))
            tot_naive += t_naive
            tot_pipe += t_pipe
            tot_tiles += n
            print(f"{name:32s} {n:5d} {n / t_naive:10.2f} {n / t_pipe:13.2f} {t_naive / t_pipe:6.2f}")
        print(
            f"{'all':32s} {tot_tiles:5d} {tot_tiles / tot_naive:10.2f} {tot_tiles / tot_pipe:13.2f} "
            f"{tot_naive / tot_pipe:6.2f}   (goal: ratio >= 0.8)"
        )

        copies = []
        for i in range(4):
            link = work / f"phantom-copy{i}.tiff"
            link.symlink_to(phantom)
            copies.append(link)
        options = dict(common, input_mpp=None, tma="no")
        print(f"\nDask LocalCluster on {len(copies)} copies of the phantom (cpu_count={os.cpu_count()})")
        rates = {}
        for workers in (1, 2):
            best = min(
                (dask_rate(copies, work, workers, options) for _ in range(args.repeats)), key=lambda r: r[1]
            )
            rates[workers] = best[0] / best[1]
            print(
                f"  {workers} worker(s): {best[0]} tiles in {best[1]:.2f} s = {rates[workers]:.2f} tiles/s "
                f"(cluster start-up {best[2]:.1f} s)"
            )
        print(f"  2 vs 1 workers: {rates[2] / rates[1]:.2f}x   (goal: >= 1.7x)")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
