"""``equislide tile SLIDE... --out DIR``: slides and TMA images to per-sample zarr tile stores.

Each input is one call of :func:`equislide.stages.tile.tile_slide` (see it and ``storage/README.md``
for what a store holds). With one worker the inputs run in this process; with ``--workers N > 1`` they
run on the local Dask cluster ``segment`` starts (:func:`equislide.flows.cluster.dask_client`: N
single-threaded processes, the workers' malloc environment and preload), and with ``--scheduler
tcp://host:8786`` (or ``EQUISLIDE_SCHEDULER``) on an existing Dask cluster whose workers see the same
files. A bad input never stops the others: it is reported as one line ``equislide tile: FAILED
<path>: <reason>`` on stderr as soon as it fails, and the exit status is 1; planning and tiling run in
a child process killed after their time budget (``--budget``, :mod:`equislide.stages.budget`), so a
reader that hangs fails its input alone. ``DIR/tile_report.json`` records every input (sha256, status,
reason, samples, tiles, seconds), the parameters and the equislide version; it is rewritten atomically
after each input (``"status": "pending"`` for those not done yet), so a killed run still says what it
did. Paths are shown with bytes that are not UTF-8 and control characters escaped.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from pathlib import Path
from typing import Any

from equislide.commands._common import add_mpp_arguments, check_mpp_arguments
from equislide.specs import TilingSpec
from equislide.stages.budget import BUDGET_ENV, BudgetSpec
from equislide.text import one_line, path_text

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
    add_mpp_arguments(p)
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
        help=f"address of an existing Dask scheduler, e.g. tcp://host:8786 or tls://host:8786 "
        f"(default: ${SCHEDULER_ENV})",
    )
    from equislide.commands._tls import add_tls_arguments

    add_tls_arguments(p)
    add_budget_option(p)
    return p


def add_budget_option(p: argparse.ArgumentParser) -> None:
    """``--budget STAGE=SECONDS,...`` (shared by ``tile`` and ``segment``)."""
    d = BudgetSpec()
    p.add_argument(
        "--budget",
        default=os.environ.get(BUDGET_ENV),
        metavar="STAGE=S,...",
        help=(
            "seconds one input (or sample) may spend in a stage before it is stopped and fails alone, "
            f"e.g. plan=60,tile=600; 0 = no limit (defaults: plan {d.plan:g}, tile {d.tile:g}, features "
            f"{d.features:g}, segment {d.segment:g}, consistency {d.consistency:g}; or ${BUDGET_ENV})"
        ),
    )


def _usage_error(message: str) -> int:
    print(f"{_PREFIX}: error: {message}", file=sys.stderr)
    return 2


def _tile_slide(path: str, out: str, sample_id: str, spec: TilingSpec, budgets: BudgetSpec, progress=None):
    """``tile_slide`` with the plan and each sample's tiling in budgeted child processes."""
    from equislide.stages.budget import run_within
    from equislide.stages.tile import plan_slide, write_sample

    plan = run_within(budgets.plan, "planning", plan_slide, path, out, spec, sample_id=sample_id)
    written = [
        run_within(budgets.tile, f"tiling {s.sample_id}", write_sample, s, out, progress=progress)
        for s in plan.todo
    ]
    return plan.ordered(written)


def tile_one(
    path: str, out: str, sample_id: str, spec: TilingSpec, progress=None, budgets: BudgetSpec | None = None
) -> dict[str, Any]:
    """Tile one input and describe the outcome as a JSON-able dict; never raises.

    Runs in this process or on a Dask worker. ``status`` is ``"ok"`` or ``"failed"``; a failure has
    ``reason`` (one line) and ``error`` (the exception class). ``path`` in the record is shown form
    (:func:`~equislide.text.path_text`).
    """
    from equislide.files import sha256_file
    from equislide.stages.inputs import reason_of

    budgets = budgets or BudgetSpec.from_env()
    t0 = time.perf_counter()
    record: dict[str, Any] = {"path": path_text(path), "sample_id": sample_id, "sha256": None}
    try:
        results = _tile_slide(path, out, sample_id, spec, budgets, progress)
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


class _Report:
    """``tile_report.json``, rewritten atomically after every input, and each input's lines as it ends."""

    def __init__(self, out: Path, paths: list[str], ids: dict[str, str], head: dict[str, Any]) -> None:
        self.out, self.paths, self.head = out, paths, head
        self.t0 = time.perf_counter()
        self.records: dict[str, dict[str, Any]] = {
            p: {"path": path_text(p), "sample_id": ids.get(p), "status": "pending"} for p in paths
        }
        self.warned: dict[str, list[str]] = {}

    def warn(self, path: str, warning: str) -> None:
        self.warned.setdefault(path, []).append(warning)

    def done(self, path: str, record: dict[str, Any]) -> None:
        record["warnings"] = sorted({*record.get("warnings", []), *self.warned.get(path, [])})
        self.records[path] = record
        for w in record["warnings"]:
            print(f"{_PREFIX}: WARNING {record['path']}: {w}", file=sys.stderr, flush=True)
        if record["status"] == "failed":
            print(f"{_PREFIX}: FAILED {record['path']}: {record['reason']}", file=sys.stderr, flush=True)
        self.write()

    def document(self) -> dict[str, Any]:
        ordered = [self.records[p] for p in self.paths]
        finished = [r for r in ordered if r["status"] != "pending"]
        return {
            **self.head,
            "inputs": ordered,
            "summary": {
                "inputs": len(ordered),
                "finished": len(finished),
                "failed": sum(r["status"] == "failed" for r in finished),
                "samples": sum(len(r["samples"]) for r in finished),
                "tiles": sum(r["tiles"] for r in finished),
                "seconds": round(time.perf_counter() - self.t0, 3),
            },
        }

    def write(self) -> dict[str, Any]:
        import json

        from equislide.files import atomic_write_bytes

        doc = self.document()
        text = json.dumps(doc, indent=1, ensure_ascii=False) + "\n"
        atomic_write_bytes(self.out / REPORT_NAME, text.encode("utf-8"))
        return doc


