"""The tile stage: a slide file becomes per-sample zarr tile stores (:func:`tile_slide`, or its two halves).

:func:`plan_slide` lays out one input (:func:`equislide.tiling.plan_samples`: hash, thumbnail, tissue
mask, TMA cores, tile grids) and says which of its samples are already finished under the run's
``tiles/`` folder; :func:`write_samples` reads the tiles of some of the rest
(:func:`equislide.tiling.read_tile_batches`, one zarr shard at a time) and writes each sample atomically
(:func:`equislide.storage.open_sample_for_write`). The split lets a cluster write the cores of one TMA
slide on several workers at once.

One large sample can be spread too: :func:`sample_ranges` cuts it into ranges of whole shards,
:func:`write_sample_range` writes one range (any process, any order, each range once) into the
sample's shared partial store (:func:`equislide.storage.open_sample_ranges`), and
:func:`publish_sample` publishes the store once every range is done. The store is byte-identical to
the one :func:`write_samples` writes.

A finished sample made from the same input bytes and :class:`~equislide.specs.TilingSpec` is skipped,
so a rerun over the same folder only does what is missing and the stores are byte-identical to an
uninterrupted run.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from equislide.specs import BATCH_TILES, TILING_FORMAT, TilingSpec
from equislide.tiling import SamplePlan

__all__ = [
    "BATCH_TILES",
    "RANGE_SHARDS",
    "TILING_FORMAT",
    "SampleResult",
    "SlidePlan",
    "plan_slide",
    "publish_sample",
    "sample_ranges",
    "tile_slide",
    "write_sample",
    "write_sample_range",
    "write_sample_share",
    "write_share",
    "write_samples",
]

#: Default shards per range of :func:`sample_ranges` (at most 256 tiles, ~250 MB of 576 px RGB read).
RANGE_SHARDS = 8

#: ``progress(sample_id, tiles_done, tiles_total)``, called after each batch written.
ProgressCallback = Callable[[str, int, int], None]


@dataclass
class SampleResult:
    """What happened to one sample.

    Attributes:
        sample_id: ``slide`` or ``slide/core``.
        store: The finished store, ``<out_root>/<sample_id>.zarr``.
        status: ``"written"`` or ``"skipped"`` (already finished for this input and parameters).
        n_tiles: Tiles in the store.
        side: Stored tile side, halo included (analysis pixels).
        input_sha256: SHA-256 of the input file.
        warnings: One-line warnings (e.g. no resolution: native pixels).
        seconds: Wall time spent on this sample (0 for a skipped one).
    """

    sample_id: str
    store: Path
    status: str
    n_tiles: int
    side: int
    input_sha256: str
    warnings: list[str] = field(default_factory=list)
    seconds: float = 0.0


@dataclass
class SlidePlan:
    """What tiling one input takes: :func:`plan_slide`'s result.

    Attributes:
        path: The input file.
        input_sha256: Its SHA-256.
        sample_ids: Every sample of the input, in order ((row, col) for TMA cores).
        todo: Samples still to write (picklable: a worker can take them).
        finished: Samples already finished from the same input bytes and parameters.
    """

    path: str
    input_sha256: str
    sample_ids: list[str]
    todo: list[SamplePlan]
    finished: list[SampleResult]

    def ordered(self, written: list[SampleResult]) -> list[SampleResult]:
        """``finished`` and ``written`` in the input's sample order."""
        rank = {sid: i for i, sid in enumerate(self.sample_ids)}
        return sorted([*self.finished, *written], key=lambda r: rank[r.sample_id])


def _spec(spec: TilingSpec | None, overrides: dict[str, Any]) -> TilingSpec:
    """``spec`` with keyword overrides (a notebook's ``tile_slide(path, out, mpp=1.0)``)."""
    base = spec or TilingSpec()
    return dataclasses.replace(base, **overrides) if overrides else base


