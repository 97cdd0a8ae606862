"""Feature arrays beside the tiles in a finished per-sample store, written atomically in place.

Layout inside ``<root>/<sample_id>.zarr`` (see :mod:`equislide.storage.tile_store`)::

    features/                       zarr v3 group
      layer{L}/                     float16 (n_tiles, C, f_h, f_w): the features of tile i's interior
                                    (halo cropped), f_h = f_w = tile / stride; chunk = 1 tile,
                                    shard = up to 32 tiles, zstd level 3;
                                    dimension names ("tile", "c", "y", "x")
        zarr.json                   attrs["equislide_features"]: see below
        _equislide_features_done.json   done-marker (format, sample_id, layer, params_sha256,
                                    the tile store's input/params hashes, n_tiles)

``attrs["equislide_features"]``: ``format`` (``equislide-features/1``), ``backbone``, ``layer``,
``stride`` (analysis px per feature px), ``halo_cropped`` (analysis px cut from each side),
``f_tile`` (feature px per tile side), ``channels``, ``normalisation``, ``weights``
(``"sha256:<hex>"`` or ``"random(seed=S)"``), ``params`` (the parameter dict that produced them) and
``params_sha256``.

The tile store is finished (renamed) before features are computed, so features are written *in place*:
the array is filled under ``features/layer{L}.partial-<random>`` with its done-marker inside, then renamed
to ``features/layer{L}`` (an older array of that layer is moved aside first and removed). A crash
leaves only the partial folder, which readers ignore and the next writer of that layer removes. A store
whose tiles are done but whose features are not is simply resumable: :func:`is_features_done` is false.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from equislide.files import publish_dir
from equislide.storage._errors import IncompleteSampleError, StoreLayoutError
from equislide.storage.confine import confined
from equislide.storage.hashing import canonical_json, params_hash
from equislide.storage.ranges import covered, folder_lock, missing_ranges, read_done_ranges
from equislide.storage.tile_store import (
    DONE_MARKER,
    PARTIAL_TAG,
    REPLACED_TAG,
    PartialWriter,
    open_finished,
    tile_compressors,
)

if TYPE_CHECKING:
    import dask.array

__all__ = [
    "RANGES_DIR",
    "RangeFeatureWriter",
    "done_feature_ranges",
    "feature_shard_tiles",
    "features_key",
    "FEATURES_DONE_MARKER",
    "FEATURES_FORMAT",
    "FeatureWriter",
    "FeaturesPublished",
    "features_path",
    "features_problem",
    "is_features_done",
    "open_features",
    "open_feature_ranges",
    "open_features_for_write",
    "publish_feature_ranges",
    "read_features_meta",
    "shared_partial_path",
]

#: Format tag of a feature array (attrs and done-marker).
FEATURES_FORMAT = "equislide-features/1"
#: Done-marker file inside a finished ``features/layer{L}`` folder.
FEATURES_DONE_MARKER = "_equislide_features_done.json"
_FLOAT16_MAX = float(np.finfo(np.float16).max)
_SHARD_TILES = 32
_REQUIRED_ATTRS = ("backbone", "stride", "halo_cropped", "normalisation", "weights")


def _array_name(layer: int) -> str:
    if layer not in (1, 2, 3, 4):
        raise ValueError(f"layer={layer!r} must be 1, 2, 3 or 4")
    return f"layer{layer}"


def features_path(store_path: str | Path, layer: int) -> Path:
    """Folder of the finished feature array ``<store>/features/layer{layer}``."""
    return Path(store_path) / "features" / _array_name(layer)


def _stale(folder: Path, name: str) -> list[Path]:
    if not folder.is_dir():
        return []
    prefixes = (name + PARTIAL_TAG, name + REPLACED_TAG)
    return sorted(p for p in folder.iterdir() if p.name.startswith(prefixes))


def _checked(features: Any, start: int, channels: int, f_tile: int, n_tiles: int) -> np.ndarray:
    """``features`` of tiles ``[start, start + k)`` as float16, refused when float16 cannot hold them."""
    arr = np.asarray(features)
    want = (channels, f_tile, f_tile)
    if arr.ndim != 4 or arr.shape[1:] != want or not np.issubdtype(arr.dtype, np.floating):
        raise ValueError(
            f"features must be float (k, {', '.join(map(str, want))}), got {arr.dtype} {arr.shape}"
        )
    stop = start + arr.shape[0]
    if not 0 <= start <= stop <= n_tiles:
        raise ValueError(f"features [{start}, {stop}) out of range for n_tiles={n_tiles}")
    if not np.isfinite(arr).all():
        raise ValueError(f"features of tiles [{start}, {stop}) contain NaN or inf; refusing to store them")
    peak = float(np.abs(arr).max()) if arr.size else 0.0
    if peak > _FLOAT16_MAX:
        raise ValueError(
            f"features of tiles [{start}, {stop}) reach {peak:.3g} > {_FLOAT16_MAX:g} (float16 max); "
            "recalibrate BatchNorm (equislide.models.prepare_backbone(..., calibration_tiles=...))"
        )
    return arr.astype(np.float16)


class FeatureWriter(PartialWriter):
    """Fills one ``features/layer{L}`` array under a partial name and publishes it in :meth:`finalize`.

    Make one with :func:`open_features_for_write`; use it as a context manager (a clean exit finalizes,
    an exception aborts).
    """

    def __init__(
        self,
        store_path: Path,
        layer: int,
        partial_path: Path,
        array: Any,
        marker: dict[str, Any],
    ) -> None:
        self.store_path = store_path  #: the finished tile store
        self.layer = layer
        self.path = features_path(store_path, layer)  #: the published array folder
        self.partial_path = partial_path  #: the folder written into until :meth:`finalize`
        self._array = array
        self._marker = marker
        self.n_tiles, self.channels, self.f_tile = (
            int(array.shape[0]),
            int(array.shape[1]),
            int(array.shape[2]),
        )
        self._written = np.zeros(self.n_tiles, bool)
        self._state = "open"

    def __repr__(self) -> str:
        return f"FeatureWriter({str(self.path)!r}, n_tiles={self.n_tiles}, state={self._state!r})"

    def write(self, start: int, features: np.ndarray) -> None:
        """Write features of tiles ``[start, start + k)``.

        Args:
            start: Index of the first tile (a multiple of 32 writes whole shards, fastest).
            features: float ``(k, C, f_tile, f_tile)``; float32 is cast to float16 here after checking
                that every value is finite and within float16's range.

        Raises:
            ValueError: Wrong shape/dtype, out of range, or values float16 cannot hold (NaN, inf,
                ``|x| > 65504``): recalibrate the backbone's BatchNorm rather than store them.
        """
        if self._state != "open":
            raise RuntimeError(f"{self!r} is {self._state}; open a new writer with open_features_for_write()")
        arr = _checked(features, start, self.channels, self.f_tile, self.n_tiles)
        stop = start + arr.shape[0]
        self._array[start:stop] = arr
        self._written[start:stop] = True

    def finalize(self) -> Path:
        """Write the done-marker into the partial array and rename it to :attr:`path`; returns it.

        Raises:
            IncompleteSampleError: Some tiles' features were never written.
        """
        if self._state != "open":
            raise RuntimeError(f"{self!r} is {self._state}")
        missing = np.flatnonzero(~self._written)
        if missing.size:
            raise IncompleteSampleError(
                f"{self.store_path}: features of {missing.size} of {self.n_tiles} tiles not written "
                f"(first: {missing[0]}); write them all before finalize(), or abort()"
            )
        marker = (FEATURES_DONE_MARKER, self._marker)
        publish_dir(self.partial_path, self.path, marker=marker, old_tag=REPLACED_TAG)
        self._state = "finalized"
        return self.path


def _layout(
    store_path: Path,
    layer: int,
    channels: int,
    f_tile: int,
    attrs: Mapping[str, Any],
    params: Mapping[str, Any] | None,
) -> tuple[int, dict[str, Any], dict[str, Any]]:
    """Checks shared by both writers; ``(n_tiles, array attrs, done-marker)``."""
    group, meta = open_finished(store_path)
    _array_name(layer)
    if channels <= 0 or f_tile <= 0:
        raise ValueError(f"need channels, f_tile > 0; got {channels}, {f_tile}")
    missing = [k for k in _REQUIRED_ATTRS if k not in attrs]
    if missing:
        raise ValueError(f"feature attrs {missing} are missing; pass the info of prepare_backbone()")
    stride = attrs["stride"]
    if not isinstance(stride, int) or stride <= 0:
        raise ValueError(f"attrs['stride']={stride!r} must be a positive int")
    if int(meta["tile"]) != f_tile * stride:
        raise ValueError(f"f_tile={f_tile} x stride={stride} != the store's tile={meta['tile']} px")
    if attrs["halo_cropped"] != meta["halo"]:
        raise ValueError(
            f"attrs['halo_cropped']={attrs['halo_cropped']!r} != the store's halo={meta['halo']}"
        )
    params = dict(params or {})
    p_hash = params_hash(params)
    n_tiles = int(group["tiles"].shape[0])
    info = dict(attrs)
    info.update(
        format=FEATURES_FORMAT,
        layer=int(layer),
        channels=int(channels),
        f_tile=int(f_tile),
        params=params,
        params_sha256=p_hash,
    )
    plain = json.loads(canonical_json(info))
    return n_tiles, plain, _store_marker(store_path, layer, params, meta, n_tiles)


def _store_marker(
    store_path: Path, layer: int, params: Mapping[str, Any], meta: Mapping[str, Any], n_tiles: int
) -> dict[str, Any]:
    """The features' done-marker: what they were made from (parameters and the store's tiles)."""
    done = json.loads((store_path / DONE_MARKER).read_text())
    return {
        "format": FEATURES_FORMAT,
        "sample_id": meta["sample_id"],
        "layer": int(layer),
        "params_sha256": params_hash(dict(params)),
        "tiles_input_sha256": done.get("input_sha256"),
        "tiles_params_sha256": done.get("params_sha256"),
        "n_tiles": n_tiles,
    }


def _create_array(
    feats: Any, name: str, n_tiles: int, channels: int, f_tile: int, shard_tiles: int, plain: dict
) -> Any:
    """The float16 feature array both writers fill: chunk = 1 tile, shard = ``shard_tiles`` tiles."""
    return feats.create_array(
        name,
        shape=(n_tiles, channels, f_tile, f_tile),
        chunks=(1, channels, f_tile, f_tile),
        shards=(min(shard_tiles, max(n_tiles, 1)), channels, f_tile, f_tile),
        dtype="float16",
        compressors=tile_compressors(),
        fill_value=0,
        dimension_names=("tile", "c", "y", "x"),
        attributes={"equislide_features": plain},
    )


def open_features_for_write(
    store_path: str | Path,
    layer: int,
    *,
    channels: int,
    f_tile: int,
    attrs: Mapping[str, Any],
    params: Mapping[str, Any] | None = None,
    shard_tiles: int = _SHARD_TILES,
) -> FeatureWriter:
    """Start writing ``features/layer{layer}`` of a finished tile store (see the module docstring).

    Args:
        store_path: ``<root>/<sample_id>.zarr``, finished (it has its done-marker).
        layer: Backbone stage 1-4.
        channels: Feature channels C.
        f_tile: Feature pixels per tile side (``tile / stride``).
        attrs: Must hold ``backbone``, ``stride``, ``halo_cropped``, ``normalisation`` and ``weights``
            (the ``info`` of ``equislide.models.prepare_backbone`` has them, ``halo_cropped`` = the store's
            halo); anything else JSON-able is kept.
        params: Parameters that produced the features; their hash keys the done-marker.
        shard_tiles: Tiles per shard file.

    Returns:
        An open :class:`FeatureWriter`.

    Raises:
        StoreLayoutError: ``store_path`` is not a finished tile store.
        ValueError: A size or metadata field is invalid (the message names it).
    """
    store_path = Path(store_path)
    name = _array_name(layer)
    if shard_tiles <= 0:
        raise ValueError(f"need shard_tiles > 0; got {shard_tiles}")
    n_tiles, plain, marker = _layout(store_path, layer, channels, f_tile, attrs, params)

    import zarr

    # Written into the existing tile store: a symlink planted inside it must not lead elsewhere.
    folder = confined(store_path, store_path / "features")
    for stale in _stale(folder, name):
        shutil.rmtree(stale, ignore_errors=True)
    root = zarr.open_group(zarr.storage.LocalStore(store_path), mode="r+")
    feats = root.require_group("features")
    partial_name = name + PARTIAL_TAG + uuid.uuid4().hex[:12]
    array = _create_array(feats, partial_name, n_tiles, channels, f_tile, shard_tiles, plain)
    return FeatureWriter(store_path, int(layer), folder / partial_name, array, marker)


#: Folder inside a shared partial array holding one done file per finished tile range.
RANGES_DIR = "_equislide_ranges"
#: Shards a sample's tiles are cut into at most (see :func:`feature_shard_tiles`).
_TARGET_SHARDS = 64
_MIN_SHARD_TILES = 1


class FeaturesPublished(RuntimeError):
    """:func:`open_feature_ranges` found the layer already published from the same parameters."""


def feature_shard_tiles(n_tiles: int) -> int:
    """Tiles per feature shard of a sample of ``n_tiles``: ``clip(ceil(n_tiles / 64), 1, 32)``.

    A shard file is the unit two writers must never share, so it bounds how finely a sample's features
    can be spread over workers: 64 shards give a sample of a few hundred tiles 64 ranges to hand out
    (>= 16 wanted), while a whole slide keeps the 32-tile shards that stream fastest (one file read per
    32 tiles) and a shard count its file system copes with. Down to 1 tile: a whole slide at 2.5 µm/px
    is only ~50 tiles of seconds of SRENet each, and 4-tile shards put 4 tiles' forward passes on the
    critical path. A forward pass never straddles a shard, so such samples run batches of 1; on CPU
    that costs no more per tile than batches of 4 (SRENet-18, one thread, measured) and gives the same
    bytes.
    """
    return int(min(_SHARD_TILES, max(_MIN_SHARD_TILES, -(-int(n_tiles) // _TARGET_SHARDS))))


def _key(marker: Mapping[str, Any]) -> str:
    """Names the shared partial of these parameters and these tiles (a retiled store gets a new one)."""
    return params_hash(
        {k: marker[k] for k in ("params_sha256", "tiles_input_sha256", "tiles_params_sha256", "layer")}
    )[:16]


def _range_name(start: int, stop: int) -> str:
    return f"{start:012d}-{stop:012d}.json"


def _read_ranges(partial: Path) -> list[tuple[int, int]]:
    return read_done_ranges(partial / RANGES_DIR)


@contextlib.contextmanager
def _layer_lock(folder: Path) -> Iterator[None]:
    """Serialises creating and publishing a layer's shared partial among the processes filling it
    (an ``flock`` on the ``features`` folder itself: a lock file would sit in the zarr group as an
    object zarr does not recognise, and warns about)."""
    folder.mkdir(parents=True, exist_ok=True)
    with folder_lock(folder):
        yield


class RangeFeatureWriter:
    """One layer's feature array filled by several processes at once, a shard-aligned tile range each.

    Make one with :func:`open_feature_ranges` (every process gets the same partial folder
    ``features/layer{L}.partial-<key>``, keyed by the parameters and the tiles). Each range is written
    whole shards at a time (so no two writers touch one shard file) and then marked done with a file
    in ``_equislide_ranges/``; :meth:`publish` renames the array into place once every tile is covered.
    A process killed mid-range leaves shard files but no done file, so the range is simply written again.
    """

    def __init__(self, store_path: Path, layer: int, partial_path: Path, array: Any, marker: dict) -> None:
        self.store_path = store_path
        self.layer = layer
        self.path = features_path(store_path, layer)  #: the published array folder
        self.partial_path = partial_path  #: the shared folder written into until :meth:`publish`
        self._array = array
        self._marker = marker
        self.n_tiles, self.channels, self.f_tile = (int(v) for v in array.shape[:3])
        self.shard_tiles = int(array.shards[0])
        self._written = np.zeros(self.n_tiles, bool)

    def __repr__(self) -> str:
        return f"RangeFeatureWriter({str(self.partial_path)!r}, n_tiles={self.n_tiles})"

    def _aligned(self, start: int, stop: int) -> None:
        s = self.shard_tiles
        ends_shard = stop % s == 0 or stop == self.n_tiles
        if not (0 <= start <= stop <= self.n_tiles and start % s == 0 and ends_shard):
            raise ValueError(
                f"{self.store_path}: tiles [{start}, {stop}) are not whole shards of {s} tiles "
                f"within n_tiles={self.n_tiles}"
            )

    def write(self, start: int, features: np.ndarray) -> None:
        """Write the features of whole shards of tiles ``[start, start + k)`` (checked as
        :meth:`FeatureWriter.write` checks them)."""
        arr = _checked(features, start, self.channels, self.f_tile, self.n_tiles)
        stop = start + arr.shape[0]
        self._aligned(start, stop)
        self._array[start:stop] = arr
        self._written[start:stop] = True

    def mark_done(self, start: int, stop: int) -> None:
        """Record that tiles ``[start, stop)`` are written (by this writer: refused otherwise)."""
        from equislide.files import atomic_write_json

        self._aligned(start, stop)
        if not self._written[start:stop].all():
            raise IncompleteSampleError(f"{self.store_path}: tiles [{start}, {stop}) were not written here")
        atomic_write_json(
            self.partial_path / RANGES_DIR / _range_name(start, stop), {"start": start, "stop": stop}
        )

    def done_ranges(self) -> list[tuple[int, int]]:
        """The ranges marked done so far (by any process), sorted."""
        return _read_ranges(self.partial_path)

    def is_done(self, start: int, stop: int) -> bool:
        """Every tile of ``[start, stop)`` is in a range marked done."""
        return covered(self.done_ranges(), start, stop)

    def missing(self) -> list[tuple[int, int]]:
        """The runs of tiles no done range covers yet."""
        return missing_ranges(self.done_ranges(), self.n_tiles)

    def publish(self) -> Path:
        """Done-marker, then rename into :attr:`path`, once every tile's range is done; returns it.

        Another process publishing the same array at the same time is waited for (a lock), and then
        this call returns the path it published.

        Raises:
            IncompleteSampleError: Some ranges are not done; the message names them.
        """
        folder = self.partial_path.parent
        with _layer_lock(folder):
            if not self.partial_path.is_dir() and is_features_done(
                self.store_path, self.layer, params=self._marker["params"]
            ):
                return self.path
            gaps = self.missing()
            if gaps:
                shown = ", ".join(f"[{a}, {b})" for a, b in gaps[:4]) + (" ..." if len(gaps) > 4 else "")
                todo = sum(b - a for a, b in gaps)
                raise IncompleteSampleError(
                    f"{self.store_path}: features of {todo} of {self.n_tiles} tiles not done "
                    f"(tiles {shown}); extract those ranges before publishing"
                )
            # Done files are bookkeeping of the fill, not part of the array: the published folder is
            # byte-identical to one written by a single process.
            shutil.rmtree(self.partial_path / RANGES_DIR, ignore_errors=True)
            marker = {k: v for k, v in self._marker.items() if k != "params"}
            done = (FEATURES_DONE_MARKER, marker)
            publish_dir(self.partial_path, self.path, marker=done, old_tag=REPLACED_TAG)
            return self.path


def shared_partial_path(
    store_path: str | Path, layer: int, *, params: Mapping[str, Any] | None
) -> Path | None:
    """The shared partial folder :func:`open_feature_ranges` fills for these parameters and the store's
    current tiles (None when the store is not finished); it need not exist."""
    store_path = Path(store_path)
    try:
        done = json.loads((store_path / DONE_MARKER).read_text())
    except (OSError, ValueError):
        return None
    marker = {
        "params_sha256": params_hash(dict(params or {})),
        "tiles_input_sha256": done.get("input_sha256"),
        "tiles_params_sha256": done.get("params_sha256"),
        "layer": int(layer),
    }
    name = _array_name(layer)
    return store_path / "features" / f"{name}{PARTIAL_TAG}{_key(marker)}"


def done_feature_ranges(
    store_path: str | Path, layer: int, *, params: Mapping[str, Any] | None
) -> list[tuple[int, int]]:
    """The tile ranges marked done in the shared partial of these parameters (``[]`` when there is none;
    a published array has no partial left: ask :func:`is_features_done`)."""
    partial = shared_partial_path(store_path, layer, params=params)
    return [] if partial is None else _read_ranges(partial)


def publish_feature_ranges(store_path: str | Path, layer: int, *, params: Mapping[str, Any] | None) -> Path:
    """Publish the shared partial of these parameters (see :meth:`RangeFeatureWriter.publish`) without
    the network that made it: its metadata is already in the partial array. A finished array is
    returned as it is.

    Raises:
        IncompleteSampleError: No range, or not every range, is done (the message names the missing tiles).
    """
    import zarr

    store_path = Path(store_path)
    params = dict(params or {})
    if is_features_done(store_path, layer, params=params):
        return features_path(store_path, layer)
    group, meta = open_finished(store_path)
    n_tiles = int(group["tiles"].shape[0])
    partial = shared_partial_path(store_path, layer, params=params)
    if partial is None or not partial.is_dir():
        raise IncompleteSampleError(
            f"{store_path}: features of {n_tiles} of {n_tiles} tiles not done (no range written yet); "
            "extract those ranges before publishing"
        )
    array = zarr.open_array(zarr.storage.LocalStore(partial), mode="r+")
    marker = {**_store_marker(store_path, layer, params, meta, n_tiles), "params": params}
    return RangeFeatureWriter(store_path, int(layer), partial, array, marker).publish()


def open_feature_ranges(
    store_path: str | Path,
    layer: int,
    *,
    channels: int,
    f_tile: int,
    attrs: Mapping[str, Any],
    params: Mapping[str, Any] | None = None,
    shard_tiles: int | None = None,
) -> RangeFeatureWriter:
    """Open (or create) the shared partial array of ``features/layer{layer}`` for range writers.

    Every process filling the layer calls this with the same arguments and gets the same folder:
    created once (under a lock), reopened when its metadata is identical, recreated when not;
    partial arrays of other parameters or of an older tiling are removed. Arguments as
    :func:`open_features_for_write`; ``shard_tiles`` defaults to :func:`feature_shard_tiles`.

    Raises:
        FeaturesPublished: The layer is already published from these parameters: nothing to fill.
        StoreLayoutError: ``store_path`` is not a finished tile store.
        ValueError: A size or metadata field is invalid (the message names it).
    """
    store_path = Path(store_path)
    name = _array_name(layer)
    n_tiles, plain, marker = _layout(store_path, layer, channels, f_tile, attrs, params)
    shard = feature_shard_tiles(n_tiles) if shard_tiles is None else int(shard_tiles)
    if shard <= 0:
        raise ValueError(f"need shard_tiles > 0; got {shard}")
    shards = (min(shard, max(n_tiles, 1)), channels, f_tile, f_tile)
    shape = (n_tiles, channels, f_tile, f_tile)

    import zarr

    folder = confined(store_path, store_path / "features")
    partial_name = f"{name}{PARTIAL_TAG}{_key(marker)}"
    with _layer_lock(folder):
        if is_features_done(store_path, layer, params=params):
            # A late writer (a task run twice) must not start a partial nobody will publish.
            raise FeaturesPublished(f"{store_path}: features/{name} of these parameters are published")
        for stale in _stale(folder, name):
            if stale.name != partial_name:
                shutil.rmtree(stale, ignore_errors=True)
        root = zarr.open_group(zarr.storage.LocalStore(store_path), mode="r+")
        feats = root.require_group("features")
        array = None
        if (folder / partial_name).is_dir():
            try:
                found = feats[partial_name]
                same = (
                    tuple(found.shape) == shape
                    and tuple(found.shards or ()) == shards
                    and found.attrs.get("equislide_features") == plain
                )
            except Exception:  # noqa: BLE001 - an unreadable partial is one more stale partial
                same = False
            if same:
                array = found
            else:
                shutil.rmtree(folder / partial_name, ignore_errors=True)
        if array is None:
            array = _create_array(feats, partial_name, n_tiles, channels, f_tile, shard, plain)
    return RangeFeatureWriter(
        store_path, int(layer), folder / partial_name, array, {**marker, "params": dict(params or {})}
    )


def _done_marker(store_path: Path, layer: int) -> dict[str, Any] | None:
    try:
        return json.loads((features_path(store_path, layer) / FEATURES_DONE_MARKER).read_text())
    except (OSError, ValueError):
        return None


def is_features_done(store_path: str | Path, layer: int, *, params: Mapping[str, Any] | None) -> bool:
    """True when ``features/layer{layer}`` is finished, from these parameters, for the current tiles.

    False for a store without features (tiles done, features not: resume), for a partial array, for
    features made with other parameters, and for features of an older tiling of the sample.
    """
    store_path = Path(store_path)
    marker = _done_marker(store_path, layer)
    if marker is None:
        return False
    try:
        done = json.loads((store_path / DONE_MARKER).read_text())
    except (OSError, ValueError):
        return False
    return (
        marker.get("format") == FEATURES_FORMAT
        and marker.get("layer") == layer
        and marker.get("params_sha256") == params_hash(dict(params or {}))
        and marker.get("tiles_input_sha256") == done.get("input_sha256")
        and marker.get("tiles_params_sha256") == done.get("params_sha256")
        and marker.get("sample_id") == done.get("sample_id")
        and features_problem(store_path, layer) is None
    )


def features_problem(store_path: str | Path, layer: int) -> str | None:
    """Why ``features/layer{layer}`` is not what its done-marker vouches for (None when it is): the
    array must open with its metadata and hold one row per tile of the store.

    Two runs over one folder once left the marker without the array (``KeyError: 'layer4'`` in every
    later run); such features are now simply extracted again.
    """
    try:
        arr, meta = _open_feature_array(store_path, layer)
        marker = _done_marker(Path(store_path), layer) or {}
        group, _ = open_finished(store_path)
        n_tiles = int(group["tiles"].shape[0])
    except Exception as err:  # noqa: BLE001 - any unreadable part means the same: extract again
        return f"{type(err).__name__}: {err}"
    f_tile = int(meta.get("f_tile", -1))
    expected = (n_tiles, int(meta.get("channels", -1)), f_tile, f_tile)
    if tuple(arr.shape) != expected or marker.get("n_tiles") != n_tiles:
        return f"features {tuple(arr.shape)} do not match {expected} ({marker.get('n_tiles')} tiles marked)"
    return None


def features_key(store_path: str | Path, layer: int) -> str | None:
    """The parameter hash of a store's finished ``layer`` features (None when there are none)."""
    return (_done_marker(Path(store_path), layer) or {}).get("params_sha256")


