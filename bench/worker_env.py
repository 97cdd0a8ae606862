"""Measure: SRENet feature extraction inside a Dask worker, with Dask's default environment vs equislide's.

Run by hand::

    python bench/worker_env.py [--size 304] [--repeats 8] [--width 64] [--layer 4]

Dask's nanny starts workers with ``MALLOC_TRIM_THRESHOLD_=65536``; setting any glibc malloc threshold
turns glibc's adaptive mmap threshold off, so every tensor over 128 KiB is mmap-ed and unmapped again.
Local clusters in equislide add ``MALLOC_MMAP_THRESHOLD_`` (``equislide.flows.cluster.WORKER_PRE_SPAWN_ENV``).
Each configuration is a fresh one-worker ``LocalCluster`` (single-threaded, as the flow runs them) timing
``repeats`` forward passes of one TMA-core-sized image (after one warm-up pass); the same in this plain
process is printed for reference. Baseline: Dask's default environment, measured in the same run.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os


def _time_features(size: int, repeats: int, width: int, layer: int) -> float:
    import time

    import torch

    from equislide.models.srenet import srenet18

    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = srenet18(width=width).eval()
    x = torch.rand(1, 3, size, size)
    with torch.no_grad():
        model.features(x, layer)
        t0 = time.perf_counter()
        for _ in range(repeats):
            model.features(x, layer)
    return (time.perf_counter() - t0) / repeats


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size", type=int, default=304, help="image side, px (a 600 µm core at 2.5 µm/px)")
    parser.add_argument("--repeats", type=int, default=8)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--layer", type=int, default=4)
    args = parser.parse_args()
    from distributed import Client, LocalCluster

    from equislide.flows.cluster import worker_environment

    opts = (args.size, args.repeats, args.width, args.layer)
    print(f"{os.cpu_count()} CPUs; SRENet-18 width {args.width}, layer {args.layer}, "
          f"{args.size} px, 1 thread")
    base = None
    for name, env in (("Dask default", contextlib.nullcontext()), ("equislide", worker_environment())):
        with env:
            cluster = LocalCluster(
                n_workers=1, threads_per_worker=1, processes=True, dashboard_address=None,
                silence_logs=logging.ERROR,
            )
        with cluster, Client(cluster) as client:
            seconds = client.submit(_time_features, *opts, pure=False).result()
            malloc = next(iter(client.run(
                lambda: {k: os.environ.get(k) for k in ("MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_")}
            ).values()))
        base = base or seconds
        print(f"{name:14s} {seconds:7.3f} s per image  {base / seconds:5.2f}x  {malloc}")
    print(f"{'plain process':14s} {_time_features(*opts):7.3f} s per image (no Dask; glibc defaults here)")


if __name__ == "__main__":
    main()