def tile_slide(
    path: str | os.PathLike[str],
    out_root: str | os.PathLike[str],
    spec: TilingSpec | None = None,
    *,
    sample_id: str | None = None,
    input_sha256: str | None = None,
    progress: ProgressCallback | None = None,
    **overrides: Any,
) -> list[SampleResult]:
    """Tile one slide (or plain image) into per-sample zarr stores under ``out_root``.

    The same as :func:`plan_slide` then :func:`write_samples` on every sample in one process; a
    cluster runs the two apart, one ``write_samples`` per group of TMA cores.

    Args:
        path: The slide or image file.
        out_root: Folder of the run's stores; ``<out_root>/<sample_id>.zarr`` per sample.
        spec: How to tile (default :class:`~equislide.specs.TilingSpec`); keyword ``overrides``
            (``mpp=``, ``tile=``, ``halo=``, ``input_mpp=``, ``force_mpp=``, ``native_pixels=``,
            ``max_tiles=``, ``tma=``) replace its fields.
        sample_id: The slide's ID (default: the file stem made safe with ``safe_sample_id``);
            pass :func:`~equislide.storage.unique_sample_ids`' value when tiling many files.
        input_sha256: The file's SHA-256 when the caller already has it (else it is computed).
        progress: Called as ``progress(sample_id, tiles_done, tiles_total)`` after each batch.

    Returns:
        One :class:`SampleResult` per sample, in (row, col) order for TMA cores.

    Raises:
        SlideError: The file cannot be opened or read (a subclass names why).
        NoUsableMppError: No usable resolution, no ``input_mpp`` and not ``native_pixels``.
        SlideTooLargeError: More than ``max_tiles`` tiles, or no level small enough for a thumbnail.
        NoTissueError: The tissue mask is empty (or ``tma="yes"`` finds no core).
        UnsupportedImageError: The image is under 16 analysis pixels on a side.
        ValueError: A bad parameter (the message names it).
    """
    spec = _spec(spec, overrides)
    plan = plan_slide(path, out_root, spec, sample_id=sample_id, input_sha256=input_sha256)
    return plan.ordered(write_samples(plan.todo, out_root, progress=progress))


def plan_slide(
    path: str | os.PathLike[str],
    out_root: str | os.PathLike[str],
    spec: TilingSpec | None = None,
    *,
    sample_id: str | None = None,
    input_sha256: str | None = None,
) -> SlidePlan:
    """Lay out one input's samples; those already finished under ``out_root`` come back in ``finished``.

    Reads only the thumbnail (nothing at all for a finished whole slide). Arguments and errors: as
    :func:`tile_slide`.
    """
    from equislide.storage import is_sample_done, safe_sample_id
    from equislide.tiling import plan_samples

    spec = spec or TilingSpec()
    path = Path(path)
    params = spec.params()
    slide_id = sample_id or safe_sample_id(path.stem if path.suffix else path.name)

    def is_done(sid: str, sha: str) -> bool:
        return is_sample_done(out_root, sid, input_sha256=sha, params=params)

    layout = plan_samples(
        path,
        sample_id=slide_id,
        params=params,
        mpp=spec.mpp,
        tile=spec.tile,
        halo=spec.halo,
        input_mpp=spec.input_mpp,
        force_mpp=spec.force_mpp,
        native_pixels=spec.native_pixels,
        max_tiles=spec.max_tiles,
        tma=spec.tma,
        input_sha256=input_sha256,
        is_done=is_done,
    )
    finished = [_skipped(out_root, sid, layout.input_sha256, layout.warnings) for sid in layout.done]
    return SlidePlan(str(path), layout.input_sha256, list(layout.sample_ids), list(layout.todo), finished)


def write_samples(
    samples: list[SamplePlan],
    out_root: str | os.PathLike[str],
    *,
    progress: ProgressCallback | None = None,
) -> list[SampleResult]:
    """Read and store the tiles of planned samples (of one input), each store written atomically.

    Opens the input once for all of ``samples``. A sample finished in the meantime (another run over
    the same folder) is skipped.

    Raises:
        SlideError: The input cannot be opened or read.
        ValueError: The samples come from more than one input.
    """
    from equislide.storage import is_sample_done, open_sample_for_write, tile_shard_tiles
    from equislide.tiling import open_slide, read_tile_batches

    if not samples:
        return []
    if len({(s.path, s.input_mpp, s.force_mpp) for s in samples}) > 1:
        raise ValueError("write_samples takes the samples of one input; got several")
    results = []
    first = samples[0]
    with open_slide(first.path, input_mpp=first.input_mpp, force_mpp=first.force_mpp) as slide:
        for sample in samples:
            sha, params = sample.input_sha256, sample.params
            if is_sample_done(out_root, sample.sample_id, input_sha256=sha, params=params):
                results.append(_skipped(out_root, sample.sample_id, sha, list(sample.warnings)))
                continue
            t0 = time.perf_counter()
            grid = sample.grid
            shard = tile_shard_tiles(grid.n_tiles)
            with open_sample_for_write(
                out_root,
                sample.sample_id,
                n_tiles=grid.n_tiles,
                tile=grid.tile,
                halo=grid.halo,
                attrs=sample.attrs,
                params=params,
                input_sha256=sha,
                shard_tiles=shard,
            ) as writer:
                for start, batch in read_tile_batches(slide, sample, shard):
                    stop = start + len(batch)
                    writer.write_tiles(start, batch, grid.l_xy[start:stop])
                    if progress is not None:
                        progress(sample.sample_id, stop, grid.n_tiles)
                writer.write_tissue_mask(sample.mask, downsample=sample.mask_downsample)
            results.append(
                SampleResult(
                    sample.sample_id,
                    writer.path,
                    "written",
                    grid.n_tiles,
                    grid.side,
                    sha,
                    list(sample.warnings),
                    time.perf_counter() - t0,
                )
            )
    return results


