"""Benchmark: SRE-Conv dense vs ring vs auto, per SRENet-18 layer and for the whole network, against the peak.

Baseline: ``impl="dense"`` (the reference formulation, k x k kernel through conv2d), measured in
the same run. The machine's float32 and bf16 peak are measured in the same run too, as reached by a
large dense ``conv2d`` (oneDNN, 256 -> 256 channels, 3 x 3, 128 px, channels_last) and by a large
GEMM (``torch.mm``, n^3; in float32 also oneDNN's, which the ring path mixes with). Every path
prints its time (median of the repeats; dense, ring and auto are timed in turn within each repeat,
so load on a shared machine falls on all three), its speed-up over dense, and its achieved FLOP/s
as a fraction of the float32 conv peak, counting each path's own work: the ring path's is the
bench's ``macs`` (ring sums over each ring's cropped support plus the R x C_in x C_out mixing), far
less than the dense kernel's. Where ``auto`` took one path in every layer it runs that path's very
code, so its row names the path and prints its time's spread from that path's (a measure of the
run's noise); it is flagged only when the path it took was the slower by more than 5%. Two more
baselines are timed in the same repeats where they apply: the ring path with torch's depthwise sums
instead of the C kernel ("C kernel x torch sums") and, in float32, mixing with ``torch.mm`` instead
of oneDNN ("oneDNN mix x torch.mm").

    python bench/sre_conv.py --quick                      # batch 1, 512 px, 2 repeats
    python bench/sre_conv.py --sizes 224 256 512 --batches 1 8 --threads 1 2
    python bench/sre_conv.py --precisions fp32 --clock cpu --threads 1   # on a loaded machine
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from contextlib import nullcontext

import torch
import torch.nn.functional as F

from equislide.models import SREConv2d, _mix_gemm, _ring_kernel, srenet18

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16}


def timed(fn, repeats: int, clock) -> float:
    """Median seconds of ``repeats`` calls after one warm-up (oneDNN primitive creation, allocator)."""
    fn()
    times = []
    for _ in range(repeats):
        t0 = clock()
        fn()
        times.append(clock() - t0)
    return statistics.median(times)


def timed_together(fns: dict, repeats: int, clock) -> dict[str, float]:
    """Median seconds of each of ``fns``, timed in turn within every repeat (after one warm-up
    each) and in a rotated order, so that a slow spell on a shared machine, or what running after
    another path leaves in the caches and the allocator, falls on all of them alike."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    names = list(fns)
    for i in range(repeats):
        for name in names[i % len(names) :] + names[: i % len(names)]:  # each takes every place in turn
            fn = fns[name]
            t0 = clock()
            fn()
            times[name].append(clock() - t0)
    return {name: statistics.median(v) for name, v in times.items()}


def autocast(precision: str):
    dtype = PRECISIONS[precision]
    return nullcontext() if dtype is None else torch.autocast("cpu", dtype=dtype)


def peaks(repeats: int, clock, gemm: int) -> dict[str, float]:
    """FLOP/s of a large dense conv2d and a large GEMM in float32 and bf16."""
    out = {}
    x = torch.randn(1, 256, 128, 128).contiguous(memory_format=torch.channels_last)
    w = torch.randn(256, 256, 3, 3).contiguous(memory_format=torch.channels_last)
    conv_flop = 2 * 256 * 256 * 9 * 128 * 128
    a, b = torch.randn(gemm, gemm), torch.randn(gemm, gemm)
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        xd, wd, ad, bd = x.to(dtype), w.to(dtype), a.to(dtype), b.to(dtype)
        out[f"conv {name}"] = conv_flop / timed(
            lambda xd=xd, wd=wd: F.conv2d(xd, wd, None, 1, 1), repeats, clock
        )
        out[f"gemm {name}"] = 2 * gemm**3 / timed(lambda ad=ad, bd=bd: torch.mm(ad, bd), repeats, clock)
    op = _mix_gemm._op()
    if op is not None:  # the GEMM the ring path mixes float32 with (models/_mix_gemm.py)
        bt = b.t()
        out["gemm fp32 oneDNN"] = 2 * gemm**3 / timed(lambda: op(a, bt, None, "none", [], ""), repeats, clock)
    return out


