"""Measure: tiles per second of ``tile_slide`` (read, mask, resample, compress, write) vs a naive loop.

Inputs: the two real SVS slides in ../shared/data (TCGA with ``input_mpp=0.5``, it has no resolution)
and a large phantom TMA (16 cores at 0.5 µm/px, ~13.7k px square, tiled as a whole slide with
``tma="no"`` so it has many tiles). Baseline, measured in the same run on the same tiles: OpenSlide
``read_region`` at level 0 of the tile's whole footprint, RGBA -> RGB, and a PIL box resize to the tile
side, with nothing written. The pipeline rate includes opening, hashing the file, the thumbnail and tissue
mask, and zstd-compressed zarr writes. Then 1 vs 2 single-threaded Dask workers (``LocalCluster``,
processes) on four copies of the phantom; cluster start-up is timed apart.

Reads (``--part reads``): tiles/s of the tile reader alone on one planned sample per input, three ways
in the same run, each on a freshly opened slide (an empty OpenSlide tile cache): the baseline, plain
OpenSlide ``read_region`` of every stored (JPEG) tile of the chosen level that the sample's tiles touch,
once each at its native size (decoding each stored tile once, no resampling: the floor of the cost);
the old per-tile path (``read_region_mpp`` per tile); and the block path (``read_tile_batches``, rows
of a batch in blocks of the level). Block and per-tile tiles are checked equal. Inputs: the real SVS /
TIFF slides and a generated 20000 x 20000 pyramidal JPEG TIFF (512 px tiles, 0.25 µm/px, levels
downsampled by exactly 2, 4, 8).

    python bench/tiling.py [--part all|reads|pipeline] [--tile 512] [--halo 32] [--mpp 2.5]
                           [--repeats 2] [--data DIR] [--big-size 20000]
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


def write_big_pyramid(path: Path, size: int, *, tile: int = 512, mpp: float = 0.25) -> Path:
    """A ``size`` square pyramidal JPEG TIFF written tile by tile (bounded memory): a disc of textured
    pink "tissue" on white glass; levels k = 0..3 are ``size / 2**k`` px (the same disc, new texture)."""
    import tifffile

    rng = np.random.default_rng(0)
    # A few 512 px textured patches, repeated over each stored tile: cheap to make, real detail to code.
    yy, xx = np.mgrid[:512, :512].astype(np.float32)
    patches = []
    for _ in range(8):
        a, b, c = rng.uniform(5, 40, 3)
        texture = 0.5 + 0.25 * np.sin(xx / a) * np.cos(yy / b) + 0.25 * np.sin((xx + yy) / c)
        pink = np.stack([200 - 60 * texture, 110 - 70 * texture, 170 - 40 * texture], axis=-1)
        patches.append(np.clip(pink + rng.normal(0, 6, pink.shape), 0, 255).astype(np.uint8))
    reps = max(1, tile // 512)

    def tiles(level: int):
        step = 2**level
        n = math.ceil(size / step)
        for ty in range(0, n, tile):
            for tx in range(0, n, tile):
                y, x = np.ogrid[ty : ty + tile, tx : tx + tile]
                r2 = ((x * step - size / 2) ** 2).astype(np.float32) + ((y * step - size / 2) ** 2)
                patch = patches[(tx // tile * 7 + ty // tile * 3 + level) % len(patches)]
                out = np.tile(patch, (reps, reps, 1))[:tile, :tile].copy()
                out[r2 >= (0.85 * size / 2) ** 2] = 245
                yield out

    px_per_cm = 1e4 / mpp
    with tifffile.TiffWriter(path, bigtiff=True) as tw:
        for level in range(4):
            n = math.ceil(size / 2**level)
            tw.write(
                tiles(level),
                shape=(n, n, 3),
                dtype=np.uint8,
                photometric="rgb",
                tile=(tile, tile),
                compression="jpeg",
                compressionargs={"level": 80},
                resolution=(px_per_cm / 2**level, px_per_cm / 2**level),
                resolutionunit="CENTIMETER",
                subfiletype=1 if level else 0,
                metadata=None,
            )
    return path


def read_rates(path: Path, input_mpp: float | None, mpp: float, tile: int, halo: int, repeats: int):
    """(tiles, level, downsample, baseline s, per-tile s, block s, equal) for one sample's reads."""
    from equislide.tiling import open_slide, plan_samples, read_tile_batches

    layout = plan_samples(
        path, sample_id="s", params={}, mpp=mpp, tile=tile, halo=halo, input_mpp=input_mpp, tma="no"
    )
    sample = layout.todo[0]
    grid = sample.grid
    l0 = grid.l0_read_xy
    side = grid.side
    with open_slide(path, input_mpp=input_mpp) as slide:
        level = slide.best_level_for_downsample(mpp / slide.mpp[0])
        ds = slide.level_downsamples[level]
        f = mpp / slide.mpp[0] / ds
        tw = int(slide.properties.get(f"openslide.level[{level}].tile-width", 256))
        th = int(slide.properties.get(f"openslide.level[{level}].tile-height", 256))
    lv_side = math.ceil(side * f)
    stored = set()
    for x, y in l0.tolist():
        lv_x, lv_y = max(0, math.floor(x / ds)), max(0, math.floor(y / ds))
        for row in range(lv_y // th, (lv_y + lv_side - 1) // th + 1):
            for col in range(lv_x // tw, (lv_x + lv_side - 1) // tw + 1):
                stored.add((col, row))

    def baseline() -> float:
        t0 = time.perf_counter()
        with openslide.OpenSlide(str(path)) as osr:
            for col, row in sorted(stored, key=lambda cr: (cr[1], cr[0])):
                osr.read_region((round(col * tw * ds), round(row * th * ds)), level, (tw, th))
        return time.perf_counter() - t0

    def per_tile() -> tuple[float, np.ndarray]:
        t0 = time.perf_counter()
        with open_slide(path, input_mpp=input_mpp) as slide:
            out = np.stack(
                [slide.read_region_mpp((int(x), int(y)), (side, side), sample.analysis_mpp) for x, y in l0]
            )
        return time.perf_counter() - t0, out

    def blocks() -> tuple[float, np.ndarray]:
        t0 = time.perf_counter()
        with open_slide(path, input_mpp=input_mpp) as slide:
            out = np.concatenate([b for _, b in read_tile_batches(slide, sample, 32)])
        return time.perf_counter() - t0, out

    t_base = min(baseline() for _ in range(repeats))
    old = [per_tile() for _ in range(repeats)]
    new = [blocks() for _ in range(repeats)]
    equal = np.array_equal(old[0][1], new[0][1])
    return grid.n_tiles, level, ds, t_base, min(t for t, _ in old), min(t for t, _ in new), equal


def reads_part(args, work: Path) -> None:
    t0 = time.perf_counter()
    bigs = {}
    for tile in (512, 4096):
        t0 = time.perf_counter()
        bigs[tile] = write_big_pyramid(work / f"big{tile}.tiff", args.big_size, tile=tile)
        print(
            f"generated a {args.big_size} px pyramid of {tile} px JPEG tiles in "
            f"{time.perf_counter() - t0:.1f} s ({bigs[tile].stat().st_size / 1e6:.0f} MB)"
        )
    slides = args.data / "slides"
    cases = [
        ("CMU-1-Small-Region.svs", slides / "CMU-1-Small-Region.svs", None, 1.0),
        ("CMU-1-Small-Region.pyramid3.tiff", slides / "CMU-1-Small-Region.pyramid3.tiff", None, 1.0),
        ("TCGA-CR-7395 svs (input_mpp 0.5)", slides / "TCGA-CR-7395-01A-01-TS1.svs", 0.5, 1.0),
        ("TCGA-CR-7395.pyramid4 (0.5)", slides / "TCGA-CR-7395.pyramid4.tiff", 0.5, 1.0),
    ]
    for tile, big in bigs.items():
        cases += [(f"generated, {tile} px JPEG tiles", big, None, mpp) for mpp in (args.mpp, 1.0, 0.5)]
    print(f"\nreads: tile {args.read_tile} + halo {args.halo}; tiles/s, best of {args.repeats}")
    head = f"{'input':34s} {'mpp':>4s} {'lvl':>3s} {'ds':>6s} {'tiles':>5s} {'baseline':>9s} {'per-tile':>9s}"
    print(head + f" {'block':>8s} {'block/per-tile':>14s} {'block/baseline':>14s} equal")
    for name, path, input_mpp, mpp in cases:
        if not path.is_file():
            print(f"{name:34s} skipped: {path} not found")
            continue
        n, level, ds, t_base, t_old, t_new, equal = read_rates(
            path, input_mpp, mpp, args.tile, args.halo, args.repeats
        )
        print(
            f"{name:34s} {mpp:4g} {level:3d} {ds:6.4g} {n:5d} {n / t_base:9.1f} {n / t_old:9.1f}"
            f" {n / t_new:8.1f} {t_old / t_new:14.2f} {t_base / t_new:14.2f} {equal}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tile", type=int, default=512)
    parser.add_argument("--halo", type=int, default=32)
    parser.add_argument("--mpp", type=float, default=2.5)
    parser.add_argument("--repeats", type=int, default=2, help="best of N for each timing")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--part", choices=("all", "reads", "pipeline"), default="all")
    parser.add_argument("--big-size", type=int, default=20000, help="side of the generated pyramid, px")
    parser.add_argument("--read-tile", type=int, default=224, help="tile interior of the reads part, px")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="equislide-bench-tiling-"))
    try:
        if args.part in ("all", "reads"):
            reads_part(args, work)
        if args.part == "reads":
            return
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
