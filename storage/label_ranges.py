"""A sample's cluster labels written in tile ranges by several processes, then stitched a band at a time.

The segment stage of a large slide runs as many tasks over shard-aligned tile ranges (the feature
ranges). Each writes its tiles' cluster maps into one shared partial array and leaves a done file;
the call that finds every range done stitches the label map at feature resolution a band of rows at
a time (:func:`stitch_label_map`), so no process ever holds the whole map. Layout, a zarr v3 group::

    <out>/<sample>.segment.partial/
      tile_labels    uint16 (n_tiles, f, f), chunks (shard, f, f): a range writes whole chunks only,
                     so two processes never write the same chunk file
      done/<start>-<stop>.json
      labels, tissue the stitched maps (:func:`stitch_label_map`), chunks of :data:`MAP_CHUNK` px

``attrs["equislide"]["key"]`` is the segment key: a partial left by a run with another key (other
features, another K-means) is discarded, never mixed in.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np

from equislide.storage.labels import NO_TISSUE, _sample_mask, label_dtype, map_placement
from equislide.storage.ranges import covered, folder_lock, read_done_ranges

__all__ = ["MAP_CHUNK", "PARTIAL_SUFFIX", "RangeLabelWriter", "open_label_ranges", "stitch_label_map"]

#: ``<out>/<sample_id><PARTIAL_SUFFIX>``: the shared partial of a sample segmented in ranges.
PARTIAL_SUFFIX = ".segment.partial"
#: Chunk side of the stitched maps, px; also the rows per band they are stitched and read in.
MAP_CHUNK = 512


class RangeLabelWriter:
    """The shared per-tile label array of one sample: ranges written and marked done independently."""

    def __init__(self, path: Path, group: Any) -> None:
        self.path = path
        self.group = group
        self.tile_labels = group["tile_labels"]
        self.shard_tiles = int(self.tile_labels.chunks[0])
        self.n_tiles = int(self.tile_labels.shape[0])

    def __repr__(self) -> str:
        return f"RangeLabelWriter({str(self.path)!r}, n_tiles={self.n_tiles})"

    def write(self, start: int, labels: np.ndarray) -> None:
        """Tiles ``[start, start + len(labels))``; ``start`` on a chunk, the end on one or the last tile."""
        stop = start + len(labels)
        if start % self.shard_tiles or (stop % self.shard_tiles and stop != self.n_tiles):
            raise ValueError(
                f"{self.path}: tiles {start}-{stop} are not aligned to chunks of {self.shard_tiles} tiles"
            )
        self.tile_labels[start:stop] = labels

    def done_ranges(self) -> list[tuple[int, int]]:
        return read_done_ranges(self.path / "done")

    def is_done(self, start: int, stop: int) -> bool:
        return covered(self.done_ranges(), start, stop)

    def complete(self) -> bool:
        return self.n_tiles == 0 or self.is_done(0, self.n_tiles)

    def mark_done(self, start: int, stop: int) -> None:
        from equislide.files import atomic_write_json

        atomic_write_json(self.path / "done" / f"{int(start)}-{int(stop)}.json", {"tiles": [start, stop]})


def open_label_ranges(
    path: str | Path, *, n_tiles: int, f_tile: int, shard_tiles: int, key: str
) -> RangeLabelWriter:
    """Open (creating it, under a lock on its folder, when absent or of another ``key``) the partial.

    Args:
        path: ``<out>/<sample_id>.segment.partial``.
        n_tiles: Tiles of the sample.
        f_tile: Feature px per tile side.
        shard_tiles: Tiles per chunk: the feature shard, so a feature range is whole chunks.
        key: The segment key (:func:`equislide.storage.params_hash` of the stage's identity).
    """
    import zarr

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with folder_lock(path.parent):
        if path.exists():
            try:
                group = zarr.open_group(zarr.storage.LocalStore(path), mode="r+")
                if (group.attrs.get("equislide") or {}).get("key") == key and "tile_labels" in group:
                    return RangeLabelWriter(path, group)
            except Exception:  # noqa: BLE001 - an unreadable partial is rebuilt, like one of another key
                pass
            shutil.rmtree(path)
        group = zarr.open_group(zarr.storage.LocalStore(path), mode="w", zarr_format=3)
        group.create_array(
            "tile_labels",
            shape=(int(n_tiles), int(f_tile), int(f_tile)),
            chunks=(max(1, int(shard_tiles)), int(f_tile), int(f_tile)),
            dtype=np.uint16,
            fill_value=0,
        )
        (path / "done").mkdir()
        group.attrs["equislide"] = {"key": key, "n_tiles": int(n_tiles), "f_tile": int(f_tile)}
        return RangeLabelWriter(path, group)


def stitch_label_map(
    store_path: str | Path, tile_labels: Any, group: Any, *, stride: int, band_rows: int = MAP_CHUNK
) -> dict[str, Any]:
    """Stitch per-tile cluster maps into ``group["labels"]`` and ``group["tissue"]``, a band at a time.

    The same maps as :func:`~equislide.storage.stitch_store` (same origin, shape, dtype, tissue mask
    sampling, later tile winning where tiles overlap), but only ``band_rows`` rows of the map and the
    tiles that meet them are in memory at once; the arrays' chunks are ``band_rows`` high.

    Returns:
        :func:`~equislide.storage.stitch_store`'s dict with ``labels`` / ``tissue`` the zarr arrays
        (``image`` and ``overlay_image`` None), plus ``"label_counts"`` ``{value: px}`` and
        ``"values"`` ``{"clusters": [...], "tissue": [...]}`` (the values present, ascending).
    """
    from equislide.storage.tile_store import open_finished

    store_group, meta = open_finished(store_path)
    coords = np.asarray(store_group["coords"][:], dtype=np.int64)
    n = len(coords)
    fh, fw = (int(v) for v in tile_labels.shape[1:])
    l_origin = (int(coords[:, 0].min()), int(coords[:, 1].min())) if n else (0, 0)
    f_xy = (coords - np.asarray(l_origin, dtype=np.int64)) // stride
    if n and ((coords - np.asarray(l_origin)) % stride).any():
        raise ValueError(f"{store_path}: tile coordinates are not multiples of stride={stride}")
    shape = (int(f_xy[:, 1].max() + fh) if n else 0, int(f_xy[:, 0].max() + fw) if n else 0)
    top = 0
    for s0 in range(0, n, int(tile_labels.chunks[0])):  # the label dtype needs the largest value first
        top = max(top, int(np.asarray(tile_labels[s0 : s0 + int(tile_labels.chunks[0])]).max()) + 1)
    dtype = label_dtype(max(top, 1)) if n else label_dtype(1)
    mask = down = None
    if "tissue_mask" in store_group:
        mask = np.asarray(store_group["tissue_mask"][:]) != 0
        down = float(store_group["tissue_mask"].attrs["downsample"])
    mask_origin = tuple(meta.get("tissue_mask_l_origin") or (0.0, 0.0))
    rel = (float(mask_origin[0]) - l_origin[0], float(mask_origin[1]) - l_origin[1])
    band_rows = max(1, int(band_rows))
    # A band is one chunk row, and readers take a band per chunk row; columns in chunks of MAP_CHUNK or
    # more, so that thin bands do not make a file per few pixels.
    chunks = (max(1, min(band_rows, shape[0])), max(1, min(max(band_rows, MAP_CHUNK), shape[1])))
    for name in ("labels", "tissue"):
        if name in group:
            del group[name]
    labels = group.create_array(
        "labels", shape=shape, chunks=chunks, dtype=dtype, fill_value=NO_TISSUE, overwrite=True
    )
    tissue = group.create_array(
        "tissue", shape=shape, chunks=chunks, dtype=np.uint8, fill_value=NO_TISSUE, overwrite=True
    )
    counts: dict[int, int] = {}
    tissue_values: set[int] = set()
    for r0 in range(0, shape[0], band_rows):
        r1 = min(r0 + band_rows, shape[0])
        band = np.full((r1 - r0, shape[1]), NO_TISSUE, dtype)
        on = np.zeros((r1 - r0, shape[1]), np.uint8)
        hit = np.flatnonzero((f_xy[:, 1] < r1) & (f_xy[:, 1] + fh > r0))
        for i in hit:  # in tile order: where tiles overlap, the later one wins, as in stitch_labels
            fx, fy = int(f_xy[i, 0]), int(f_xy[i, 1])
            ya, yb = max(fy, r0), min(fy + fh, r1)
            x1 = min(fx + fw, shape[1])
            block = np.asarray(tile_labels[int(i), ya - fy : yb - fy, : x1 - fx])
            band[ya - r0 : yb - r0, fx:x1] = np.where(block >= 0, block + 1, NO_TISSUE)
            on[ya - r0 : yb - r0, fx:x1] = 1
        if mask is not None:
            # The band's own origin: its first row lies r0 feature rows below the map's.
            off = ~_sample_mask(mask, band.shape, stride, down, (rel[0], rel[1] - r0 * stride))
            band[off] = NO_TISSUE
            on[off] = NO_TISSUE
        labels[r0:r1] = band
        tissue[r0:r1] = on
        values, cnt = np.unique(band, return_counts=True)
        for v, c in zip(values.tolist(), cnt.tolist(), strict=True):
            counts[v] = counts.get(v, 0) + c
        tissue_values |= set(np.unique(on).tolist())
    return {
        "labels": labels,
        "tissue": tissue,
        "image": None,
        "overlay_image": None,
        **map_placement(meta, l_origin, stride),
        "label_counts": dict(sorted(counts.items())),
        "values": {"clusters": sorted(counts), "tissue": sorted(tissue_values)},
    }
