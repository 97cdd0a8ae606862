"""``equislide tile SLIDE... --out DIR``: slides and TMA images to per-sample zarr tile stores.

Each input is one call of :func:`equislide.stages.tile.tile_slide` (see it and ``storage/README.md``
for what a store holds). With one worker the inputs run in this process; with ``--workers N > 1`` they
run on the local Dask cluster ``segment`` starts (:func:`equislide.flows.cluster.dask_client`: N
single-threaded processes, the workers' malloc environment and preload), and with ``--scheduler
tcp://host:8786`` (or ``EQUISLIDE_SCHEDULER``) on an existing Dask cluster whose workers see the same
files. A bad input never stops the others: it is reported as one line ``equislide tile: FAILED
<path>: <reason>`` on stderr, and the exit status is 1. ``DIR/tile_report.json`` records every
input (sha256, status, reason, samples, tiles, seconds), the parameters and the equislide version.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from pathlib import Path
from typing import Any

from equislide.specs import TilingSpec
from equislide.text import one_line

_DEFAULT = TilingSpec()
SCHEDULER_ENV = "EQUISLIDE_SCHEDULER"
REPORT_NAME = "tile_report.json"
_PREFIX = "equislide tile"


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``tile`` on the CLI's subparsers."""
    p = subparsers.add_parser(
        "tile",
        help="tile slides and TMA images into per-sample zarr stores",
        description=(
            "Mask the tissue of each input on a thumbnail, split tissue microarrays into cores "
            "(<slide>/<core>, each core stored whole as one tile), and write the tiles at the "
            "analysis resolution into one zarr v3 store per sample under --out. Finished samples "
            "are skipped on a rerun. Exit status 0 when every input succeeded, 1 when some failed "
            "(the others are still written) or the run stopped on a fault, 2 on a usage error or when "
            "another run holds DIR (DIR/.equislide.lock)."
        ),
    )
    p.add_argument(
        "slides", nargs="+", metavar="SLIDE", help="slide or image files (SVS, TIFF, NDPI, PNG, ...)"
    )
    p.add_argument("--out", required=True, metavar="DIR", help="output folder of the stores")
    p.add_argument(
        "--mpp", type=float, default=_DEFAULT.mpp, help=f"analysis resolution, µm/px (default {_DEFAULT.mpp})"
    )
    p.add_argument(
        "--tile",
        type=int,
        default=_DEFAULT.tile,
        help=f"tile interior side, analysis px (default {_DEFAULT.tile})",
    )
    p.add_argument(
        "--halo",
        type=int,
        default=_DEFAULT.halo,
        help=(
            "context on every side of a tile, and margin around a TMA core, analysis px "
            f"(default {_DEFAULT.halo})"
        ),
    )
    p.add_argument(
        "--input-mpp",
        type=float,
        default=None,
        metavar="X",
        help="µm per level-0 pixel of every input, overriding the metadata (default: from the files)",
    )
    p.add_argument(
        "--tma",
        choices=("auto", "yes", "no"),
        default="auto",
        help="split tissue microarrays into cores: auto (detect), yes, no (default auto)",
    )
    p.add_argument(
        "--workers",
        type=int,
        default=1,
        help="parallel worker processes on a local Dask cluster (default 1: in this process)",
    )
    p.add_argument(
        "--scheduler",
        default=os.environ.get(SCHEDULER_ENV),
        metavar="ADDR",
        help=f"address of an existing Dask scheduler, e.g. tcp://host:8786 (default: ${SCHEDULER_ENV})",
    )
    return p


def _usage_error(message: str) -> int:
    print(f"{_PREFIX}: error: {message}", file=sys.stderr)
    return 2


def tile_one(path: str, out: str, sample_id: str, spec: TilingSpec, progress=None) -> dict[str, Any]:
    """Tile one input and describe the outcome as a JSON-able dict; never raises.

    Runs in this process or on a Dask worker. ``status`` is ``"ok"`` or ``"failed"``; a failure has
    ``reason`` (one line) and ``error`` (the exception class).
    """
    from equislide.files import sha256_file
    from equislide.stages.inputs import reason_of
    from equislide.stages.tile import tile_slide

    t0 = time.perf_counter()
    record: dict[str, Any] = {"path": path, "sample_id": sample_id, "sha256": None}
    try:
        results = tile_slide(path, out, spec, sample_id=sample_id, progress=progress)
    except Exception as err:  # one bad input must not stop the run: report it in one line
        record.update(status="failed", reason=reason_of(err), error=type(err).__name__)
    else:
        record.update(
            status="ok",
            sha256=results[0].input_sha256 if results else None,
            samples=[
                {
                    "sample_id": r.sample_id,
                    "store": str(r.store),
                    "status": r.status,
                    "n_tiles": r.n_tiles,
                    "side": r.side,
                }
                for r in results
            ],
            tiles=sum(r.n_tiles for r in results),
            tiles_written=sum(r.n_tiles for r in results if r.status == "written"),
            warnings=sorted({w for r in results for w in r.warnings}),
        )
    if record["status"] == "failed":
        try:
            if Path(path).is_file():  # regular files only: never open a FIFO
                record["sha256"] = sha256_file(path)
        except OSError:
            pass
        record.update(samples=[], tiles=0, tiles_written=0, warnings=[])
    record["seconds"] = round(time.perf_counter() - t0, 3)
    return record


def _progress():
    from equislide.commands._common import progress_bar

    return progress_bar()


