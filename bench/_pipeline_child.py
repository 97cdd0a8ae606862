"""One run of the cohort flow for ``bench/pipeline.py``, in a process of its own, sampling peak memory.

Usage: ``python bench/_pipeline_child.py OUT WORKERS WEIGHTS|'' SLIDE...``; prints one line
``RESULT {json}`` (wall time, the flow's timings, samples, failures, peak resident MB of the process
tree, of this process and of its largest descendant).
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import threading
import time

os.environ.setdefault("PREFECT_HOME", tempfile.mkdtemp())
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

import contextlib

import psutil  # noqa: E402

peak = {"tree": 0, "client": 0, "child": 0}
stop = threading.Event()


def sample_rss() -> None:
    """Every 0.1 s: the resident set of this process and of all its descendants; keep the peaks."""
    me = psutil.Process()
    while not stop.is_set():
        try:
            client = me.memory_info().rss
            kids = []
            for c in me.children(recursive=True):
                with contextlib.suppress(psutil.Error):
                    kids.append(c.memory_info().rss)
            peak["tree"] = max(peak["tree"], client + sum(kids))
            peak["client"] = max(peak["client"], client)
            peak["child"] = max([peak["child"], *kids])
        except psutil.Error:
            pass
        stop.wait(0.1)


def main() -> None:
    from equislide.flows.cohort import run_cohort

    out, workers, weights, slides = sys.argv[1], int(sys.argv[2]), sys.argv[3] or None, sys.argv[4:]
    threading.Thread(target=sample_rss, daemon=True).start()
    t0 = time.perf_counter()
    rep = run_cohort(slides, out, workers=workers, weights=weights)
    wall = time.perf_counter() - t0
    stop.set()
    failed = [s for s, v in rep["samples"].items() if v["status"] == "failed"]
    result = {
        "wall_s": wall,
        "timings": rep["timings"],
        "samples": len(rep["samples"]),
        "failed": failed,
        **{f"{k}_mb": v / 2**20 for k, v in peak.items()},
    }
    print("RESULT " + json.dumps(result))


if __name__ == "__main__":  # DaskTaskRunner's worker processes re-import the main module
    main()