def write_sample(
    sample: SamplePlan, out_root: str | os.PathLike[str], *, progress: ProgressCallback | None = None
) -> SampleResult:
    """:func:`write_samples` of one sample (a module-level callable: it runs in a budgeted child)."""
    return write_samples([sample], out_root, progress=progress)[0]


def _skipped(out_root, sample_id: str, sha: str, warnings: list[str] | None = None) -> SampleResult:
    from equislide.storage import read_sample_meta, sample_store_path

    store = sample_store_path(out_root, sample_id)
    meta = read_sample_meta(store)
    return SampleResult(
        sample_id,
        store,
        "skipped",
        int(meta["n_tiles"]),
        int(meta["tile_with_halo"]),
        sha,
        list(meta.get("warnings") or warnings or []),
    )


def sample_ranges(sample: SamplePlan, *, range_tiles: int | None = None) -> list[tuple[int, int]]:
    """Shard-aligned ``[start, stop)`` tile ranges covering a sample, in order.

    Args:
        sample: A plan of :func:`plan_slide`.
        range_tiles: Tiles per range, a positive multiple of the sample's shard
            (:func:`~equislide.storage.tile_shard_tiles`; default :data:`RANGE_SHARDS` shards); the last
            range holds the rest.

    Raises:
        ValueError: ``range_tiles`` is not a positive multiple of the sample's shard.
    """
    from equislide.storage import tile_shard_tiles

    n = sample.grid.n_tiles
    shard = tile_shard_tiles(n)
    step = RANGE_SHARDS * shard if range_tiles is None else range_tiles
    if not isinstance(step, int) or step <= 0 or step % shard:
        raise ValueError(f"range_tiles={range_tiles!r} must be a positive multiple of {shard} (the shard)")
    return [(start, min(n, start + step)) for start in range(0, n, step)]


def _ranged_store(sample: SamplePlan, out_root):
    from equislide.storage import open_sample_ranges, tile_shard_tiles

    grid = sample.grid
    return open_sample_ranges(
        out_root,
        sample.sample_id,
        n_tiles=grid.n_tiles,
        tile=grid.tile,
        halo=grid.halo,
        coords=grid.l_xy,
        attrs=sample.attrs,
        params=sample.params,
        input_sha256=sample.input_sha256,
        shard_tiles=tile_shard_tiles(grid.n_tiles),
    )


def write_sample_range(
    sample: SamplePlan,
    out_root: str | os.PathLike[str],
    start: int,
    stop: int,
    *,
    progress: ProgressCallback | None = None,
) -> dict[str, Any]:
    """Read and store tiles ``[start, stop)`` of one sample into its shared partial store.

    Skipped when the sample is already published for this input and parameters, or when the range
    is done. A process killed mid-range leaves no done file: the range is simply written again.

    Args:
        sample: A plan of :func:`plan_slide`.
        out_root: Folder of the run's stores.
        start: First tile, a multiple of the sample's shard (:func:`~equislide.storage.tile_shard_tiles`).
        stop: One past the last tile, a multiple of the shard or the sample's tile count.
        progress: Called as ``progress(sample_id, tiles_done, tiles_total)`` after each shard.

    Returns:
        ``{"sample_id", "start", "stop", "status": "written" | "skipped", "tiles", "seconds"}``.

    Raises:
        SlideError: The input cannot be opened or read.
        ValueError: ``[start, stop)`` is not a range of whole shards of the sample.
    """
    from equislide.storage import is_sample_done
    from equislide.tiling import open_slide, read_tile_batches

    record = {"sample_id": sample.sample_id, "start": int(start), "stop": int(stop), "tiles": 0}
    if is_sample_done(out_root, sample.sample_id, input_sha256=sample.input_sha256, params=sample.params):
        return {**record, "status": "skipped", "seconds": 0.0}
    t0 = time.perf_counter()
    store = _ranged_store(sample, out_root)
    store.check_range(start, stop)
    if store.is_range_done(start, stop):
        return {**record, "status": "skipped", "seconds": 0.0}
    with open_slide(sample.path, input_mpp=sample.input_mpp, force_mpp=sample.force_mpp) as slide:
        shard = store.shard_tiles
        for first, batch in read_tile_batches(slide, sample, shard, start=start, stop=stop):
            store.write_tiles(first, batch)
            if progress is not None:
                progress(sample.sample_id, first + len(batch) - start, stop - start)
    store.mark_done(start, stop)
    return {**record, "status": "written", "tiles": stop - start, "seconds": time.perf_counter() - t0}