def _run_local(jobs: list[tuple[str, str]], out: str, spec: TilingSpec) -> dict[str, dict]:
    records: dict[str, dict] = {}
    with _progress() as bar:
        inputs = bar.add_task("inputs", total=len(jobs))
        tiles = bar.add_task("tiles", total=0)
        state = {"done": 0, "sample": None, "prev": 0}

        def on_progress(sample_id: str, done: int, total: int) -> None:
            if sample_id != state["sample"]:
                state.update(sample=sample_id, prev=0)
                bar.update(tiles, total=(bar.tasks[tiles].total or 0) + total)
            bar.advance(tiles, done - state["prev"])
            state["prev"] = done

        for path, sample_id in jobs:
            bar.update(inputs, description=f"inputs ({Path(path).name})")
            records[path] = tile_one(path, out, sample_id, spec, on_progress)
            bar.advance(inputs)
        bar.update(inputs, description="inputs")
    return records


def _run_dask(
    jobs: list[tuple[str, str]], out: str, spec: TilingSpec, *, workers: int, scheduler: str | None
) -> dict[str, dict]:
    from distributed import as_completed

    from equislide.flows.cluster import dask_client
    from equislide.stages.inputs import failed_record

    records: dict[str, dict] = {}
    with dask_client(scheduler=scheduler, workers=workers) as client:
        futures = {
            client.submit(tile_one, path, out, sample_id, spec, key=f"tile-{i}", pure=False): path
            for i, (path, sample_id) in enumerate(jobs)
        }
        with _progress() as bar:
            inputs = bar.add_task("inputs", total=len(jobs))
            tiles = bar.add_task("tiles", total=0)
            for future in as_completed(futures):
                path = futures[future]
                try:
                    record = future.result()
                except Exception as err:  # the worker died (KilledWorker) or the task was lost
                    reason = f"worker failed: {type(err).__name__}: {one_line(err)}"
                    record = failed_record(path, reason, type(err).__name__, sample_id=dict(jobs).get(path))
                records[path] = record
                n = record.get("tiles", 0)
                bar.update(tiles, total=(bar.tasks[tiles].total or 0) + n)
                bar.advance(tiles, n)
                bar.advance(inputs)
    return records


def run(args: argparse.Namespace) -> int:
    """Tile every input; print one line per failure; write the report; return the exit status."""
    if not (args.mpp > 0 and args.mpp < 1e6):
        return _usage_error(f"--mpp {args.mpp} must be a positive number of µm per pixel")
    if args.tile < 8:
        return _usage_error(f"--tile {args.tile} must be >= 8 pixels")
    if args.halo < 0:
        return _usage_error(f"--halo {args.halo} must be >= 0 pixels")
    if args.input_mpp is not None and not args.input_mpp > 0:
        return _usage_error(f"--input-mpp {args.input_mpp} must be a positive number of µm per pixel")
    if args.workers < 1:
        return _usage_error(f"--workers {args.workers} must be >= 1")
    from equislide.commands._common import check_out_dir, locked_run

    if problem := check_out_dir(args.out):
        return _usage_error(problem)
    out = Path(args.out)
    command = ["equislide", "tile", *sys.argv[2:]]
    status, code = locked_run(
        _PREFIX, str(out), command, lambda: _tile_all(args, out), inputs=args.slides, report=REPORT_NAME
    )
    return status if code is None else code


def _tile_all(args: argparse.Namespace, out: Path) -> int:
    """Tile every input into ``out`` (locked by the caller); the exit status."""
    import json

    from equislide import __version__
    from equislide.storage import canonical_json, clean_partials

    # The same file given twice is tiled once; different files with the same stem get unique IDs.
    unique: dict[Path, str] = {}
    for p in args.slides:
        unique.setdefault(Path(p), p)
    paths = list(unique.values())
    from equislide.stages.inputs import assign_sample_ids

    ids, records = assign_sample_ids(paths)
    jobs = [(p, ids[p]) for p in paths if p in ids]
    spec = TilingSpec(mpp=args.mpp, tile=args.tile, halo=args.halo, input_mpp=args.input_mpp, tma=args.tma)
    clean_partials(out)  # leftovers of a killed run; this run owns --out

    t0 = time.perf_counter()
    workers = min(args.workers, max(1, len(jobs)))
    if args.scheduler or workers > 1:
        records.update(_run_dask(jobs, str(out), spec, workers=workers, scheduler=args.scheduler))
    else:
        records.update(_run_local(jobs, str(out), spec))
    seconds = time.perf_counter() - t0

    ordered = [records[p] for p in paths]
    failed = [r for r in ordered if r["status"] == "failed"]
    for r in ordered:
        for w in r["warnings"]:
            print(f"{_PREFIX}: WARNING {r['path']}: {w}", file=sys.stderr)
    for r in failed:
        print(f"{_PREFIX}: FAILED {r['path']}: {r['reason']}", file=sys.stderr)
    n_samples = sum(len(r["samples"]) for r in ordered)
    n_tiles = sum(r["tiles"] for r in ordered)
    report = {
        "equislide_version": __version__,
        "command": "tile",
        "parameters": json.loads(
            canonical_json({**dataclasses.asdict(spec), "workers": workers, "scheduler": args.scheduler})
        ),
        "inputs": ordered,
        "summary": {
            "inputs": len(ordered),
            "failed": len(failed),
            "samples": n_samples,
            "tiles": n_tiles,
            "seconds": round(seconds, 3),
        },
    }
    from equislide.files import atomic_write_bytes

    # Atomic: a full disk leaves the previous report whole, not a truncated one.
    atomic_write_bytes(out / REPORT_NAME, (json.dumps(report, indent=1, ensure_ascii=False) + "\n").encode())
    print(
        f"tile: {len(ordered) - len(failed)} of {len(ordered)} inputs ok, {n_samples} samples, "
        f"{n_tiles} tiles, {seconds:.1f} s -> {out}"
    )
    return 1 if failed else 0
