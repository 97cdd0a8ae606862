"""Measure: relative equivariance error of backbone features off the square's symmetries.

For a real H&E tile (default: the NCT-CRC tumour tile in ../shared/data), each backbone's features
at stages 1-4 are compared as ``f(R x)`` vs ``R f(x)`` for rotations R by 30, 45 and 90 degrees
(inside a central disc; see ``equislide.models.rotation_errors``). BatchNorm statistics are
re-estimated on the tile first, so untrained networks have sane scales. Baseline: ResNet-18 in
the same run; the table prints each backbone's error and its ratio to ResNet-18's.

    python bench/equivariance_error.py [--image PATH] [--size 224] [--e2cnn-width 20]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from _data import data_dir
from PIL import Image

from equislide.models import e2cnn_resnet18, recalibrate_batchnorm, resnet18, srenet18
from equislide.models.equivariance import rotation_errors

DEFAULT_TILE = data_dir() / "tiles" / "nct-crc" / "TUM-AEPINLNQ.png"
ANGLES = (30.0, 45.0, 90.0)


def load(path: Path, size: int) -> torch.Tensor:
    with Image.open(path) as im:
        rgb = np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0
    h, w = rgb.shape[:2]
    y0, x0 = (h - size) // 2, (w - size) // 2
    x = torch.from_numpy(rgb[y0 : y0 + size, x0 : x0 + size]).permute(2, 0, 1)[None]
    return (x - 0.5) / 0.25


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image", type=Path, default=DEFAULT_TILE)
    parser.add_argument("--size", type=int, default=224, help="crop side (224 = a whole NCT-CRC tile)")
    parser.add_argument("--e2cnn-width", type=int, default=None, help="fields in stage 1 (default: parity)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    x = load(args.image, args.size)
    backbones = {
        "ResNet-18": (resnet18(), x),
        "SRENet-18 hard": (srenet18(rings="hard"), x),
        "SRENet-18 soft": (srenet18(rings="soft"), x),
    }
    try:
        backbones["E2CNN C8"] = (e2cnn_resnet18("C8", width=args.e2cnn_width), x)
    except ImportError as err:
        print(f"skipping E2CNN: {err}")
    results = {}
    with torch.no_grad():
        for name, (model, inp) in backbones.items():
            recalibrate_batchnorm(model, [inp])
            results[name] = {a: rotation_errors(model.forward_intermediates, inp, a) for a in ANGLES}
    print(f"relative equivariance error of features on {args.image.name}, {args.size} px")
    print("(in parentheses: ratio to ResNet-18's error at the same angle and stage)")
    base = results["ResNet-18"]
    for a in ANGLES:
        print(f"\n{a:.0f} degrees{'':7s}" + "".join(f"{f'stage {i}':>16s}" for i in (1, 2, 3, 4)))
        for name, res in results.items():
            cells = "".join(f"{res[a][i]:8.3f} ({res[a][i] / base[a][i]:4.2f})" for i in range(4))
            print(f"{name:18s}{cells}")


if __name__ == "__main__":
    main()
