"""Feature stage tiles/s at fp32 against bf16 (``torch.autocast``), and autocast against a bf16 copy.

Run by hand::

    python bench/precision.py                                  # CMU-1-Small-Region, segment's defaults
    python bench/precision.py --tile 128 --halo 16 --width 32  # a loaded 2-core machine

One real slide (default ``slides/CMU-1-Small-Region.svs`` of the data folder: ``$EQUISLIDE_DATA``, or
``../shared/data`` beside the repository) is tiled once; the untrained SRENet-18 (BatchNorm
recalibrated on its tiles, as ``segment`` without weights) then makes its features, in the same run,
``--repeats`` times each, interleaved so that a load on the machine hits every variant alike:

- ``stage``: :func:`equislide.stages.extract_store_features` on a fresh copy of the tile store (read,
  forward, float16 write) at ``fp32`` and at ``bf16``: tiles/s and the ratio bf16 / fp32;
- ``forward``: one batch of the store's tiles through ``features(x, layer)`` alone: fp32, bf16 under
  autocast (what ``extract_features`` runs; weights stay float32), and the model cast with
  ``.bfloat16()`` plus channels_last inputs and weights (the alternative), with their error against fp32.

Medians of the repeats are printed. ``precision auto`` on this machine and whether its CPU has bf16
units (AVX-512 BF16 or AMX) are printed first: without them oneDNN emulates bf16, and bf16 is no faster.
"""

from __future__ import annotations

import argparse
import copy
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from _data import data_dir


def _median(values: list[float]) -> float:
    return float(statistics.median(values))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--slide", type=Path, default=None, help="default: CMU-1-Small-Region.svs of the data")
    p.add_argument("--mpp", type=float, default=2.5)
    p.add_argument("--tile", type=int, default=512)
    p.add_argument("--halo", type=int, default=32)
    p.add_argument("--layer", type=int, default=4)
    p.add_argument("--width", type=int, default=None, help="SRENet width (default: the builder's, 64)")
    p.add_argument("--batch", type=int, default=4, help="tiles per forward pass (FeatureSpec's default 4)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = p.parse_args(argv)

    from equislide import stages
    from equislide.models.extract import bf16_native, normalise_tiles, resolve_precision
    from equislide.specs import FeatureSpec, TilingSpec
    from equislide.stages.backbone import load_backbone, read_tiles

    if args.threads:
        torch.set_num_threads(args.threads)
    slide = args.slide or data_dir() / "slides" / "CMU-1-Small-Region.svs"
    if not slide.is_file():
        print(f"{slide}: no such slide (pass --slide)", file=sys.stderr)
        return 2
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads; "
        f"CPU bf16 units: {bf16_native('cpu')}; "
        f"precision auto -> {resolve_precision('auto', 'cpu')} on the CPU"
    )
    kwargs = {"width": args.width} if args.width else {}
    with tempfile.TemporaryDirectory(prefix="equislide-bench-precision-") as tmp:
        root = Path(tmp)
        tiling = TilingSpec(mpp=args.mpp, tile=args.tile, halo=args.halo)
        stores = [r.store for r in stages.tile_slide(slide, root / "tiles", tiling)]
        store = Path(stores[0])
        n = int(read_tiles(store, 0, 10**9).shape[0])
        specs = {
            prec: FeatureSpec(
                layer=args.layer, model_kwargs=kwargs, device="cpu", batch_tiles=args.batch, precision=prec
            )
            for prec in ("fp32", "bf16")
        }
        nets = {prec: stages.calibrated_backbone([store], root / "models", s) for prec, s in specs.items()}
        print(
            f"{slide.name}: {n} tiles of {args.tile} + 2 x {args.halo} px at {args.mpp} µm/px; SRENet-18 "
            f"width {args.width or 64}, layer {args.layer}, batch {args.batch}; {args.repeats} repeats"
        )
        stage_s: dict[str, list[float]] = {"fp32": [], "bf16": []}
        model, _ = load_backbone(nets["fp32"], "cpu")
        cast = copy.deepcopy(model).bfloat16().to(memory_format=torch.channels_last)
        x = normalise_tiles(read_tiles(store, 0, min(n, args.batch)))
        xb = x.bfloat16().contiguous(memory_format=torch.channels_last)
        fwd: dict[str, list[float]] = {"fp32": [], "bf16 autocast": [], "bf16 cast + channels_last": []}
        errors: dict[str, float] = {}

        def autocast() -> torch.Tensor:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return model.features(x, args.layer)

        runs = {
            "fp32": lambda: model.features(x, args.layer),
            "bf16 autocast": autocast,
            "bf16 cast + channels_last": lambda: cast.features(xb, args.layer),
        }
        for r in range(args.repeats):
            for prec in ("fp32", "bf16"):
                copy_dir = root / f"run-{prec}-{r}"
                shutil.copytree(store, copy_dir / store.name)
                res = stages.extract_store_features(copy_dir / store.name, nets[prec], specs[prec])
                assert res["status"] == "written" and res["tiles_done"] == n, res
                stage_s[prec].append(float(res["seconds"]))
                shutil.rmtree(copy_dir)
            with torch.inference_mode():
                ref = None
                for name, run in runs.items():
                    t0 = time.perf_counter()
                    y = run()
                    fwd[name].append(time.perf_counter() - t0)
                    ref = y.float() if ref is None else ref
                    errors[name] = float((y.float() - ref).abs().max() / ref.abs().max())
            print(
                f"  repeat {r + 1}: stage fp32 {stage_s['fp32'][-1]:.2f} s, "
                f"bf16 {stage_s['bf16'][-1]:.2f} s; "
                + ", ".join(f"forward {k} {v[-1]:.2f} s" for k, v in fwd.items()),
                flush=True,
            )
    f32, bf = _median(stage_s["fp32"]), _median(stage_s["bf16"])
    print(
        f"features stage: fp32 {n / f32:.3f} tiles/s, bf16 {n / bf:.3f} tiles/s; "
        f"bf16 / fp32 = {f32 / bf:.2f}x"
    )
    base = _median(fwd["fp32"])
    for name, times in fwd.items():
        t = _median(times)
        print(
            f"forward {name:<26} {t:7.2f} s  {base / t:5.2f}x fp32  max |err| / max |fp32| {errors[name]:.3g}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