def macs(conv: SREConv2d, h_out: int, w_out: int) -> tuple[int, int]:
    """(dense, ring) multiply-adds of one layer for one image."""
    cin_g = conv.in_channels // conv.groups
    dense = conv.out_channels * cin_g * conv.kernel_size**2 * h_out * w_out
    # The C kernel adds only a ring's own taps; torch's depthwise sums run over its cropped support.
    kernel = conv._use_kernel and _ring_kernel.load() is not None
    ring_sums = sum(
        conv.in_channels * (int(torch.count_nonzero(plane)) if kernel else plane.numel())
        for plane, _, identity in conv._ring_plan
        if not identity
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


def network_macs(model: torch.nn.Module, x: torch.Tensor, layer: int) -> tuple[dict[str, int], set[str]]:
    """Multiply-adds of the SRE-Convs of ``model.features(x, layer)`` (an ``auto`` model) per path,
    and the paths ``auto`` took."""
    total = {"dense": 0, "ring": 0, "auto": 0}
    chosen: set[str] = set()

    def hook(conv, _inputs, output):
        dense, ring = macs(conv, output.shape[-2], output.shape[-1])
        n = output.shape[0]
        total["dense"] += n * dense
        total["ring"] += n * ring
        total["auto"] += n * (ring if conv.resolved_impl == "ring" else dense)
        chosen.add(conv.resolved_impl)

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, SREConv2d)]
    try:
        model.features(x, layer)
    finally:
        for h in handles:
            h.remove()
    return total, chosen


def row(label: str, times: dict[str, float], work: dict[str, int], peak: float, auto_is: str | None) -> str:
    """One table row; ``auto_is`` is the path ``auto`` took in every layer, or None where it mixed."""
    fastest = min(times["dense"], times["ring"])
    if auto_is is None:
        slow = times["auto"] > 1.05 * fastest
        auto_note = "  AUTO >5% SLOWER THAN THE FASTER PATH" if slow else ""
    else:
        # auto ran the very code of one path: what it is judged on is the choice; its time differs
        # from that path's only by the noise of the run, printed for what it says of the noise.
        other = "dense" if auto_is == "ring" else "ring"
        wrong = times[other] * 1.05 < times[auto_is]
        spread = times["auto"] / times[auto_is] - 1
        auto_note = f"  auto = {auto_is} ({spread:+.0%})" + ("  AUTO CHOSE THE SLOWER PATH" if wrong else "")
    cells = "".join(
        f"{times[i] * 1e3:10.1f}{2 * work[i] / times[i] / 1e9:7.0f}{2 * work[i] / times[i] / peak:6.0%}"
        for i in ("dense", "ring", "auto")
    )
    speedups = f"{times['dense'] / times['ring']:8.2f}{times['dense'] / times['auto']:7.2f}"
    return f"{label:34s}{cells}{speedups}{auto_note}"


HEADER = (
    f"{'':34s}{'dense ms':>10s}{'GF/s':>7s}{'peak':>6s}{'ring ms':>10s}{'GF/s':>7s}{'peak':>6s}"
    f"{'auto ms':>10s}{'GF/s':>7s}{'peak':>6s}{'ring x':>8s}{'auto x':>7s}"
)


def _ring_without(convs: dict, name: str, switch: str) -> None:
    """Add ``name``: a copy of the ring model with every SRE-Conv's ``switch`` turned off."""
    model = copy.deepcopy(convs["ring"])
    for conv in [model, *model.modules()]:
        if isinstance(conv, SREConv2d):
            setattr(conv, switch, False)
    convs[name] = model


def with_torch_sums(convs: dict) -> None:
    """Add ``"torch sums"``: the ring path with the C kernel switched off, the kernel's baseline."""
    if _ring_kernel.load() is not None:
        _ring_without(convs, "torch sums", "_use_kernel")


def with_torch_mm(convs: dict, precision: str) -> None:
    """Add ``"torch mm"``: the ring path mixing with ``torch.mm`` (MKL's sgemm) instead of oneDNN,
    the baseline of models/_mix_gemm.py (float32 only: bf16 takes torch.mm either way)."""
    if precision == "fp32" and _mix_gemm._op() is not None:
        _ring_without(convs, "torch mm", "_use_onednn")


def kernel_note(times: dict[str, float]) -> str:
    note = ""
    if "torch sums" in times:
        torch_ms = times["torch sums"] * 1e3
        note += f"  C kernel {times['torch sums'] / times['ring']:.2f}x torch sums ({torch_ms:.1f} ms)"
    if "torch mm" in times:
        mm_ms = times["torch mm"] * 1e3
        note += f"  oneDNN mix {times['torch mm'] / times['ring']:.2f}x torch.mm ({mm_ms:.1f} ms)"
    return note


