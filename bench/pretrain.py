"""Benchmark: training images/s (forward + backward + SGD step) of the pretrain backbones.

Baseline: ResNet-18 in fp32, measured in the same run. Configurations: SRENet-18 with every SRE-Conv
on the dense path, on the ring path (what ``pretrain`` trains with) and ``auto``; ResNet-18; each in
fp32 and under bf16 autocast. Prints images/s (best of N steps after a warm-up) and the ratio to the
baseline. Random images stand in for tiles: the cost does not depend on the pixels.

    python bench/pretrain.py                     # 96 px, batch 8, 3 timed steps
    python bench/pretrain.py --size 224 --batch 16 --device cuda
"""

from __future__ import annotations

import argparse
import os
import time

import torch
import torch.nn.functional as F

from equislide.models import create_model

CONFIGS = (
    ("resnet18", {}),
    ("srenet18", {"impl": "dense"}),
    ("srenet18", {"impl": "ring"}),
    ("srenet18", {"impl": "auto"}),
)


def images_per_s(arch: str, kwargs: dict, *, size: int, batch: int, steps: int, bf16: bool, device) -> float:
    torch.manual_seed(0)
    model = create_model(arch, **kwargs).to(device).train()
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x = torch.randn(batch, 3, size, size, device=device)
    y = torch.randint(0, 9, (batch,), device=device)

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = F.cross_entropy(model(x).float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize()

    step()  # warm-up: oneDNN / cuDNN primitive choice, allocator
    best = float("inf")
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        best = min(best, time.perf_counter() - t0)
    return batch / best


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=96)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    print(f"{args.size} px, batch {args.batch}, {args.threads} threads, {device}, torch {torch.__version__}")
    base = None
    for bf16 in (False, True):
        for arch, kwargs in CONFIGS:
            rate = images_per_s(
                arch, kwargs, size=args.size, batch=args.batch, steps=args.steps, bf16=bf16, device=device
            )
            base = base or rate  # the first measurement: resnet18 fp32
            name = f"{arch}{'/' + kwargs['impl'] if kwargs else ''}"
            print(
                f"{name:16s} {'bf16' if bf16 else 'fp32'}  {rate:8.2f} img/s  "
                f"x{rate / base:.3f} vs resnet18 fp32",
                flush=True,
            )


if __name__ == "__main__":
    main()