def _open_feature_array(store_path: str | Path, layer: int):
    group, _ = open_finished(store_path)
    if _done_marker(Path(store_path), layer) is None:
        raise StoreLayoutError(
            f"{store_path}: features/{_array_name(layer)} is missing or unfinished; run feature extraction"
        )
    arr = group["features"][_array_name(layer)]
    meta = arr.attrs.get("equislide_features")
    if not isinstance(meta, Mapping) or meta.get("format") != FEATURES_FORMAT:
        raise StoreLayoutError(f"{store_path}: features/{_array_name(layer)} is not {FEATURES_FORMAT!r}")
    return arr, dict(meta)


def read_features_meta(store_path: str | Path, layer: int) -> dict[str, Any]:
    """``attrs["equislide_features"]`` of a finished feature array, plus ``shape``.

    Raises:
        StoreLayoutError: No finished features of that layer in a finished tile store.
    """
    arr, meta = _open_feature_array(store_path, layer)
    meta["shape"] = tuple(arr.shape)
    return meta


def open_features(store_path: str | Path, layer: int, *, tiles_per_chunk: int = 1) -> dask.array.Array:
    """The features of a finished store as a lazy dask array ``(n_tiles, C, f_h, f_w)`` float16.

    Args:
        store_path: ``<root>/<sample_id>.zarr``.
        layer: Backbone stage 1-4.
        tiles_per_chunk: Tiles per dask chunk (32 = one shard per chunk, fastest to stream).

    Raises:
        StoreLayoutError: No finished features of that layer.
    """
    import dask.array as da

    if tiles_per_chunk <= 0:
        raise ValueError(f"tiles_per_chunk={tiles_per_chunk} must be > 0")
    arr, _ = _open_feature_array(store_path, layer)
    return da.from_zarr(arr, chunks=(tiles_per_chunk, *arr.shape[1:]))