def _run_local(
    jobs: list[tuple[str, str]], out: str, spec: TilingSpec, report: _Report, budgets: BudgetSpec
) -> None:
    from rich.markup import escape

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
            # A file name is never markup: "[bold]x.png" is shown as it is.
            bar.update(inputs, description=f"inputs ({escape(path_text(Path(path).name))})")
            report.done(path, tile_one(path, out, sample_id, spec, on_progress, budgets))
            bar.advance(inputs)
        bar.update(inputs, description="inputs")


def _run_dask(
    jobs: list[tuple[str, str]],
    out: str,
    spec: TilingSpec,
    report: _Report,
    budgets: BudgetSpec,
    *,
    workers: int,
    scheduler: str | None,
) -> None:
    from distributed import as_completed

    from equislide.flows.cluster import dask_client
    from equislide.stages.inputs import failed_record

    with dask_client(scheduler=scheduler, workers=workers) as client:
        futures = {
            client.submit(
                tile_one, path, out, sample_id, spec, None, budgets, key=f"tile-{i}", pure=False
            ): path
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
                report.done(path, record)
                n = record.get("tiles", 0)
                bar.update(tiles, total=(bar.tasks[tiles].total or 0) + n)
                bar.advance(tiles, n)
                bar.advance(inputs)


def run(args: argparse.Namespace) -> int:
    """Tile every input; print one line per failure; write the report; return the exit status."""
    if not (args.mpp > 0 and args.mpp < 1e6):
        return _usage_error(f"--mpp {args.mpp} must be a positive number of µm per pixel")
    if args.tile < 8:
        return _usage_error(f"--tile {args.tile} must be >= 8 pixels")
    if args.halo < 0:
        return _usage_error(f"--halo {args.halo} must be >= 0 pixels")
    problem = check_mpp_arguments(args)
    if problem:
        return _usage_error(problem)
    if args.workers < 1:
        return _usage_error(f"--workers {args.workers} must be >= 1")
    try:
        budgets = BudgetSpec.parse(args.budget)
    except ValueError as err:
        return _usage_error(f"--budget: {err}")
    from equislide.commands._common import check_out_dir, locked_run
    from equislide.commands._tls import apply_tls, tls_problem

    if problem := tls_problem(args) or check_out_dir(args.out):
        return _usage_error(problem)
    apply_tls(args)
    out = Path(args.out)
    command = ["equislide", "tile", *sys.argv[2:]]
    status, code = locked_run(
        _PREFIX,
        str(out),
        command,
        lambda: _tile_all(args, out, budgets),
        inputs=args.slides,
        report=REPORT_NAME,
    )
    return status if code is None else code


def _tile_all(args: argparse.Namespace, out: Path, budgets: BudgetSpec) -> int:
    """Tile every input into ``out`` (locked by the caller); the exit status."""
    import json

    from equislide import __version__
    from equislide.storage import canonical_json, clean_partials

    # The same file given twice is tiled once; different files with the same stem get unique IDs.
    unique: dict[Path, str] = {}
    for p in args.slides:
        unique.setdefault(Path(p), p)
    paths = list(unique.values())
    from equislide.stages.inputs import assign_sample_ids, duplicate_inputs

    ids, failed_ids = assign_sample_ids(paths)
    jobs = [(p, ids[p]) for p in paths if p in ids]
    spec = TilingSpec(
        mpp=args.mpp,
        tile=args.tile,
        halo=args.halo,
        input_mpp=args.input_mpp,
        force_mpp=args.force_mpp,
        native_pixels=args.native_pixels,
        max_tiles=args.max_tiles,
        tma=args.tma,
    )
    clean_partials(out)  # leftovers of a killed run; this run owns --out

    workers = min(args.workers, max(1, len(jobs)))
    report = _Report(
        out,
        paths,
        ids,
        {
            "equislide_version": __version__,
            "command": "tile",
            "parameters": json.loads(
                canonical_json(
                    {
                        **dataclasses.asdict(spec),
                        "workers": workers,
                        "scheduler": args.scheduler,
                        "budgets_s": budgets.to_dict(),
                    }
                )
            ),
        },
    )
    for first, other in duplicate_inputs(paths):
        report.warn(other, f"the same bytes as {path_text(first)} (a duplicate input)")
    report.write()  # every input listed as pending before any work: a hang still leaves a report
    for p, record in failed_ids.items():
        report.done(p, record)
    if args.scheduler or workers > 1:
        _run_dask(jobs, str(out), spec, report, budgets, workers=workers, scheduler=args.scheduler)
    else:
        _run_local(jobs, str(out), spec, report, budgets)
    doc = report.write()
    summary = doc["summary"]
    n_ok = summary["inputs"] - summary["failed"]
    print(
        f"tile: {n_ok} of {summary['inputs']} inputs ok, {summary['samples']} samples, "
        f"{summary['tiles']} tiles, {summary['seconds']:.1f} s -> {path_text(out)}"
    )
    return 1 if summary["failed"] else 0
