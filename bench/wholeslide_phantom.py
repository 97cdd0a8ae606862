"""Measure: seconds, CPU seconds and peak RSS of ``write_whole_slide_phantom`` at three slide sizes.

Each size runs in its own child process (so each peak RSS is that size's own), which writes the slide into
a temporary folder, opens it with OpenSlide to check the pyramid and the mpp, and reports. The baseline is
the smallest size of the same run: time ratios show how the cost grows with the area (16x from the first
to the third size), RSS ratios that memory does not. ``rss_imports`` is the child's RSS after importing
equislide and before writing, the interpreter's and libraries' share.

    python bench/wholeslide_phantom.py [--sizes 20000x15000 40000x30000 80000x60000] [--mpp 0.25] [--seed 0]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile

CHILD = r"""
import json, resource, sys, time
from pathlib import Path
import openslide
from equislide.tiling import write_whole_slide_phantom
w, h, seed = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[4])
mpp, out = float(sys.argv[3]), Path(sys.argv[5])
rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
info = write_whole_slide_phantom(out, width=w, height=h, mpp=mpp, seed=seed)
seconds = time.perf_counter() - t0
r1 = resource.getrusage(resource.RUSAGE_SELF)
with openslide.OpenSlide(out) as s:
    levels = [round(d) for d in s.level_downsamples]
    mpp_x = float(s.properties["openslide.mpp-x"])
print(json.dumps({
    "seconds": seconds,
    "cpu_seconds": (r1.ru_utime + r1.ru_stime) - (r0.ru_utime + r0.ru_stime),
    "rss_mb": r1.ru_maxrss / 1024, "rss_imports_mb": rss0 / 1024,
    "file_mb": out.stat().st_size / 2**20, "levels": levels, "mpp_x": mpp_x,
    "pieces": len(info.pieces),
}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", nargs="+", default=["20000x15000", "40000x30000", "80000x60000"])
    ap.add_argument("--mpp", type=float, default=0.25)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    rows = []
    for size in args.sizes:
        w, h = (int(v) for v in size.lower().split("x"))
        with tempfile.TemporaryDirectory(prefix="equislide-wsphantom-") as tmp:
            cmd = [
                sys.executable,
                "-c",
                CHILD,
                str(w),
                str(h),
                str(args.mpp),
                str(args.seed),
                f"{tmp}/s.tiff",
            ]
            done = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if done.returncode:
            sys.exit(f"{size}: child failed:\n{done.stderr}")
        rows.append((w, h, json.loads(done.stdout.strip().splitlines()[-1])))
        print(f"{size}: {rows[-1][2]}", flush=True)
    w0, h0, base = rows[0]
    print(
        f"\n{'size':>12} {'Mpx':>6} {'area':>5} {'s':>7} {'s/ref':>6} {'cpu s':>7} {'cpu/ref':>7} "
        f"{'RSS MB':>7} {'RSS/ref':>7} {'file MB':>8} levels"
    )
    for w, h, r in rows:
        print(
            f"{w:>6}x{h:<5} {w * h / 1e6:>6.0f} {w * h / (w0 * h0):>5.0f} {r['seconds']:>7.1f} "
            f"{r['seconds'] / base['seconds']:>6.2f} {r['cpu_seconds']:>7.1f} "
            f"{r['cpu_seconds'] / base['cpu_seconds']:>7.2f} {r['rss_mb']:>7.0f} "
            f"{r['rss_mb'] / base['rss_mb']:>7.2f} {r['file_mb']:>8.0f} {len(r['levels'])}"
        )
    print(
        f"(RSS after imports, before writing: {base['rss_imports_mb']:.0f} MB; mpp read back {base['mpp_x']})"
    )


if __name__ == "__main__":
    main()