def publish_sample(sample: SamplePlan, out_root: str | os.PathLike[str]) -> SampleResult:
    """Publish a sample written by :func:`write_sample_range` once every range is done.

    Returns:
        The sample's :class:`SampleResult` (``"skipped"`` when it was already published).

    Raises:
        IncompleteSampleError: Some ranges are not done (the message names the missing tiles).
    """
    from equislide.storage import is_sample_done

    sha = sample.input_sha256
    if is_sample_done(out_root, sample.sample_id, input_sha256=sha, params=sample.params):
        return _skipped(out_root, sample.sample_id, sha, list(sample.warnings))
    t0 = time.perf_counter()
    store = _ranged_store(sample, out_root)
    path = store.publish(sample.mask, downsample=sample.mask_downsample)
    grid = sample.grid
    return SampleResult(
        sample.sample_id,
        path,
        "written",
        grid.n_tiles,
        grid.side,
        sha,
        list(sample.warnings),
        time.perf_counter() - t0,
    )


def write_sample_share(
    sample: SamplePlan,
    out_root: str | os.PathLike[str],
    ranges: list[tuple[int, int]] | None = None,
) -> dict[str, Any]:
    """One work unit's share of a sample: the whole sample (``ranges`` None: :func:`write_sample`), or
    some of its ranges (:func:`write_sample_range`) and then, when this share finds every range done,
    :func:`publish_sample` (a module-level callable: it runs in a budgeted child).

    Several shares of one sample run on several workers at once; the one that completes it publishes
    it, so no step waits for the whole cohort.

    Returns:
        ``{"sample_id", "status" ("written" | "skipped"), "seconds" (this share's), "published",
        "result"}``: ``result`` is the sample's :class:`SampleResult` once it is published (by this
        share or another), else None (other shares still write).
    """
    from equislide.storage import is_sample_done, sample_store_path
    from equislide.storage.ranges import folder_lock

    sid = sample.sample_id
    if ranges is None:
        res = write_sample(sample, out_root)
        out = {"sample_id": sid, "status": res.status, "seconds": res.seconds}
        return {**out, "published": True, "result": res}
    done = [write_sample_range(sample, out_root, int(a), int(b)) for a, b in ranges]
    seconds = sum(d["seconds"] for d in done)
    status = "written" if any(d["status"] == "written" for d in done) else "skipped"
    out = {"sample_id": sid, "status": status, "seconds": round(seconds, 3)}
    out.update(published=False, result=None)

    final = sample_store_path(out_root, sid)
    # Shares finishing at the same moment take turns on the sample's folder: the first to find every
    # range done publishes; the others find it published (publishing is a mask write and a rename).
    with folder_lock(final.parent):
        if is_sample_done(out_root, sid, input_sha256=sample.input_sha256, params=sample.params):
            # Published by another share (or by this one before a retry): its result, for whichever
            # share reports first.
            return {**out, "published": True, "result": _skipped(out_root, sid, sample.input_sha256)}
        if _ranged_store(sample, out_root).missing():
            return out  # another share still writes; the last one to finish publishes
        res = publish_sample(sample, out_root)
    res.seconds = seconds + res.seconds
    return {**out, "published": True, "result": res}


def write_share(share: tuple[SamplePlan, list[tuple[int, int]] | None], out_root: str) -> dict[str, Any]:
    """:func:`write_sample_share` of one ``(sample, ranges)`` pair, as the flow's tile tasks pass it.

    Here rather than in the flows because a budgeted child unpickles it: a function of the flows
    module made every child import Prefect first (seconds a sample on a busy CPU).
    """
    return write_sample_share(share[0], out_root, share[1])

