"""Measure: peak RSS and seconds of the segment stage of one whole slide, single-process against ranges.

For each finished tile store given (with features of ``--layer``; e.g. ``OUT/tiles/<sample>.zarr`` of an
``equislide segment`` run on whole-slide phantoms of three sizes), two child processes each segment it
into a fresh folder (the sample's own K-means fit, the paper's protocol, so no cohort model is needed):

* ``single``: :func:`equislide.stages.segment.segment_store`, the whole label map in one process;
* ``ranges``: :func:`equislide.stages.segment.segment_store_ranges` over every range in one process
  (the share that publishes, so the largest process of a ranged run), band-stitched outputs.

Each child reports its peak RSS (``ru_maxrss``), its RSS after imports (the interpreter's and libraries'
share) and seconds; the outputs of the two are compared (OME-Zarr and overlay bytes, GeoJSON bytes,
label counts). Ratios are against the first store of the same run. Repeated ``--repeats`` times; medians.

    python bench/segment_memory.py STORE.zarr [STORE.zarr ...] [--layer 4] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile

CHILD = r"""
import json, resource, sys, time
from pathlib import Path
from equislide.specs import ClusterSpec
from equislide.stages import segment
mode, store, out, layer = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t0 = time.perf_counter()
fn = segment.segment_store if mode == "single" else segment.segment_store_ranges
res = fn(store, out, layer=layer, spec=ClusterSpec(k=3, backend="torch"))
print(json.dumps({
    "seconds": time.perf_counter() - t0,
    "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    "rss_imports_mb": rss0 / 1024,
    "label_counts": res["label_counts"], "shape": res["shape"], "outputs": res["outputs"],
}))
"""


def _tree(path: str) -> dict[str, bytes]:
    from pathlib import Path

    p = Path(path)
    if p.is_file():
        return {"": p.read_bytes()}
    return {str(f.relative_to(p)): f.read_bytes() for f in sorted(p.rglob("*")) if f.is_file()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("stores", nargs="+")
    ap.add_argument("--layer", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    rows = []
    for store in args.stores:
        runs: dict[str, list[dict]] = {"single": [], "ranges": []}
        for _ in range(args.repeats):
            for mode in runs:
                with tempfile.TemporaryDirectory(prefix="equislide-segmem-") as tmp:
                    cmd = [sys.executable, "-c", CHILD, mode, store, tmp, str(args.layer)]
                    done = subprocess.run(cmd, capture_output=True, text=True, check=True)
                    doc = json.loads(done.stdout.strip().splitlines()[-1])
                    doc["trees"] = {k: _tree(v) for k, v in doc["outputs"].items() if k != "kmeans"}
                    runs[mode].append(doc)
        a, b = runs["single"][0], runs["ranges"][0]
        same = a["label_counts"] == b["label_counts"] and a["trees"] == b["trees"]
        row = {"store": store, "shape": a["shape"], "same_outputs": same}
        for mode, docs in runs.items():
            for key in ("rss_mb", "rss_imports_mb", "seconds"):
                row[f"{mode}_{key}"] = round(statistics.median(d[key] for d in docs), 1)
            row[f"{mode}_rss_runs"] = [round(d["rss_mb"], 1) for d in docs]
        rows.append(row)
        print(json.dumps(row), flush=True)
    base = rows[0]
    print("\nstore | label map | single MB (x first) | ranges MB (x first) | single s | ranges s | same")
    for r in rows:
        print(
            f"{r['store']} | {r['shape'][0]} x {r['shape'][1]} | {r['single_rss_mb']} "
            f"({r['single_rss_mb'] / base['single_rss_mb']:.2f}x) | {r['ranges_rss_mb']} "
            f"({r['ranges_rss_mb'] / base['ranges_rss_mb']:.2f}x) | {r['single_seconds']} | "
            f"{r['ranges_seconds']} | {r['same_outputs']}"
        )


if __name__ == "__main__":
    main()
