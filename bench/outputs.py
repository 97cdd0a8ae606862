"""Measure: a sample's viewable outputs (OME-Zarr + overlay PNG), today's writer vs the previous one.

New (what ``segment_store`` writes): the OME-Zarr image at the analysis resolution, streamed from the
tile store a band at a time (:class:`~equislide.storage.TilePlane`) into an NGFF 0.5 / zarr v3 pyramid
with the label maps sampled onto every level, and the overlay over the whole slide (tiles, the slide's
thumbnail past them) with its legend and scale bar. Old, measured in the same run on the same store:
the previous path, re-created with today's functions: the image stitched in memory at the *label*
resolution (stride x coarser), NGFF 0.4 / zarr v2 in 256 px chunks, and the overlay over the tile grid
only (``stitch_store(..., overlay_max=2048)``). Labels are a fixed pattern (3 clusters): the writers'
cost does not depend on where labels come from, so no features are computed.

Inputs: the real slides in ../shared/data (tiled here with ``segment``'s defaults: 512 + 32 px tiles at
2.5 µm/px; TCGA with ``input_mpp=0.5``) and a synthetic store of ``--synthetic N`` x N tiles (a
whole-slide-sized analysis plane, to show the streaming keeps memory bounded: the peak traced
allocation is printed next to the plane's size).

    python bench/outputs.py [--repeats 3] [--synthetic 8] [--data DIR]
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np
from _data import data_dir

from equislide.stages.segment import OVERLAY_MAX, write_sample_ome_zarr, write_sample_overlay
from equislide.stages.tile import tile_slide
from equislide.storage import (
    open_sample_for_write,
    read_sample_meta,
    stitch_store,
    write_ome_zarr,
    write_overlay_png,
)

STRIDE = 8  # layer 4 of SRENet-18
NAMES = {1: "cluster 1", 2: "cluster 2", 3: "cluster 3"}


def _size(path: Path) -> int:
    return (
        path.stat().st_size
        if path.is_file()
        else sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    )


def _tile_labels(meta: dict) -> np.ndarray:
    f = int(meta["tile"]) // STRIDE
    yy, xx = np.mgrid[0:f, 0:f]
    base = ((yy // 8 + xx // 8) % 3).astype(np.int64)
    return np.stack([(base + i) % 3 for i in range(int(meta["n_tiles"]))])


def old_outputs(store: Path, out: Path, meta: dict, tile_labels: np.ndarray) -> None:
    st = stitch_store(store, tile_labels, stride=STRIDE, overlay_max=OVERLAY_MAX)
    px = st["pixel_size_um"] or float(STRIDE)
    labels = {"clusters": st["labels"], "tissue": st["tissue"]}
    write_ome_zarr(
        out / "old.ome.zarr",
        st["image"],
        pixel_size_um=px,
        labels=labels,
        ngff_version="0.4",
        chunk=256,
        max_levels=8,
    )
    write_overlay_png(
        out / "old.png", st["overlay_image"], st["labels"], names=NAMES, title=meta["sample_id"]
    )


def new_outputs(store: Path, out: Path, meta: dict, tile_labels: np.ndarray) -> None:
    st = stitch_store(store, tile_labels, stride=STRIDE, image=False)
    write_sample_ome_zarr(out / "new.ome.zarr", store, meta, st, stride=STRIDE, names=NAMES)
    write_sample_overlay(
        out / "new.png", store, meta, st, stride=STRIDE, names=NAMES, title=meta["sample_id"]
    )


def measure(store: Path, out: Path, repeats: int) -> dict:
    meta = read_sample_meta(store)
    tile_labels = _tile_labels(meta)
    row = {"sample": meta["sample_id"], "tiles": int(meta["n_tiles"])}
    for name, fn in (("old", old_outputs), ("new", new_outputs)):
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn(store, out, meta, tile_labels)
            times.append(time.perf_counter() - t0)
        tracemalloc.start()
        fn(store, out, meta, tile_labels)
        row[f"{name}_peak_mb"] = tracemalloc.get_traced_memory()[1] / 2**20
        tracemalloc.stop()
        row[f"{name}_s"] = min(times)
        row[f"{name}_ome_kb"] = _size(out / f"{name}.ome.zarr") / 1024
        row[f"{name}_png_kb"] = _size(out / f"{name}.png") / 1024
    import zarr

    st = stitch_store(store, tile_labels, stride=STRIDE, image=False)
    tracemalloc.start()
    write_sample_ome_zarr(out / "new.ome.zarr", store, meta, st, stride=STRIDE, names=NAMES)
    row["new_ome_peak_mb"] = tracemalloc.get_traced_memory()[1] / 2**20
    tracemalloc.stop()
    row["plane_mb"] = float(np.prod(read_plane_shape(out / "new.ome.zarr"))) / 2**20
    row["new_shape"] = tuple(zarr.open_group(out / "new.ome.zarr", mode="r")["0"].shape[1:])
    row["old_shape"] = tuple(zarr.open_group(out / "old.ome.zarr", mode="r")["0"].shape[1:])
    return row


def read_plane_shape(path: Path) -> tuple[int, ...]:
    import zarr

    return tuple(zarr.open_group(path, mode="r")["0"].shape)


def synthetic_store(root: Path, n: int, *, rows: int | None = None, tile: int = 512, halo: int = 32) -> Path:
    """``rows`` (default ``n``) x ``n`` tiles of smooth colour with noise (compresses like tissue)."""
    rng = np.random.default_rng(0)
    side = tile + 2 * halo
    rows = rows or n
    coords = np.array([[c * tile, r * tile] for r in range(rows) for c in range(n)], np.int64)
    attrs = {
        "mpp": 2.5,
        "source_mpp": 0.25,
        "l0_per_l": [10.0, 10.0],
        "grid_shape": [rows, n],
        "kind": "slide",
        "source_dimensions": [n * tile * 10, rows * tile * 10],
    }
    yy, xx = np.mgrid[0:side, 0:side]
    total = rows * n
    with open_sample_for_write(root, "synthetic", n_tiles=total, tile=tile, halo=halo, attrs=attrs) as w:
        for start in range(0, total, 32):
            batch = []
            for i in range(start, min(start + 32, total)):
                base = np.stack([(xx + i * 7) % 256, (yy + i * 3) % 256, np.full_like(xx, 180)], axis=-1)
                noise = rng.integers(-12, 13, base.shape)
                batch.append(np.clip(base + noise, 0, 255).astype(np.uint8))
            w.write_tiles(start, np.stack(batch), coords[start : start + len(batch)])
    return root / "synthetic.zarr"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--synthetic", type=int, default=8, help="N: an N x N tile synthetic store (0: none)")
    ap.add_argument("--data", type=Path, default=data_dir())
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="equislide-bench-outputs-"))
    try:
        stores = []
        slides = args.data / "slides"
        for name, input_mpp in (("CMU-1-Small-Region.svs", None), ("TCGA-CR-7395-01A-01-TS1.svs", 0.5)):
            if (slides / name).is_file():
                stores += [r.store for r in tile_slide(slides / name, work / "tiles", input_mpp=input_mpp)]
            else:
                print(f"skip {name}: not in {slides}")
        if args.synthetic:
            stores.append(synthetic_store(work / "tiles", args.synthetic))
        print(
            "| sample | tiles | image old -> new px | old s | new s | new / old | OME-Zarr old -> new kB "
            "| PNG old -> new kB | peak traced MB old / new (new OME-Zarr alone; RGB plane) |"
        )
        print("|---|---|---|---|---|---|---|---|---|")
        for store in stores:
            out = work / "out" / Path(store).stem
            out.mkdir(parents=True)
            r = measure(Path(store), out, args.repeats)
            print(
                f"| {r['sample']} | {r['tiles']} | {r['old_shape'][0]}x{r['old_shape'][1]} -> "
                f"{r['new_shape'][0]}x{r['new_shape'][1]} | {r['old_s']:.3f} | {r['new_s']:.3f} "
                f"| {r['new_s'] / r['old_s']:.2f} | {r['old_ome_kb']:.0f} -> {r['new_ome_kb']:.0f} "
                f"| {r['old_png_kb']:.0f} -> {r['new_png_kb']:.0f} "
                f"| {r['old_peak_mb']:.0f} / {r['new_peak_mb']:.0f} ({r['new_ome_peak_mb']:.0f}; "
                f"{r['plane_mb']:.0f}) |",
                flush=True,
            )
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
