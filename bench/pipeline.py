"""End-to-end wall time, peak memory and stage shares of ``equislide segment`` on the phantom TMA.

Run by hand: ``python bench/pipeline.py [--cores 4 16 64] [--workers 1 2] [--quick]``. Each configuration
runs the cohort flow in a fresh process (its own LocalCluster and ephemeral Prefect server, started before
the timer); the baseline is the smallest phantom on 1 worker, measured in the same run, and every line
prints its ratio to it. Peak memory: the largest resident set of the flow process and of any worker.
Settings: 2.5 µm/px, SRENet-18 width 16, layer 3, cohort K-means (the ``equislide demo`` defaults).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

_CHILD = r"""
import json, os, resource, sys, tempfile, time
os.environ.setdefault("PREFECT_HOME", tempfile.mkdtemp())
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
from equislide.flows.cohort import run_cohort
if __name__ == "__main__":
    slide, out, workers = sys.argv[1], sys.argv[2], int(sys.argv[3])
    t0 = time.perf_counter()
    rep = run_cohort([slide], out, workers=workers, mpp=2.5, tile=256, halo=16, layer=3,
                     model_kwargs={"width": 16})
    wall = time.perf_counter() - t0
    peak = max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
               resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss) / 1024
    print("RESULT " + json.dumps({"wall_s": wall, "peak_mb": peak, "timings": rep["timings"],
                                  "samples": len(rep["samples"])}))
"""


def _run(slide: Path, workers: int, tmp: Path) -> dict:
    out = tmp / f"run-{slide.stem}-{workers}"
    proc = subprocess.run(
        [sys.executable, "-c", _CHILD, str(slide), str(out), str(workers)],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))
    return json.loads(line[7:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--cores", type=int, nargs="+", default=[4, 16])
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--quick", action="store_true", help="only the smallest phantom, 1 and 2 workers")
    args = parser.parse_args()
    from equislide.tiling import write_phantom

    cores = args.cores[:1] if args.quick else args.cores
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        base = None
        print(
            f"{'cores':>5} {'workers':>7} {'samples':>7} {'wall s':>7} {'x base':>6} {'peak MB':>8}  "
            "stage shares"
        )
        for n in cores:
            slide = write_phantom(tmp / f"phantom{n}.tiff", cores=n, core_diameter_um=800.0).image_path
            for w in args.workers:
                t0 = time.perf_counter()
                r = _run(slide, w, tmp)
                base = base or r["wall_s"]
                stages = {k: v for k, v in r["timings"].items() if k != "total_s"}
                total = sum(stages.values()) or 1.0
                shares = " ".join(f"{k[:-2]} {100 * v / total:.0f}%" for k, v in stages.items())
                print(
                    f"{n:>5} {w:>7} {r['samples']:>7} {r['wall_s']:>7.1f} {r['wall_s'] / base:>6.2f} "
                    f"{r['peak_mb']:>8.0f}  {shares}  (process {time.perf_counter() - t0:.0f} s)"
                )


if __name__ == "__main__":
    main()
