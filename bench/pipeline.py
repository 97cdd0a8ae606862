"""End-to-end wall time, scaling and peak memory of the cohort flow (``equislide segment``).

Run by hand::

    python bench/pipeline.py                    # phantoms of 4, 16, 64 cores + real slides, 1 and 2 workers
    python bench/pipeline.py --quick            # phantoms of 4 and 16 cores, 1 and 2 workers
    python bench/pipeline.py --cores 4 16 64 --workers 1 2 --slides /path/to/slides

Configurations:

- Phantom TMAs of 4, 16, 64 cores with no empty position (``missing=0``), cores of 600 µm at 0.5 µm/px,
  so every core is dearrayed into its own sample and stored as one 280 x 280 tile at 2.5 µm/px (core +
  16 px margin): samples equal cores, and a second worker has samples to take.
- The real slides: every ``*.svs`` in ``--slides`` (default ``$EQUISLIDE_BENCH_SLIDES`` or
  ``/work/shared/data/slides``) as one cohort, tiles of 256 + 16 px halo at 2.5 µm/px.

Every run is a fresh process (its own ``LocalCluster`` of single-threaded worker processes and its own
ephemeral Prefect server) with SRENet-18 width 16, layer 3, random weights, cohort K-means k = 3.
Baseline: 1 worker on the same configuration, measured in the same run; ``speed-up`` is the flow time
of 1 worker over that of N workers (goal: >= 1.7 with 2). ``flow s`` is the flow's own ``total_s`` from
``run.json``; ``wall s`` adds cluster and Prefect start-up. Stage shares are of the summed stage times.

Peak memory: a thread in the run's process samples (every 0.1 s) the resident set of that process and of
all its descendants (Dask nanny and worker processes, the Prefect server if it runs apart) and keeps the
peak of the sum (``tree MB``), of the client process (``client MB``) and of the largest single descendant
(``max child MB``, i.e. the worst worker). Goal: the per-process peaks do not grow with the number of
samples (compare 4 vs 16 vs 64 cores). Sampling can miss a spike shorter than 0.1 s.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

_CHILD = r"""
import json, os, sys, tempfile, threading, time
os.environ.setdefault("PREFECT_HOME", tempfile.mkdtemp())
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
import psutil

peak = {"tree": 0, "client": 0, "child": 0}
stop = threading.Event()

def sample_rss():
    me = psutil.Process()
    while not stop.is_set():
        try:
            client = me.memory_info().rss
            kids = []
            for c in me.children(recursive=True):
                try:
                    kids.append(c.memory_info().rss)
                except psutil.Error:
                    pass
            peak["tree"] = max(peak["tree"], client + sum(kids))
            peak["client"] = max(peak["client"], client)
            peak["child"] = max([peak["child"], *kids])
        except psutil.Error:
            pass
        stop.wait(0.1)

from equislide.flows.cohort import run_cohort
if __name__ == "__main__":
    out, workers, slides = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
    threading.Thread(target=sample_rss, daemon=True).start()
    t0 = time.perf_counter()
    rep = run_cohort(slides, out, workers=workers, mpp=2.5, tile=256, halo=16, layer=3, clusters=3,
                     model_kwargs={"width": 16})
    wall = time.perf_counter() - t0
    stop.set()
    failed = [s for s, v in rep["samples"].items() if v["status"] == "failed"]
    print("RESULT " + json.dumps({"wall_s": wall, "timings": rep["timings"], "samples": len(rep["samples"]),
                                  "failed": failed, **{f"{k}_mb": v / 2**20 for k, v in peak.items()}}))
"""


def _run(slides: list[Path], workers: int, out: Path) -> dict:
    proc = subprocess.run(
        [sys.executable, "-c", _CHILD, str(out), str(workers), *map(str, slides)],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )
    line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
    if proc.returncode != 0 or line is None:
        sys.exit(f"bench/pipeline.py: the run on {out.name} failed:\n{proc.stderr[-4000:]}")
    return json.loads(line[7:])


def _shares(timings: dict[str, float]) -> str:
    stages = {k.removesuffix("_s"): v for k, v in timings.items() if k != "total_s"}
    total = sum(stages.values()) or 1.0
    return " ".join(f"{k} {100 * v / total:.0f}%" for k, v in stages.items())


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--cores", type=int, nargs="+", default=[4, 16, 64], help="phantom TMA sizes")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument(
        "--slides",
        type=Path,
        default=Path(os.environ.get("EQUISLIDE_BENCH_SLIDES", "/work/shared/data/slides")),
        help="folder whose *.svs form the real-slide cohort (skipped when it has none)",
    )
    parser.add_argument(
        "--quick", action="store_true", help="phantoms of 4 and 16 cores only, no real slides"
    )
    args = parser.parse_args()
    from equislide.tiling import write_phantom

    workers = sorted(set(args.workers))
    if 1 not in workers:
        workers = [1, *workers]  # the baseline
    cores = [n for n in args.cores if n <= 16] if args.quick else args.cores
    real = [] if args.quick else sorted(args.slides.glob("*.svs")) if args.slides.is_dir() else []
    print(f"{os.cpu_count()} CPUs; load average before the runs {os.getloadavg()[0]:.2f}")
    header = (
        f"{'configuration':18s}{'samples':>8s}{'workers':>8s}{'wall s':>8s}{'flow s':>8s}{'speed-up':>9s}"
        f"{'tree MB':>8s}{'client MB':>10s}{'max child MB':>13s}{'load':>6s}  stage shares"
    )
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        configs: list[tuple[str, list[Path]]] = []
        for n in cores:
            info = write_phantom(tmp / f"phantom{n}.tiff", cores=n, core_diameter_um=600.0, missing=0)
            configs.append((f"phantom {n} cores", [Path(info.image_path)]))
        if real:
            configs.append((f"{len(real)} real slides", real))
        print(header)
        for name, slides in configs:
            base = None
            for w in workers:
                load = os.getloadavg()[0]
                r = _run(slides, w, tmp / f"run-{name.replace(' ', '_')}-{w}")
                flow = r["timings"]["total_s"]
                base = base or flow
                print(
                    f"{name:18s}{r['samples']:>8d}{w:>8d}{r['wall_s']:>8.1f}{flow:>8.1f}{base / flow:>9.2f}"
                    f"{r['tree_mb']:>8.0f}{r['client_mb']:>10.0f}{r['child_mb']:>13.0f}{load:>6.2f}  "
                    f"{_shares(r['timings'])}" + (f"  FAILED {r['failed']}" if r["failed"] else ""),
                    flush=True,
                )


if __name__ == "__main__":
    main()
