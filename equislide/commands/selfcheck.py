"""``equislide selfcheck``: prove on this machine that SRENet features follow rotations of the input.

For SRENet-18 (and the ResNet-18 baseline) it rotates and flips an H&E image by every symmetry of
the square and compares the rotated features with the features of the rotated image at every
stage, then measures the relative error at 30 and 45 degrees. Exit status 0 when SRENet is exactly
equivariant (to float tolerance) at every stage, 1 otherwise.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "selfcheck",
        help="check that SRENet features are rotation-equivariant on this machine",
        description=__doc__,
    )
    p.add_argument(
        "--image",
        type=Path,
        default=None,
        help="an RGB H&E image (PNG/JPEG/TIFF); default: a generated H&E-like image",
    )
    p.add_argument("--size", type=int, default=128, help="side of the square crop in px (multiple of 8)")
    p.add_argument("--rings", choices=("hard", "soft"), default="hard")
    p.add_argument("--seed", type=int, default=0)
    return p


def _synthetic_he(size: int, seed: int):
    import numpy as np
    from scipy import ndimage
    from skimage.color import hed2rgb

    rng = np.random.default_rng(seed)
    nuclei = ndimage.gaussian_filter((rng.random((size, size)) > 0.985).astype(float), 2.0)
    stroma = ndimage.gaussian_filter(rng.standard_normal((size, size)), (1.5, 6.0))
    hed = np.zeros((size, size, 3))
    hed[..., 0] = 0.08 + 4.0 * nuclei
    hed[..., 1] = 0.10 + 0.05 * np.clip(stroma, 0, None)
    return np.clip(hed2rgb(hed), 0, 1).astype(np.float32)


def _load(image: Path | None, size: int, seed: int):
    import numpy as np
    from PIL import Image

    if image is None:
        return _synthetic_he(size, seed), "generated H&E-like image"
    try:
        with Image.open(image) as im:
            rgb = np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0
    except (OSError, ValueError) as err:
        raise SystemExit(f"equislide selfcheck: {image}: cannot read image ({err})") from None
    h, w = rgb.shape[:2]
    if min(h, w) < size:
        raise SystemExit(f"equislide selfcheck: {image}: image is {w}x{h}, smaller than --size {size}")
    y0, x0 = (h - size) // 2, (w - size) // 2
    return rgb[y0 : y0 + size, x0 : x0 + size], str(image)


def run(args: argparse.Namespace) -> int:
    if args.size % 8 or args.size < 16:
        raise SystemExit(f"equislide selfcheck: --size {args.size} must be a multiple of 8, at least 16")
    import torch
    from rich.console import Console
    from rich.table import Table

    from equislide.models import recalibrate_batchnorm, resnet18, srenet18
    from equislide.models.equivariance import d4_errors, rotation_errors

    console = Console()
    torch.manual_seed(args.seed)
    rgb, source = _load(args.image, args.size, args.seed)
    x = (torch.from_numpy(rgb).permute(2, 0, 1)[None] - 0.5) / 0.25
    models = {f"SRENet-18 ({args.rings} rings)": srenet18(rings=args.rings), "ResNet-18": resnet18()}
    table = Table(title=f"Equivariance of features on {source}, {args.size} x {args.size} px")
    for col in ("backbone", "stage", "D4 max rel. error", "exact?", "rel. error 30°", "rel. error 45°"):
        table.add_column(col, justify="right" if col != "backbone" else "left")
    srenet_exact = True
    with torch.no_grad():
        for name, model in models.items():
            recalibrate_batchnorm(model, [x])
            d4 = d4_errors(model.forward_intermediates, x)
            off = {a: rotation_errors(model.forward_intermediates, x, a) for a in (30.0, 45.0)}
            for i in range(4):
                # 1e-3 of the map's range bounds float32 rounding after up to 17 layers even on
                # 4 x 4 layer-4 maps (BatchNorm statistics from 16 pixels amplify it); a plain CNN
                # is off by order 1.
                exact = d4[i] <= 1e-3
                if name.startswith("SRENet"):
                    srenet_exact &= exact
                table.add_row(
                    name if i == 0 else "",
                    str(i + 1),
                    f"{d4[i]:.1e}",
                    "[green]yes[/]" if exact else "[red]no[/]",
                    f"{off[30.0][i]:.3f}",
                    f"{off[45.0][i]:.3f}",
                )
    console.print(table)
    if srenet_exact:
        console.print("[green]SRENet-18 features are exactly equivariant to 90° rotations and flips.[/]")
        return 0
    console.print("[red]SRENet-18 features are NOT equivariant on this machine: report this as a bug.[/]")
    return 1
