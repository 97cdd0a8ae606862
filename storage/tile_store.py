"""The per-sample zarr v3 tile store: layout, atomic writer, done-markers and readers.

One store per sample, ``<root>/<sample_id>.zarr`` (``<root>/tma01/B3.zarr`` for a TMA core)::

    <sample_id>.zarr/                 zarr v3 group; attrs["equislide"] holds the sample metadata
      zarr.json
      tiles/                          uint8 (n_tiles, T, T, 3), T = tile + 2 * halo; RGB, halo included
                                      chunk = 1 tile, shard = up to 32 tiles, zstd (level 3)
      coords/                         int64 (n_tiles, 2): (l_x, l_y) of each tile's *interior* top-left
                                      corner (halo excluded) in analysis-resolution pixels; the tile's
                                      first pixel (halo included) sits at (l_x - halo, l_y - halo)
      tissue_mask/                    uint8 (H, W), 1 = tissue, at thumbnail resolution;
                                      attrs["downsample"] = analysis px per mask px
      features/                       (reserved, written by a later stage) float16 arrays beside tiles
      _equislide_done.json            done-marker: format, sample_id, input sha256, parameters hash

The metadata in ``attrs["equislide"]``: ``format``, ``sample_id``, ``source_path``, ``source_sha256``,
``mpp`` (analysis), ``source_mpp``, ``tile``, ``halo``, ``tile_with_halo``, ``n_tiles``, ``grid_shape``
(tile rows, tile columns), ``coords`` (what the coordinates mean), ``params`` (the parameter dict, keys
sorted) and ``equislide_version``.

Writes are atomic per sample: a writer fills ``<id>.zarr.partial-<random>`` and renames it to
``<id>.zarr`` in :meth:`SampleWriter.finalize`, after writing the done-marker. A crash leaves only the
partial folder; readers ignore it and the next writer of that sample (or :func:`clean_partials`) removes
it. The finished store holds no timestamps or random names: the same input and parameters give
byte-identical files.

Open with plain zarr::

    import zarr
    g = zarr.open_group("out/tiles/tma01/B3.zarr", mode="r")
    meta = g.attrs["equislide"]
    tiles, coords = g["tiles"], g["coords"][:]         # tiles[i] -> (T, T, 3) uint8
    print(meta["mpp"], tiles.shape, tiles.chunks, tiles.shards)
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from equislide.files import publish_dir
from equislide.storage._errors import IncompleteSampleError, StoreLayoutError
from equislide.storage.confine import confined
from equislide.storage.hashing import canonical_json, params_hash
from equislide.storage.ids import STORE_SUFFIX, sample_store_path
from equislide.storage.ranges import covered, missing_ranges, read_done_ranges

if TYPE_CHECKING:
    import dask.array

__all__ = [
    "open_finished",
    "store_identity",
    "DONE_MARKER",
    "RANGES_DIR",
    "STORE_FORMAT",
    "RangedSampleStore",
    "SampleWriter",
    "clean_partials",
    "is_sample_done",
    "store_problem",
    "tile_shard_tiles",
    "open_sample_for_write",
    "open_sample_ranges",
    "ranged_partial_path",
    "open_tiles",
    "read_sample_meta",
]

#: Format tag written into the group attributes and the done-marker.
STORE_FORMAT = "equislide-tile-store/1"
#: Name of the done-marker file inside a finished store.
DONE_MARKER = "_equislide_done.json"
PARTIAL_TAG = ".partial-"
REPLACED_TAG = ".replaced-"
_SHARD_TILES = 32
_ZSTD_LEVEL = 3
#: A sample is cut into about this many tile-store shards (the finest ranges the tile stage can hand out).
_TARGET_SHARDS = 64
_MIN_SHARD_TILES = 4


def tile_shard_tiles(n_tiles: int) -> int:
    """Tiles per tile-store shard of a sample of ``n_tiles``: ``clip(ceil(n_tiles / 64), 4, 32)``.

    Two writers must never share a shard file, so the shard bounds how finely the tile stage can spread
    one sample: a whole slide at 2.5 µm/px is only ~50 tiles, and 32-tile shards gave it two tile units,
    the longer one on the run's critical path. Not down to 1 tile like the feature shards: a TMA cohort
    of small cores would hold a file per tile of 1 MB of RGB, and a 4-tile unit reads in well under a
    second.
    """
    return int(min(_SHARD_TILES, max(_MIN_SHARD_TILES, -(-int(n_tiles) // _TARGET_SHARDS))))


def _version() -> str:
    from equislide._version import __version__

    return __version__


def tile_compressors():
    from zarr.codecs import ZstdCodec

    return (ZstdCodec(level=_ZSTD_LEVEL, checksum=False),)


def _partials(final: Path) -> list[Path]:
    if not final.parent.is_dir():
        return []
    prefixes = (final.name + PARTIAL_TAG, final.name + REPLACED_TAG)
    return sorted(p for p in final.parent.iterdir() if p.name.startswith(prefixes))


def clean_partials(root: str | Path) -> list[Path]:
    """Remove every leftover partial store under ``root`` (crashed or interrupted writes), except the
    shared stores of range writers (:func:`ranged_partial_path`), which a rerun resumes.

    Call it when no writer is running on ``root`` (e.g. at the start of a run); a single writer only
    cleans the partials of its own sample.

    Returns:
        The removed folders, sorted.
    """
    root = Path(root)
    if not root.is_dir():
        return []

    def is_partial(p: Path) -> bool:
        return p.is_dir() and (STORE_SUFFIX + PARTIAL_TAG in p.name or STORE_SUFFIX + REPLACED_TAG in p.name)

    def is_ranged(p: Path) -> bool:
        # A shared range store is keyed by its input and parameters and resumes range by range: a rerun
        # after a kill keeps its finished ranges (its own opener removes one of another key).
        return STORE_SUFFIX + PARTIAL_TAG + _RANGED_TAG in p.name

    # Sample IDs have one or two parts, so partials sit in root or one folder below (never inside stores).
    level1 = [p for p in root.iterdir() if p.is_dir()]
    level2 = [
        c for d in level1 if not d.name.endswith(STORE_SUFFIX) and not is_partial(d) for c in d.iterdir()
    ]
    found = sorted(p for p in level1 + level2 if is_partial(p) and not is_ranged(p))
    for p in found:
        shutil.rmtree(p, ignore_errors=True)
    return found


class PartialWriter:
    """Lifecycle of the writers that fill ``partial_path`` and publish it (``publish_dir``).

    A clean ``with`` exit finalizes, an exception aborts; abort removes the partial folder and
    leaves any older published result untouched.
    """

    partial_path: Path
    _state: str

    def finalize(self) -> Path:
        raise NotImplementedError

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if self._state != "open":
            return
        if exc_type is None:
            self.finalize()
        else:
            self.abort()

    def abort(self) -> None:
        """Remove the partial folder; a published (older) result is left untouched."""
        if self._state == "open":
            shutil.rmtree(self.partial_path, ignore_errors=True)
            self._state = "aborted"


class SampleWriter(PartialWriter):
    """Writes one sample's store into a partial folder and publishes it atomically in :meth:`finalize`.

    Make one with :func:`open_sample_for_write`. Use it as a context manager: a clean exit finalizes, an
    exception removes the partial folder. A process that dies leaves the partial folder behind; it is
    never read and the next writer of the sample removes it.
    """

    def __init__(
        self,
        final_path: Path,
        partial_path: Path,
        sample_id: str,
        group: Any,
        *,
        n_tiles: int,
        tile_with_halo: int,
        input_sha256: str,
        params_sha256: str,
    ) -> None:
        self.path = final_path  #: the finished store, ``<root>/<sample_id>.zarr``
        self.partial_path = partial_path  #: the folder written into until :meth:`finalize`
        self.sample_id = sample_id
        self.n_tiles = n_tiles
        self.tile_with_halo = tile_with_halo
        self._group = group
        self._written = np.zeros(n_tiles, bool)
        self._coords_rows = np.zeros(n_tiles, bool)
        self._input_sha256 = input_sha256
        self._params_sha256 = params_sha256
        self._state = "open"

    def __repr__(self) -> str:
        return f"SampleWriter({str(self.path)!r}, n_tiles={self.n_tiles}, state={self._state!r})"

    def _check_open(self) -> None:
        if self._state != "open":
            raise RuntimeError(f"{self!r} is {self._state}; open a new writer with open_sample_for_write()")

    def write_tiles(self, start: int, tiles: np.ndarray, coords: np.ndarray | None = None) -> None:
        """Write a batch of tiles (and optionally their coordinates) starting at tile index ``start``.

        Batches that start on a multiple of 32 tiles write whole shards (fastest), but any order works.

        Args:
            start: Index of the batch's first tile.
            tiles: uint8 (k, T, T, 3), ``T = tile + 2 * halo``.
            coords: Optional int (k, 2) interior top-left corners (l_x, l_y), see the module docstring.

        Raises:
            ValueError: Wrong dtype, shape or range (the message names it).
        """
        self._check_open()
        tiles = np.asarray(tiles)
        t = self.tile_with_halo
        if tiles.dtype != np.uint8 or tiles.ndim != 4 or tiles.shape[1:] != (t, t, 3):
            raise ValueError(f"tiles must be uint8 (k, {t}, {t}, 3), got {tiles.dtype} {tiles.shape}")
        stop = start + tiles.shape[0]
        if not 0 <= start <= stop <= self.n_tiles:
            raise ValueError(f"tiles [{start}, {stop}) out of range for n_tiles={self.n_tiles}")
        self._group["tiles"][start:stop] = tiles
        self._written[start:stop] = True
        if coords is not None:
            self._write_coords(start, coords)

    def write_coords(self, coords: np.ndarray) -> None:
        """Write all tile coordinates at once: int (n_tiles, 2) interior top-left (l_x, l_y)."""
        self._check_open()
        coords = np.asarray(coords)
        if coords.shape != (self.n_tiles, 2):
            raise ValueError(f"coords must have shape ({self.n_tiles}, 2), got {coords.shape}")
        self._write_coords(0, coords)

    def _write_coords(self, start: int, coords: np.ndarray) -> None:
        coords = np.asarray(coords)
        if coords.ndim != 2 or coords.shape[1] != 2 or not np.issubdtype(coords.dtype, np.integer):
            raise ValueError(f"coords must be an integer (k, 2) array, got {coords.dtype} {coords.shape}")
        stop = start + coords.shape[0]
        if not 0 <= start <= stop <= self.n_tiles:
            raise ValueError(f"coords rows [{start}, {stop}) out of range for n_tiles={self.n_tiles}")
        self._group["coords"][start:stop] = coords.astype(np.int64)
        self._coords_rows[start:stop] = True

    def write_tissue_mask(self, mask: np.ndarray, *, downsample: float) -> None:
        """Write the tissue mask (nonzero = tissue) at thumbnail resolution.

        Args:
            mask: (H, W) bool or integer array.
            downsample: Analysis-resolution pixels per mask pixel (> 0).
        """
        self._check_open()
        mask = np.asarray(mask)
        if mask.ndim != 2:
            raise ValueError(f"tissue mask must be 2-D (H, W), got shape {mask.shape}")
        if not float(downsample) > 0:
            raise ValueError(f"downsample={downsample} must be > 0")
        if "tissue_mask" in self._group:
            del self._group["tissue_mask"]
        self._group.create_array(
            "tissue_mask",
            data=(mask != 0).astype(np.uint8),
            chunks=tuple(min(1024, max(1, s)) for s in mask.shape),
            compressors=tile_compressors(),
            attributes={"downsample": float(downsample), "values": {"0": "background", "1": "tissue"}},
        )

    def finalize(self) -> Path:
        """Write the done-marker and rename the partial folder to :attr:`path`; returns :attr:`path`.

        An existing store at :attr:`path` (an older result) is replaced.

        Raises:
            IncompleteSampleError: Some tiles or coordinates were never written.
        """
        self._check_open()
        missing = np.flatnonzero(~self._written)
        if missing.size:
            raise IncompleteSampleError(
                f"{self.sample_id}: {missing.size} of {self.n_tiles} tiles not written "
                f"(first: {missing[0]}); "
                "write them all before finalize(), or abort()"
            )
        if not self._coords_rows.all():
            raise IncompleteSampleError(
                f"{self.sample_id}: coordinates of {int((~self._coords_rows).sum())} tiles not written; "
                "pass coords to write_tiles() or call write_coords()"
            )
        marker = {
            "format": STORE_FORMAT,
            "sample_id": self.sample_id,
            "input_sha256": self._input_sha256,
            "params_sha256": self._params_sha256,
            "n_tiles": self.n_tiles,
        }
        publish_dir(self.partial_path, self.path, marker=(DONE_MARKER, marker), old_tag=REPLACED_TAG)
        self._state = "finalized"
        return self.path


def _validate_meta(meta: Mapping[str, Any]) -> None:
    for key in ("mpp", "source_mpp"):
        value = meta.get(key)
        if value is not None and not (isinstance(value, (int, float)) and value > 0):
            raise ValueError(f"attrs[{key!r}]={value!r} must be a positive number of µm per pixel or None")
    sha = meta.get("source_sha256")
    if sha is not None and (not isinstance(sha, str) or len(sha) != 64):
        raise ValueError(f"attrs['source_sha256']={sha!r} must be a 64-character hex SHA-256 (sha256_file())")
    grid = meta.get("grid_shape")
    if grid is not None and (len(grid) != 2 or any(int(g) < 0 for g in grid)):
        raise ValueError(f"attrs['grid_shape']={grid!r} must be (tile rows, tile columns)")


def open_sample_for_write(
    root: str | Path,
    sample_id: str,
    *,
    n_tiles: int,
    tile: int,
    halo: int = 0,
    attrs: Mapping[str, Any] | None = None,
    params: Mapping[str, Any] | None = None,
    input_sha256: str | None = None,
    shard_tiles: int = _SHARD_TILES,
) -> SampleWriter:
    """Start writing the store of one sample (into a partial folder; see :class:`SampleWriter`).

    Stale partial folders of the same sample are removed first.

    Args:
        root: Folder holding all stores of a run.
        sample_id: ``slide`` or ``slide/core`` (parts made with ``safe_sample_id``).
        n_tiles: Number of tiles.
        tile: Tile interior size in analysis-resolution pixels (square).
        halo: Extra pixels stored on every side (tiles are ``tile + 2 * halo`` square).
        attrs: Sample metadata stored under ``attrs["equislide"]``: ``source_path``, ``mpp`` (analysis),
            ``source_mpp``, ``grid_shape`` and anything else JSON-able. The store fills in ``format``,
            ``sample_id``, ``tile``, ``halo``, ``n_tiles``, ``params``, ``source_sha256`` and
            ``equislide_version``.
        params: The parameters that produced the tiles; their hash goes into the done-marker.
        input_sha256: SHA-256 of the input file (``sha256_file``); also ``attrs["source_sha256"]``.
        shard_tiles: Tiles per shard file.

    Returns:
        An open :class:`SampleWriter`.

    Raises:
        SampleIdError: ``sample_id`` is not safe.
        ValueError: A size or a metadata field is invalid (the message names it).
    """
    final = confined(root, sample_store_path(root, sample_id))
    plain_meta, t = _sample_meta(sample_id, n_tiles, tile, halo, shard_tiles, attrs, params, input_sha256)
    for stale in _partials(final):
        shutil.rmtree(stale, ignore_errors=True)
    final.parent.mkdir(parents=True, exist_ok=True)
    partial = final.with_name(final.name + PARTIAL_TAG + uuid.uuid4().hex[:12])
    group = _create_group(partial, plain_meta, n_tiles, t, shard_tiles)
    return SampleWriter(
        final,
        partial,
        sample_id,
        group,
        n_tiles=n_tiles,
        tile_with_halo=t,
        input_sha256=input_sha256 or "",
        params_sha256=params_hash(dict(params or {})),
    )


def _sample_meta(
    sample_id: str,
    n_tiles: int,
    tile: int,
    halo: int,
    shard_tiles: int,
    attrs: Mapping[str, Any] | None,
    params: Mapping[str, Any] | None,
    input_sha256: str | None,
) -> tuple[dict[str, Any], int]:
    """The validated, JSON-plain ``attrs["equislide"]`` of a store, and its tile side with halo."""
    if n_tiles < 0 or tile <= 0 or halo < 0 or shard_tiles <= 0:
        raise ValueError(
            f"need n_tiles >= 0, tile > 0, halo >= 0, shard_tiles > 0; got {n_tiles}, {tile}, {halo}, "
            f"{shard_tiles}"
        )
    params = dict(params or {})
    meta = dict(attrs or {})
    reserved = {
        "format",
        "sample_id",
        "tile",
        "halo",
        "tile_with_halo",
        "n_tiles",
        "params",
        "equislide_version",
    }
    clash = sorted(reserved & meta.keys())
    if clash:
        raise ValueError(f"attrs keys {clash} are filled in by the store; pass them as arguments instead")
    if input_sha256 is not None:
        meta["source_sha256"] = input_sha256
    t = tile + 2 * halo
    meta.update(
        format=STORE_FORMAT,
        sample_id=sample_id,
        tile=int(tile),
        halo=int(halo),
        tile_with_halo=int(t),
        n_tiles=int(n_tiles),
        coords="(l_x, l_y) of each tile's interior top-left corner, halo excluded, analysis-resolution px",
        params=params,
        equislide_version=_version(),
    )
    meta.setdefault("source_path", None)
    meta.setdefault("source_sha256", None)
    meta.setdefault("mpp", None)
    meta.setdefault("source_mpp", None)
    meta.setdefault("grid_shape", None)
    _validate_meta(meta)
    return json.loads(canonical_json(meta)), t  # JSON types only, keys sorted: deterministic files


def _create_group(path: Path, plain_meta: dict[str, Any], n_tiles: int, t: int, shard_tiles: int):
    """A new zarr group at ``path`` with the sample metadata and empty ``tiles`` and ``coords``."""
    import zarr

    group = zarr.open_group(zarr.storage.LocalStore(path), mode="w-", zarr_format=3)
    group.attrs["equislide"] = plain_meta
    n_chunk = max(n_tiles, 1)
    group.create_array(
        "tiles",
        shape=(n_tiles, t, t, 3),
        chunks=(1, t, t, 3),
        shards=(min(shard_tiles, n_chunk), t, t, 3),
        dtype="uint8",
        compressors=tile_compressors(),
        fill_value=0,
        dimension_names=("tile", "y", "x", "c"),
    )
    group.create_array(
        "coords",
        shape=(n_tiles, 2),
        chunks=(min(n_chunk, 65536), 2),
        dtype="int64",
        compressors=tile_compressors(),
        fill_value=0,
        dimension_names=("tile", "xy"),
    )
    return group


def is_sample_done(
    root: str | Path, sample_id: str, *, input_sha256: str | None, params: Mapping[str, Any] | None
) -> bool:
    """True when ``<root>/<sample_id>.zarr`` is finished for this exact input and these parameters.

    A partial folder never counts; a finished store made from another input or other parameters does not
    count either (the rerun rewrites it).
    """
    marker = sample_store_path(root, sample_id) / DONE_MARKER
    try:
        done = json.loads(marker.read_text())
    except (OSError, ValueError):
        return False
    return (
        done.get("format") == STORE_FORMAT
        and done.get("sample_id") == sample_id
        and done.get("input_sha256") == (input_sha256 or "")
        and done.get("params_sha256") == params_hash(dict(params or {}))
        and store_problem(sample_store_path(root, sample_id)) is None
    )


def store_problem(store_path: str | Path) -> str | None:
    """Why a store with a done-marker is not what the marker vouches for (None when it is): its group,
    ``tiles`` and ``coords`` must open, hold ``n_tiles`` rows and tiles of ``tile_with_halo`` px.

    Metadata only (no chunk is read): a store damaged by hand, a full disk or a concurrent run is
    then tiled again instead of failing every later stage and every rerun.
    """
    try:
        group, meta = open_finished(store_path)
        n, side = int(meta["n_tiles"]), int(meta["tile_with_halo"])
        tiles, coords = group["tiles"].shape, group["coords"].shape
    except Exception as err:  # noqa: BLE001 - any unreadable part means the same: tile it again
        return f"{type(err).__name__}: {err}"
    if tiles[:3] != (n, side, side) or coords[0] != n:
        return f"tiles {tiles} / coords {coords} do not match n_tiles={n}, tile_with_halo={side}"
    return None


def store_identity(store_path: str | Path) -> dict[str, Any]:
    """The identity of a finished tile store: its sample ID and the hashes of its done-marker.

    Keys of results made from a store (features, K-means draws, outputs) include it, so they go
    stale when the store is tiled again from other bytes or parameters. ``None`` values when the
    store has no readable done-marker.
    """
    from equislide.files import read_json

    done = read_json(Path(store_path) / DONE_MARKER) or {}
    return {
        "sample_id": done.get("sample_id"),
        "input_sha256": done.get("input_sha256"),
        "params_sha256": done.get("params_sha256"),
    }


def open_finished(store_path: str | Path):
    import zarr

    store_path = Path(store_path)
    if PARTIAL_TAG in store_path.name:
        raise StoreLayoutError(f"{store_path} is a partial (unfinished) store; rerun the tiling step")
    if not (store_path / DONE_MARKER).is_file():
        raise StoreLayoutError(f"{store_path} has no {DONE_MARKER}: not a finished equislide tile store")
    group = zarr.open_group(zarr.storage.LocalStore(store_path, read_only=True), mode="r")
    meta = group.attrs.get("equislide")
    if not isinstance(meta, Mapping) or meta.get("format") != STORE_FORMAT:
        raise StoreLayoutError(f"{store_path}: attrs['equislide']['format'] is not {STORE_FORMAT!r}")
    for name in ("tiles", "coords"):
        if name not in group:
            raise StoreLayoutError(f"{store_path}: array {name!r} is missing")
    return group, dict(meta)


def read_sample_meta(store_path: str | Path) -> dict[str, Any]:
    """The sample metadata of a finished store, plus ``tiles_shape``, ``tissue_mask_downsample`` and
    ``done`` (the done-marker's content).

    Raises:
        StoreLayoutError: Not a finished store of this format.
    """
    group, meta = open_finished(store_path)
    meta["tiles_shape"] = tuple(group["tiles"].shape)
    meta["tissue_mask_downsample"] = (
        group["tissue_mask"].attrs.get("downsample") if "tissue_mask" in group else None
    )
    meta["done"] = json.loads((Path(store_path) / DONE_MARKER).read_text())
    return meta


def open_tiles(store_path: str | Path, *, tiles_per_chunk: int = 1) -> dask.array.Array:
    """The tiles of a finished store as a lazy dask array (n_tiles, T, T, 3) uint8.

    Args:
        store_path: ``<root>/<sample_id>.zarr``.
        tiles_per_chunk: Tiles per dask chunk (1 = one zarr chunk each; a shard's worth reads fastest).

    Raises:
        StoreLayoutError: Not a finished store of this format.
    """
    import dask.array as da

    if tiles_per_chunk <= 0:
        raise ValueError(f"tiles_per_chunk={tiles_per_chunk} must be > 0")
    group, _ = open_finished(store_path)
    tiles = group["tiles"]
    chunks = (tiles_per_chunk, *tiles.shape[1:])
    return da.from_zarr(tiles, chunks=chunks)


#: Folder of per-range done files inside a ranged partial store (removed before publishing).
RANGES_DIR = "_ranges"
_RANGED_IDENTITY = "_ranged.json"
_RANGED_TAG = "ranges-"


def ranged_partial_path(
    root: str | Path, sample_id: str, *, input_sha256: str | None, params: Mapping[str, Any] | None
) -> Path:
    """The partial store that every range writer of this sample, input and parameters shares.

    Named ``<id>.zarr.partial-ranges-<key>``, ``key`` from the input's SHA-256 and the parameters'
    hash: processes of one run meet in one folder. Readers and :func:`open_sample_for_write` treat it
    as any other partial store; :func:`clean_partials` keeps it (a rerun resumes its ranges), and
    :func:`open_sample_ranges` removes one of another key.
    """
    final = confined(root, sample_store_path(root, sample_id))
    key = hashlib.sha256(f"{input_sha256 or ''}:{params_hash(dict(params or {}))}".encode()).hexdigest()
    return final.with_name(final.name + PARTIAL_TAG + _RANGED_TAG + key[:16])


class RangedSampleStore:
    """One sample's store written by ranges of whole shards, from any number of processes, in any order.

    Make one with :func:`open_sample_ranges`. Each :meth:`write_range` fills its shards and then writes
    ``_ranges/<start>-<stop>.json``; no two ranges share a shard, so writers never touch the same
    file. :meth:`publish` (once every tile is in a done range) removes the range bookkeeping, writes
    the tissue mask and the done-marker and renames the folder to :attr:`path`: the store is then
    byte-identical to one :class:`SampleWriter` writes from the same tiles.
    """

    def __init__(self, final_path: Path, partial_path: Path, identity: dict[str, Any]) -> None:
        self.path = final_path  #: the finished store, ``<root>/<sample_id>.zarr``
        self.partial_path = partial_path  #: the shared partial folder
        self.sample_id: str = identity["meta"]["sample_id"]
        self.n_tiles: int = int(identity["meta"]["n_tiles"])
        self.tile_with_halo: int = int(identity["meta"]["tile_with_halo"])
        self.shard_tiles: int = int(identity["shard_tiles"])
        self._identity = identity

    def __repr__(self) -> str:
        return f"RangedSampleStore({str(self.partial_path)!r}, n_tiles={self.n_tiles})"

    def _range_file(self, start: int, stop: int) -> Path:
        return self.partial_path / RANGES_DIR / f"{start}-{stop}.json"

    def check_range(self, start: int, stop: int) -> None:
        """Raise ``ValueError`` unless ``[start, stop)`` is a non-empty range of whole shards."""
        n, k = self.n_tiles, self.shard_tiles
        if not (0 <= start < stop <= n and start % k == 0 and (stop % k == 0 or stop == n)):
            raise ValueError(
                f"{self.sample_id}: tiles [{start}, {stop}) is not a range of whole {k}-tile shards "
                f"within n_tiles={n}"
            )

    def done_ranges(self) -> list[tuple[int, int]]:
        """The ranges whose done file is written, sorted."""
        return read_done_ranges(self.partial_path / RANGES_DIR)

    def is_range_done(self, start: int, stop: int) -> bool:
        """True when every tile of ``[start, stop)`` lies in a done range."""
        return covered(self.done_ranges(), start, stop)

    def missing(self) -> list[tuple[int, int]]:
        """Maximal ``[start, stop)`` intervals of tiles in no done range."""
        return missing_ranges(self.done_ranges(), self.n_tiles)

    def write_range(self, start: int, stop: int, tiles: np.ndarray) -> None:
        """Write tiles ``[start, stop)`` (whole shards) and mark the range done.

        Args:
            start: First tile, a multiple of ``shard_tiles``.
            stop: One past the last, a multiple of ``shard_tiles`` or ``n_tiles``.
            tiles: uint8 (stop - start, T, T, 3).
        """
        self.write_tiles(start, tiles)
        self.mark_done(start, stop)

    def write_tiles(self, start: int, tiles: np.ndarray) -> None:
        """Write whole shards of tiles from ``start`` (a part of a range; :meth:`mark_done` ends it)."""
        import zarr

        tiles = np.asarray(tiles)
        t = self.tile_with_halo
        if tiles.dtype != np.uint8 or tiles.ndim != 4 or tiles.shape[1:] != (t, t, 3):
            raise ValueError(f"tiles must be uint8 (k, {t}, {t}, 3), got {tiles.dtype} {tiles.shape}")
        self.check_range(start, start + len(tiles))
        group = zarr.open_group(zarr.storage.LocalStore(self.partial_path), mode="r+")
        group["tiles"][start : start + len(tiles)] = tiles

    def mark_done(self, start: int, stop: int) -> None:
        """Write the done file of ``[start, stop)``, atomically (after its tiles are on disk)."""
        self.check_range(start, stop)
        target = self._range_file(start, stop)
        target.parent.mkdir(exist_ok=True)
        tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex[:12]}")
        tmp.write_text(json.dumps({"start": start, "stop": stop, "n_tiles": self.n_tiles}) + "\n")
        os.replace(tmp, target)

    def publish(self, mask: np.ndarray, *, downsample: float) -> Path:
        """Write the tissue mask and the done-marker and publish the store; returns :attr:`path`.

        The first caller claims the folder by renaming it; a concurrent caller finds it gone.

        Raises:
            IncompleteSampleError: Some tiles are in no done range (the message names them), or
                another process is publishing the store.
        """
        import zarr

        missing = self.missing()
        if missing:
            shown = ", ".join(f"[{a}, {b})" for a, b in missing[:8]) + (" ..." if len(missing) > 8 else "")
            raise IncompleteSampleError(
                f"{self.sample_id}: tiles {shown} of {self.n_tiles} are in no finished range; "
                "write those ranges before publishing"
            )
        claim = self.partial_path.with_name(self.path.name + PARTIAL_TAG + uuid.uuid4().hex[:12])
        try:
            os.rename(self.partial_path, claim)
        except FileNotFoundError as err:
            raise IncompleteSampleError(
                f"{self.sample_id}: {self.partial_path.name} is gone: another process is publishing it"
            ) from err
        shutil.rmtree(claim / RANGES_DIR, ignore_errors=True)
        (claim / _RANGED_IDENTITY).unlink()
        group = zarr.open_group(zarr.storage.LocalStore(claim), mode="r+")
        writer = SampleWriter(
            self.path,
            claim,
            self.sample_id,
            group,
            n_tiles=self.n_tiles,
            tile_with_halo=self.tile_with_halo,
            input_sha256=self._identity["input_sha256"],
            params_sha256=self._identity["params_sha256"],
        )
        # Every tile is in a done range and the coordinates were written at creation.
        writer._written[:] = True
        writer._coords_rows[:] = True
        writer.write_tissue_mask(mask, downsample=downsample)
        return writer.finalize()


def open_sample_ranges(
    root: str | Path,
    sample_id: str,
    *,
    n_tiles: int,
    tile: int,
    halo: int = 0,
    coords: np.ndarray,
    attrs: Mapping[str, Any] | None = None,
    params: Mapping[str, Any] | None = None,
    input_sha256: str | None = None,
    shard_tiles: int = _SHARD_TILES,
) -> RangedSampleStore:
    """Create, or open, the shared partial store of a sample written by ranges (:class:`RangedSampleStore`).

    Idempotent across processes: the store is built in a private folder (metadata, arrays, all
    ``coords``) and renamed into place; a creator that loses the race opens the winner's. A partial
    store found with other metadata (another equislide version, a changed layout) is stale and is
    replaced.

    Args: as :func:`open_sample_for_write`, plus ``coords``: int (n_tiles, 2) interior top-left
        (l_x, l_y) of every tile, written once here.

    Raises:
        SampleIdError: ``sample_id`` is not safe.
        ValueError: A size, a metadata field or ``coords`` is invalid (the message names it).
    """
    final = confined(root, sample_store_path(root, sample_id))
    plain_meta, t = _sample_meta(sample_id, n_tiles, tile, halo, shard_tiles, attrs, params, input_sha256)
    coords = np.asarray(coords)
    if coords.shape != (n_tiles, 2) or not np.issubdtype(coords.dtype, np.integer):
        raise ValueError(f"coords must be an integer ({n_tiles}, 2) array, got {coords.dtype} {coords.shape}")
    coords = coords.astype(np.int64)
    identity = {
        "meta": plain_meta,
        "shard_tiles": int(shard_tiles),
        "coords_sha256": hashlib.sha256(np.ascontiguousarray(coords).tobytes()).hexdigest(),
        "input_sha256": input_sha256 or "",
        "params_sha256": params_hash(dict(params or {})),
    }
    partial = ranged_partial_path(root, sample_id, input_sha256=input_sha256, params=params)
    for other in _partials(final):  # a range store of other bytes or parameters: never resumed
        if PARTIAL_TAG + _RANGED_TAG in other.name and other != partial:
            shutil.rmtree(other, ignore_errors=True)
    for _ in range(3):
        try:
            found = json.loads((partial / _RANGED_IDENTITY).read_text())
        except (OSError, ValueError):
            found = None
        if found == identity:
            return RangedSampleStore(final, partial, identity)
        if found is not None or partial.exists():
            shutil.rmtree(partial, ignore_errors=True)  # stale: another layout or a broken folder
        final.parent.mkdir(parents=True, exist_ok=True)
        building = final.with_name(final.name + PARTIAL_TAG + uuid.uuid4().hex[:12])
        group = _create_group(building, plain_meta, n_tiles, t, shard_tiles)
        group["coords"][:] = coords
        (building / _RANGED_IDENTITY).write_text(json.dumps(identity, sort_keys=True) + "\n")
        try:
            os.rename(building, partial)
        except OSError:  # another creator won the race: open its store on the next pass
            shutil.rmtree(building, ignore_errors=True)
    raise StoreLayoutError(f"{partial}: could not create or open the ranged partial store")
