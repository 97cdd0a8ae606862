"""Peak resident memory of every process of ``equislide segment`` against slide size.

Run by hand::

    python bench/memory.py                                  # 20k x 15k, 40k x 30k, 80k x 60k at 0.25 µm/px
    python bench/memory.py --sizes 20000x15000 --mpp 0.5    # the user's analysis resolution
    python bench/memory.py --slides big.tiff other.tiff     # existing slides (e.g. the whole-slide phantom)

Each slide (the whole-slide phantom, ``equislide phantom --whole-slide``, at 0.25 µm/px) is segmented
alone by a fresh ``equislide segment`` (its own local cluster and
Prefect server) with random weights, so BatchNorm calibration runs too. A thread samples every 0.1 s
the resident set of the command and of every descendant and keeps each class's peak:

- ``flow``: the ``equislide segment`` process (Prefect flow, Dask client, nannies);
- ``worker``: a Dask worker process (it runs every stage task: tiling, calibration, features,
  K-means, outputs, unless a budget child does);
- ``budget child``: a child forked from a worker's forkserver for a budgeted stage call
  (``stages/budget.py``), and the forkserver itself;
- ``server``: the temporary Prefect server; ``other``: anything else.

Ratios are to the smallest slide, measured in the same run. Sampling can miss a spike shorter than
0.1 s.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).parent))

CLASSES = ("flow", "worker", "budget child", "server", "other")


def _classify(proc: psutil.Process, root: int, forkservers: set[int]) -> str:
    if proc.pid == root:
        return "flow"
    cmd = " ".join(proc.cmdline())
    if "forkserver" in cmd:
        forkservers.add(proc.pid)
        return "budget child"
    if proc.ppid() in forkservers:
        return "budget child"
    if "prefect" in cmd and ("server" in cmd or "uvicorn" in cmd):
        return "server"
    if "spawn_main" in cmd or "distributed" in cmd:
        return "worker"
    return "other"


def _segment(slide: Path, out: Path, args: argparse.Namespace) -> dict:
    env = {
        **os.environ,
        "PYTHONWARNINGS": "ignore",
        "PREFECT_HOME": tempfile.mkdtemp(),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    }
    cmd = [sys.executable, "-m", "equislide", "segment", str(slide), "--out", str(out)]
    cmd += ["--mpp", str(args.mpp), "--workers", str(args.workers), "--weights", "random", *args.extra]
    peaks = dict.fromkeys(CLASSES, 0)
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    root = psutil.Process(proc.pid)
    forkservers: set[int] = set()
    kinds: dict[int, str] = {}
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            with contextlib.suppress(psutil.Error):
                for p in [root, *root.children(recursive=True)]:
                    with contextlib.suppress(psutil.Error):
                        kind = kinds.get(p.pid) or kinds.setdefault(
                            p.pid, _classify(p, root.pid, forkservers)
                        )
                        peaks[kind] = max(peaks[kind], p.memory_info().rss)
            done.wait(0.1)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    log = proc.communicate()[0]
    done.set()
    thread.join()
    wall = time.perf_counter() - t0
    report = json.loads((out / "run.json").read_text()) if (out / "run.json").is_file() else {}
    samples = report.get("samples", {})
    # Tiles embedded, from the features stage's per-worker figures (the sample records hold no count).
    workers = ((report.get("stages") or {}).get("features") or {}).get("workers") or {}
    n_tiles = sum(int(w.get("tiles") or 0) for w in workers.values()) if samples else None
    if proc.returncode != 0:
        print(f"  segment exit status {proc.returncode}; last lines:\n" + "\n".join(log.splitlines()[-15:]))
    return {
        "wall_s": wall,
        "rc": proc.returncode,
        "n_tiles": n_tiles,
        **{k: v / 2**20 for k, v in peaks.items()},
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", nargs="+", default=["20000x15000", "40000x30000", "80000x60000"])
    parser.add_argument(
        "--slides", nargs="*", type=Path, default=[], help="existing slides instead of generated ones"
    )
    parser.add_argument("--mpp", type=float, default=2.5, help="analysis µm/px (segment --mpp)")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("extra", nargs="*", help="more segment options after --")
    args = parser.parse_args()
    from equislide.tiling import write_whole_slide_phantom

    print(
        f"{os.cpu_count()} CPUs; load average {os.getloadavg()[0]:.2f}; "
        f"segment --mpp {args.mpp} --workers {args.workers}"
    )
    rows = []
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        slides = list(args.slides)
        if not slides:
            for size in args.sizes:
                w, h = (int(v) for v in size.lower().split("x"))
                t = time.perf_counter()
                path = tmp / f"phantom{w}x{h}.tiff"
                write_whole_slide_phantom(path, width=w, height=h, mpp=0.25)
                slides.append(path)
                print(f"wrote {w} x {h} in {time.perf_counter() - t:.1f} s", flush=True)
        print(
            f"{'slide':>22s}{'tiles':>7s}{'wall s':>8s}"
            + "".join(f"{c + ' MB':>16s}" for c in CLASSES)
            + "   ratios to the first"
        )
        for slide in slides:
            r = _segment(slide, tmp / f"run-{slide.stem}", args)
            rows.append(r)
            first = rows[0]
            ratios = " ".join(f"{r[c] / first[c]:.2f}" if first[c] else "-" for c in CLASSES[:3])
            print(
                f"{slide.stem:>22s}{r['n_tiles'] or 0:>7d}{r['wall_s']:>8.1f}"
                + "".join(f"{r[c]:>16.0f}" for c in CLASSES)
                + f"   {ratios}",
                flush=True,
            )


if __name__ == "__main__":
    main()