def bench_layers(size: int, batch: int, precision: str, repeats: int, clock, peak: float) -> None:
    print(f"\nper layer, batch {batch}, {size} px, {precision}  (peak = fraction of the fp32 conv peak)")
    print(HEADER)
    for name, cin, cout, k, side in layer_shapes(size):
        convs = {impl: SREConv2d(cin, cout, k, impl=impl).eval() for impl in ("dense", "ring", "auto")}
        for conv in convs.values():
            conv.load_state_dict(convs["dense"].state_dict())
        with_torch_sums(convs)
        with_torch_mm(convs, precision)
        x = torch.randn(batch, cin, side, side).contiguous(memory_format=torch.channels_last)
        with autocast(precision):
            times = timed_together({i: lambda c=c, x=x: c(x) for i, c in convs.items()}, repeats, clock)
            a, b = convs["dense"](x).float(), convs["ring"](x).float()
            auto_is = convs["auto"].resolved_impl
        dense, ring = macs(convs["dense"], side, side)
        work = {"dense": batch * dense, "ring": batch * ring}
        work["auto"] = work[auto_is]
        diff = float((a - b).abs().max() / a.abs().max())
        label = f"{name} {cin}->{cout} k{k} @{side}"
        print(row(label, times, work, peak, auto_is) + f"  diff {diff:.0e}" + kernel_note(times))


def bench_network(size: int, batch: int, precision: str, repeats: int, layer: int, clock, peak: float):
    x = torch.rand(batch, 3, size, size)
    models = {impl: srenet18(impl=impl).eval() for impl in ("dense", "ring", "auto")}
    for m in models.values():
        m.load_state_dict(models["dense"].state_dict())
    with_torch_sums(models)
    with_torch_mm(models, precision)
    with autocast(precision):
        work, chosen = network_macs(models["auto"], x, layer)
        times = timed_together(
            {i: lambda model=model: model.features(x, layer) for i, model in models.items()}, repeats, clock
        )
        outs = {impl: models[impl].features(x, layer).float() for impl in ("dense", "ring", "auto")}
    auto_is = next(iter(chosen)) if len(chosen) == 1 else None
    ref = outs["dense"]
    diff = max(float((outs[i] - ref).abs().max() / ref.abs().max()) for i in ("ring", "auto"))
    print(
        row(f"features(x, {layer}) b{batch} {size}px {precision}", times, work, peak, auto_is)
        + f"  diff {diff:.0e}"
        + kernel_note(times)
    )
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", "--size", type=int, nargs="+", default=[512])
    parser.add_argument("--batches", "--batch", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--threads", type=int, nargs="+", default=[torch.get_num_threads()])
    parser.add_argument("--precisions", nargs="+", choices=sorted(PRECISIONS), default=["fp32", "bf16"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--layer", type=int, default=4)
    parser.add_argument("--gemm", type=int, default=4096, help="side of the peak GEMM (n x n x n)")
    parser.add_argument(
        "--clock",
        choices=["wall", "cpu"],
        default="wall",
        help="cpu: this process's CPU seconds, steadier than wall time on a machine shared with other jobs",
    )
    parser.add_argument("--quick", action="store_true", help="batch 1 only, 2 repeats, 2048 GEMM")
    parser.add_argument("--skip-layers", action="store_true")
    parser.add_argument("--skip-network", action="store_true")
    args = parser.parse_args()
    if args.quick:
        args.batches, args.repeats, args.gemm = [1], 2, 2048
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.backends.cpu.get_cpu_capability()}, clock {args.clock}")
    print(f"ring sums: {'C kernel' if _ring_kernel.load() else 'torch depthwise convolutions'}")
    print(f"float32 mixing GEMM: {'oneDNN matmul' if _mix_gemm._op() else 'torch.mm'}")
    summary = []
    with torch.no_grad():
        for threads in args.threads:
            torch.set_num_threads(threads)
            peak = peaks(args.repeats, clock, args.gemm)
            print(
                f"\n== {threads} thread(s); peak GFLOP/s: "
                + ", ".join(f"{k} {v / 1e9:.0f}" for k, v in peak.items())
            )
            fp32 = peak["conv fp32"]
            for size in args.sizes:
                for precision in args.precisions:
                    if not args.skip_layers:
                        bench_layers(size, 1, precision, args.repeats, clock, fp32)
            if args.skip_network:
                continue
            print("\nwhole network")
            print(HEADER)
            for size in args.sizes:
                for batch in args.batches:
                    ring = {}
                    for precision in args.precisions:
                        # Dense SRENet-18 at 512 px, batch 8 is minutes on 2 cores: one timed repeat.
                        repeats = args.repeats if batch * size * size <= 512 * 512 else 1
                        ring[precision] = bench_network(
                            size, batch, precision, repeats, args.layer, clock, fp32
                        )
                    if "fp32" in ring and "bf16" in ring:
                        summary.append(
                            f"{threads} thr {size} px b{batch}: ring bf16 / fp32 speed "
                            f"{ring['fp32']['ring'] / ring['bf16']['ring']:.2f}x"
                        )
    for line in summary:
        print(line)


if __name__ == "__main__":
    main()
