"""End-to-end wall time, scaling and peak memory of the cohort flow (``equislide segment``).

Run by hand::

    python bench/pipeline.py                    # phantoms of 4, 16, 64 cores + real slides, 1 and 2 workers
    python bench/pipeline.py --quick            # phantoms of 4 and 16 cores, 1 and 2 workers
    python bench/pipeline.py --cores 64 --workers 1 2 --modes weights --slides /path/to/slides

Configurations:

- Phantom TMAs of 4, 16, 64 cores with no empty position (``missing=0``), cores of 600 µm at 0.5 µm/px,
  so every core is dearrayed into its own sample (stored whole: 240 px + 32 px margin a side at
  2.5 µm/px): samples equal cores, and a second worker has samples to take.
- The real slides: every ``*.svs`` in ``--slides`` (default ``$EQUISLIDE_BENCH_SLIDES``, else
  ``slides/`` of the data folder: ``$EQUISLIDE_DATA``, or ``../shared/data`` beside the repository) as
  one cohort.

The flow runs with ``equislide segment``'s defaults (SRENet-18 at full width, layer 4, 512 px tiles +
32 px halo at 2.5 µm/px, cohort K-means k = 3) in two modes:

- ``random``: no weights; the run calibrates BatchNorm of a seeded random initialisation on 16 of the
  cohort's tiles, a serial stage (one task; the other workers wait);
- ``weights``: a given checkpoint (the one the ``random`` run of the same configuration wrote), as in
  production with pre-trained weights: no calibration stage.

Every run is a fresh process (``bench/_pipeline_child.py``: its own ``LocalCluster`` of
single-threaded worker processes and its own temporary Prefect server). Baseline: 1 worker on the
same configuration and mode, measured in the same
run; ``speed-up`` is the flow time of 1 worker over that of N workers (goal: >= 1.7 with 2), and
``w/o start`` the same without the local cluster's start-up (``cluster`` stage; a long-lived cluster
given with ``--scheduler`` has none). ``flow s`` is the flow's own ``total_s`` from ``run.json``;
``wall s`` adds Prefect's start-up. Stage shares are of the summed stage times.

Peak memory: a thread in the run's process samples (every 0.1 s) the resident set of that process and of
all its descendants (Dask nanny and worker processes, the Prefect server) and keeps the peak of the sum
(``tree MB``), of the client process (``client MB``) and of the largest single descendant (``max child
MB``; the Prefect server or the worst worker). Goal: the per-process peaks do not grow with the number of
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

from _data import data_dir

_CHILD = Path(__file__).with_name("_pipeline_child.py")


def _run(slides: list[Path], workers: int, out: Path, weights: str | None) -> dict:
    proc = subprocess.run(
        [sys.executable, str(_CHILD), str(out), str(workers), weights or "", *map(str, slides)],
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
    parser.add_argument("--modes", nargs="+", choices=["random", "weights"], default=["random", "weights"])
    parser.add_argument(
        "--slides",
        type=Path,
        default=Path(os.environ.get("EQUISLIDE_BENCH_SLIDES") or data_dir() / "slides"),
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
        f"{'configuration':17s}{'mode':>8s}{'samples':>8s}{'workers':>8s}{'wall s':>8s}{'flow s':>8s}"
        f"{'speed-up':>9s}{'w/o start':>10s}{'tree MB':>8s}{'client MB':>10s}{'max child MB':>13s}"
        f"{'load':>6s}  stage shares"
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
            weights = None  # the checkpoint the first random-weights run of this configuration writes
            for mode in ("random", "weights"):
                timed = mode in args.modes
                if not timed and not (mode == "random" and "weights" in args.modes):
                    continue
                base = None
                for w in workers if timed else workers[:1]:  # untimed: only to make the checkpoint
                    out = tmp / f"run-{name.replace(' ', '_')}-{mode}-{w}"
                    load = os.getloadavg()[0]
                    r = _run(slides, w, out, weights if mode == "weights" else None)
                    if weights is None:
                        weights = str(sorted((out / "models").glob("backbone-*.safetensors"))[0])
                    if not timed:
                        continue
                    t = r["timings"]
                    flow, work = t["total_s"], t["total_s"] - t.get("cluster_s", 0.0)
                    base = base or (flow, work)
                    print(
                        f"{name:17s}{mode:>8s}{r['samples']:>8d}{w:>8d}{r['wall_s']:>8.1f}{flow:>8.1f}"
                        f"{base[0] / flow:>9.2f}{base[1] / work:>10.2f}{r['tree_mb']:>8.0f}"
                        f"{r['client_mb']:>10.0f}{r['child_mb']:>13.0f}{load:>6.2f}  {_shares(t)}"
                        + (f"  FAILED {r['failed']}" if r["failed"] else ""),
                        flush=True,
                    )

if __name__ == "__main__":
    main()
