"""Benchmark: SRE-Conv dense vs ring implementation, per SRENet-18 layer and for the whole network.

Baseline: ``impl="dense"`` (the reference formulation, k x k kernel through conv2d), measured in
the same run. Prints wall time (best of N), the speed-up of ``ring`` and ``auto`` over dense,
multiply-add counts, and the largest relative difference of the outputs.

    python bench/sre_conv.py                 # layers + whole network, batch 1 and 8, 512 x 512
    python bench/sre_conv.py --quick         # batch 1 only, fewer repeats
    python bench/sre_conv.py --size 256 --threads 1
"""

from __future__ import annotations

import argparse
import time

import torch

from equislide.models import SREConv2d, srenet18


def best_of(fn, repeats: int) -> float:
    fn()  # warm-up: oneDNN primitive creation, allocator
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def macs(conv: SREConv2d, h_out: int, w_out: int) -> tuple[int, int]:
    """(dense, ring) multiply-adds of one layer for one image."""
    cin_g = conv.in_channels // conv.groups
    dense = conv.out_channels * cin_g * conv.kernel_size**2 * h_out * w_out
    ring_sums = sum(
        conv.in_channels * plane.numel() for plane, _, identity in conv._ring_plan if not identity
    )
    ring = (ring_sums + conv.out_channels * cin_g * conv.num_rings) * h_out * w_out
    return dense, ring


def layer_shapes(size: int) -> list[tuple[str, int, int, int, int]]:
    """(name, in, out, kernel, side) of every distinct SRE-Conv in SRENet-18 at input ``size``."""
    return [
        ("stem", 3, 64, 7, size),
        ("layer1", 64, 64, 9, size),
        ("layer2.0.conv1", 64, 128, 9, size // 2),
        ("layer2", 128, 128, 9, size // 2),
        ("layer3.0.conv1", 128, 256, 5, size // 4),
        ("layer3", 256, 256, 5, size // 4),
        ("layer4.0.conv1", 256, 512, 5, size // 8),
        ("layer4", 512, 512, 5, size // 8),
    ]


def bench_layers(size: int, batch: int, repeats: int) -> None:
    print(f"\nper layer, batch {batch}, input {size} x {size} (times in ms, best of {repeats})")
    print(
        f"{'layer':16s}{'shape':>22s}{'dense':>9s}{'ring':>9s}{'ring x':>8s}{'auto':>6s}"
        f"{'GMAC dense':>12s}{'GMAC ring':>11s}{'max rel diff':>14s}"
    )
    for name, cin, cout, k, side in layer_shapes(size):
        dense = SREConv2d(cin, cout, k, impl="dense").eval()
        ring = SREConv2d(cin, cout, k, impl="ring").eval()
        ring.load_state_dict(dense.state_dict())
        x = torch.randn(batch, cin, side, side).contiguous(memory_format=torch.channels_last)
        t_dense = best_of(lambda dense=dense, x=x: dense(x), repeats)
        t_ring = best_of(lambda ring=ring, x=x: ring(x), repeats)
        a, b = dense(x), ring(x)
        diff = float((a - b).abs().max() / a.abs().max())
        m_dense, m_ring = macs(dense, side, side)
        auto = SREConv2d(cin, cout, k).resolved_impl
        print(
            f"{name:16s}{f'{cin}->{cout} k{k} @{side}':>22s}{t_dense * 1e3:9.1f}{t_ring * 1e3:9.1f}"
            f"{t_dense / t_ring:8.2f}{auto:>6s}{batch * m_dense / 1e9:12.2f}{batch * m_ring / 1e9:11.2f}"
            f"{diff:14.1e}"
        )


def bench_network(size: int, batch: int, repeats: int, layer: int) -> None:
    x = torch.rand(batch, 3, size, size)
    models = {impl: srenet18(impl=impl).eval() for impl in ("dense", "ring", "auto")}
    for m in models.values():
        m.load_state_dict(models["dense"].state_dict())
    times, outs = {}, {}
    for impl, model in models.items():
        times[impl] = best_of(lambda model=model: model.features(x, layer), repeats)
        outs[impl] = model.features(x, layer)
    ref = outs["dense"]
    print(f"\nwhole SRENet-18 features(x, {layer}), batch {batch}, input {size} x {size}, best of {repeats}")
    for impl in ("dense", "ring", "auto"):
        diff = float((outs[impl] - ref).abs().max() / ref.abs().max())
        print(
            f"  {impl:6s}{times[impl]:9.2f} s   {times['dense'] / times[impl]:5.2f}x vs dense   "
            f"{batch / times[impl]:6.2f} img/s   max rel diff {diff:.1e}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--layer", type=int, default=4)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--quick", action="store_true", help="batch 1 only, 2 repeats")
    parser.add_argument("--skip-layers", action="store_true")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        args.batches, args.repeats = [1], 2
    torch.manual_seed(0)
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"{torch.backends.cpu.get_cpu_capability()}"
    )
    with torch.no_grad():
        if not args.skip_layers:
            bench_layers(args.size, 1, args.repeats)
        for batch in args.batches:
            # Batch 8 through dense SRENet-18 at 512 px is minutes on 2 cores: one timed repeat.
            bench_network(args.size, batch, args.repeats if batch == 1 else 1, args.layer)


if __name__ == "__main__":
    main()
