"""Measure: rotation consistency of per-sample K-means segmentations of real H&E, per backbone and option.

Scoring is the product's protocol, :func:`equislide.stages.consistency.rotation_consistency` (rotate
the square input about its centre with white fill, layer-L features, K-means k = 3 fitted at 0 degrees
on 2000 seeded L2-normalised tissue vectors, every angle labelled with those centroids, rotated back,
Cohen's kappa and mean Dice against 0 degrees on tissue inside the scored disc). This bench only
chooses the inputs and the model-side options, and tabulates.

Options measured:

* backbone: ``srenet18``, ``resnet18``, ``e2cnn_resnet18`` at default builder args, plus SRENet
  variants (``srenet18-soft`` rings, ``srenet18-aa3``/``-aa5`` antialias) with ``--nets``; untrained,
  BatchNorm recalibrated per seed on the 9 inputs at 0 degrees (``prepare_backbone``).
* ``ConsistencySpec.labels``: ``nearest`` / ``upsampled``; ``ConsistencySpec.disc_input``: off / on.
* context (whole-slide regions only): the region read as the stage's ``sample_images`` reads a whole
  slide, a square of side ``stages.consistency.region_side`` (864 px for R = 512) around the same
  centre at the same resolution (the table in bench/README.md was measured with 856 px for SRENet),
  scored on the central disc of diameter R = 512 (``score_side=R``); "no context" is the 512-px
  square alone (same pixels), scored on its inscribed disc. With
  context, ``disc_input`` is measured off only: it whitens outside the read square's disc, far from
  the scored one (a quick run gave kappas equal to 3 decimals for srenet18 and resnet18, L3 and L4).
* canvas (images and tiles, the ``ctx`` column of their table): ``ConsistencySpec.canvas``, the bare
  square centred on a white canvas that holds it whole at every angle, scored on all its tissue
  (on) / the square rotated alone, its corners cut off, scored on its inscribed disc (off).
* ``--tta NET``: features averaged over the input at 0 and 45 degrees
  (``equislide.models.tta.rotation_averaged_features``), given to the stage as a wrapper backbone.

Angles: SRENet is exactly D4-equivariant, so 0/30/60/90 suffice (120..330 repeat 30 or 60 up to a
symmetry of the square; 90 is an exactness check); the other nets get 0/30/60/90/180. Features of
identical inputs are computed once per (input, disc_input) and reused for both labellings and layers;
the seconds reported include that pass.

Groups (each with its own baseline "srenet18, nearest labels, no disc, no context", same run):
``images`` = the 9 inputs without context; ``slides`` = the 2 SVS regions, context off / on.

E2CNN (about 13 s per 512-px pass on one CPU thread) is measured with disc_input off and without
context unless ``--e2cnn-disc`` / ``--e2cnn-context``. It can run as a part run beside the main one
(``--nets e2cnn_resnet18 --no-baseline --json b.json``; one seed a run if need be) and be printed in
one table with ``--merge a.json b.json ..`` (rows of the same configuration pool their seeds; kappas
are deterministic, so the baseline of the other part applies; the seconds come from two processes).

    python bench/consistency_options.py [DATA] [--quick] [--seeds 0 1] [--nets srenet18 resnet18 ..]
        [--tta NET ..] [--layers 4 3] [--e2cnn-disc] [--e2cnn-context] [--context-only] [--no-disc]
        [--no-baseline] [--json out.json]
    python bench/consistency_options.py --merge a.json b.json
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _data import data_dir  # noqa: E402

from equislide.models.extract import prepare_backbone  # noqa: E402
from equislide.specs import ClusterSpec  # noqa: E402
from equislide.stages.consistency import ConsistencySpec, rotation_consistency  # noqa: E402
from equislide.tiling import open_slide, tissue_mask  # noqa: E402

SRE_ANGLES = (0.0, 30.0, 60.0, 90.0)
OTHER_ANGLES = (0.0, 30.0, 60.0, 90.0, 180.0)
REGION = 512  # scored disc of a whole-slide region (the service's SERVICE_SPEC.region)
CONTEXT = 64
BASE = ("srenet18", "nearest", False, False)
# name -> (builder, model kwargs)
NETS: dict[str, tuple[str, dict]] = {
    "srenet18": ("srenet18", {}),
    "srenet18-soft": ("srenet18", {"rings": "soft"}),
    "srenet18-aa3": ("srenet18", {"antialias": 3}),
    "srenet18-aa5": ("srenet18", {"antialias": 5}),
    "srenet18-soft-aa3": ("srenet18", {"rings": "soft", "antialias": 3}),
    "resnet18": ("resnet18", {}),
    "e2cnn_resnet18": ("e2cnn_resnet18", {}),
}


def context_side(region: int, stride: int) -> int:
    """The stage's whole-slide read side for a ``region`` disc (a multiple of 16, so of every stride)."""
    from equislide.stages.consistency import ConsistencySpec, region_side

    side = region_side(ConsistencySpec(region=region, context=CONTEXT))
    return stride * math.ceil(side / stride)


def _square(rgb: np.ndarray, side: int) -> np.ndarray:
    """Centre crop to a square, then resize (Lanczos) to ``side`` if needed."""
    h, w = rgb.shape[:2]
    s = min(h, w)
    y0, x0 = (h - s) // 2, (w - s) // 2
    rgb = rgb[y0 : y0 + s, x0 : x0 + s]
    if s != side:
        if s - side < 16:  # a few pixels too many: crop, do not resample
            o = (s - side) // 2
            return np.ascontiguousarray(rgb[o : o + side, o : o + side])
        rgb = np.asarray(Image.fromarray(rgb).resize((side, side), Image.Resampling.LANCZOS))
    return np.ascontiguousarray(rgb)


def _image(path: Path, side: int) -> np.ndarray:
    with Image.open(path) as im:
        return _square(np.asarray(im.convert("RGB")), side)


def _slide_square(path: Path, side: int, down: int = 2) -> np.ndarray:
    """A ``side``-px square at level-0 px / ``down`` (box filter), centred on the tissue's centre of
    mass (the centre clipped so the square lies inside the slide)."""
    with open_slide(path) as slide:
        thumb, tdown = slide.thumbnail(max_size=512)
        mask = tissue_mask(thumb, mpp=None)
        yy, xx = np.nonzero(mask)
        cy, cx = (yy.mean(), xx.mean()) if len(yy) else (thumb.shape[0] / 2, thumb.shape[1] / 2)
        w, h = slide.dimensions
        read = side * down
        x0 = int(np.clip(cx * tdown - read / 2, 0, w - read))
        y0 = int(np.clip(cy * tdown - read / 2, 0, h - read))
        rgb = slide.read_region((x0, y0), 0, (read, read))[..., :3].astype(np.float32)
    rgb = rgb.reshape(side, down, side, down, 3).mean((1, 3))
    return np.ascontiguousarray(np.clip(np.rint(rgb), 0, 255).astype(np.uint8))


def _centre(im: np.ndarray, side: int) -> np.ndarray:
    o = (im.shape[0] - side) // 2
    return np.ascontiguousarray(im[o : o + side, o : o + side])


def load_inputs(data: Path, quick: bool) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """``(images, slide_squares)``: square uint8 crops (sides multiples of 8) and, per SVS, the square
    of the widest context (stride 16) around the same centre; ``images`` holds its central 512 px."""
    img, tiles, slides = data / "images", data / "tiles", data / "slides"
    specs = {
        "he-carcinoma-512": lambda: _image(img / "he-carcinoma-1000.png", 512),
        "histoqc-t1-496": lambda: _image(img / "histoqc-template1.png", 496),
        "histoqc-t3-496": lambda: _image(img / "histoqc-template3.png", 496),
        "nct-TUM-224": lambda: _image(tiles / "nct-crc/TUM-AEPINLNQ.png", 224),
        "nct-NORM-224": lambda: _image(tiles / "nct-crc/NORM-TCGA-YLVCMEHK.tif", 224),
        "tcga-chol-256": lambda: _image(tiles / "tcga/TCGA-3X-AAVA-01Z-00-DX1__0_0_0_506.jpg", 256),
        "tcga-crc-512": lambda: _image(tiles / "tcga/TCGA-AD-6964-01Z-00-DX1__Tile_16896_20480.jpg", 512),
    }
    svs = {"cmu-svs-512": "CMU-1-Small-Region.svs", "tcga-svs-512": "TCGA-CR-7395-01A-01-TS1.svs"}
    if quick:
        specs = {k: specs[k] for k in ("he-carcinoma-512", "nct-TUM-224")}
        svs = {"cmu-svs-512": svs["cmu-svs-512"]}
    images = {name: fn() for name, fn in specs.items()}
    squares = {}
    for name, file in svs.items():
        squares[name] = _slide_square(slides / file, context_side(REGION, 16))
        images[name] = _centre(squares[name], REGION)
    return images, squares


class CachedBackbone:
    """A backbone for the stage that computes ``forward_intermediates(x, layers)`` once per distinct
    input (optionally 0/45-degree TTA) and answers ``features(x, layer)`` from that pass.

    ``charged`` accumulates, for every cache hit, the seconds the original pass took, so a hit's
    stage time plus its charge is what an uncached call would have cost.
    """

    def __init__(self, model: torch.nn.Module, layers: tuple[int, ...], tta: bool = False) -> None:
        self.model, self.layers, self.tta = model, tuple(sorted(layers)), tta
        self.feature_strides = model.feature_strides
        self.cache: dict[tuple, tuple[dict[int, torch.Tensor], float]] = {}
        self.charged = 0.0

    def to(self, device):  # noqa: ANN001 - the stage's extract_features calls .to(dev).eval()
        self.model.to(device)
        return self

    def eval(self):  # noqa: ANN201
        self.model.eval()
        return self

    def clear(self) -> None:
        self.cache.clear()

    def features(self, x: torch.Tensor, layer: int) -> torch.Tensor:
        key = (tuple(x.shape), hash(x.detach().cpu().numpy().tobytes()))
        hit = self.cache.get(key)
        if hit is not None:
            self.charged += hit[1]
            return hit[0][layer]
        t0 = time.perf_counter()
        with torch.inference_mode():
            if self.tta:
                from equislide.models.tta import rotation_averaged_features

                fn = lambda t: self.model.forward_intermediates(t, self.layers)  # noqa: E731
                outs = rotation_averaged_features(fn, x)
            else:
                outs = self.model.forward_intermediates(x, self.layers)
        maps = dict(zip(self.layers, outs, strict=True))
        self.cache[key] = (maps, time.perf_counter() - t0)
        return maps[layer]


def _off90(a: float) -> bool:
    return abs(a / 90 - round(a / 90)) > 1e-9


def run(args: argparse.Namespace) -> list[dict]:
    images, squares = load_inputs(args.data, args.quick)
    for n, im in images.items():
        print(f"input {n}: {im.shape[0]} px, tissue {tissue_mask(im, mpp=None).mean():.0%}", flush=True)
    calib = [im[None] for im in images.values()]
    cluster = ClusterSpec(fit="per-sample", backend="torch")
    # per[(group, net, tta, layer, labels, disc, context)][seed][input] = (off90 k, off90 d, min k90, s)
    per: dict[tuple, dict[int, dict[str, tuple]]] = {}
    nets = list(dict.fromkeys(args.nets))
    runs = [(n, False) for n in nets] + [(n, True) for n in args.tta]
    for net, tta in runs:
        builder, kwargs = NETS[net]
        sre = builder == "srenet18"
        angles = SRE_ANGLES if sre else OTHER_ANGLES
        layers = tuple(args.layers) if sre else (4,)
        discs = (False, True) if sre or builder == "resnet18" or args.e2cnn_disc else (False,)
        contexts = (False, True) if sre or builder == "resnet18" or args.e2cnn_context else (False,)
        if args.context_only:
            contexts = (True,)
        for seed in args.seeds:
            t0 = time.perf_counter()
            model, _ = prepare_backbone(
                builder, layer=4, calibration_tiles=calib, seed=seed, device="cpu", model_kwargs=kwargs
            )
            cal_s = time.perf_counter() - t0
            wrapped = CachedBackbone(model, layers, tta=tta)
            jobs = [("images", n, im, None, False) for n, im in images.items() if False in contexts]
            if True in contexts:  # a bare square's "context" is the stage's white canvas
                jobs += [("images", n, im, None, True) for n, im in images.items()]
            for n, sq in squares.items():  # no context: the "images" job of the same square, reused
                if True in contexts:
                    ctx = _centre(sq, context_side(REGION, model.feature_strides[3]))
                    jobs.append(("slides", n, ctx, REGION, True))
            for group, name, im, score_side, context in jobs:
                # With context, disc_input whitens outside the read square's disc, far from the scored
                # disc: a quick run gave kappas equal to 3 decimals (srenet18, resnet18; L3, L4).
                for disc in discs if not context and not args.no_disc else (False,):
                    wrapped.clear()
                    for labels in ("nearest", "upsampled"):
                        for layer in sorted(layers, reverse=True):
                            spec = ConsistencySpec(
                                angles=angles, labels=labels, disc_input=disc, track=500,
                                canvas=context and group == "images",
                            )
                            c0 = wrapped.charged
                            res = rotation_consistency(
                                im, wrapped, layer=layer, spec=spec, cluster=cluster, mpp=None,
                                device="cpu", score_side=score_side,
                            )
                            rows = res["angles"]
                            k_off = float(np.mean([r["kappa"] for r in rows if _off90(r["angle"])]))
                            d_off = float(np.mean([r["dice"] for r in rows if _off90(r["angle"])]))
                            k90 = min(r["kappa"] for r in rows if not _off90(r["angle"]))
                            secs = res["seconds"] + wrapped.charged - c0
                            key = (group, net, tta, layer, labels, disc, context)
                            per.setdefault(key, {}).setdefault(seed, {})[name] = (k_off, d_off, k90, secs)
                            if group == "images" and name in squares and not context:
                                key = ("slides", *key[1:])
                                per.setdefault(key, {}).setdefault(seed, {})[name] = (k_off, d_off, k90, secs)
                            if group == "images" and name == "he-carcinoma-512" and layer == 4:
                                print(
                                    f"  {net}{'+tta' if tta else ''} s{seed} {labels} disc={disc} "
                                    f"{name}: kappa {k_off:.3f} ({secs:.1f} s)",
                                    flush=True,
                                )
            print(f"{net}{'+tta' if tta else ''} seed {seed}: calib {cal_s:.0f} s, "
                  f"done {time.perf_counter() - t0:.0f} s", flush=True)
    return _table(per, args)


def _table(per: dict[tuple, dict[int, dict[str, tuple]]], args: argparse.Namespace) -> list[dict]:
    rows = []
    for key, seeds in per.items():
        group, net, tta, layer, labels, disc, context = key
        means = np.array([np.mean([v[:3] for v in by_in.values()], axis=0) for by_in in seeds.values()])
        secs = [v[3] for by_in in seeds.values() for v in by_in.values()]
        rows.append({
            "group": group, "net": net, "tta": tta, "layer": layer, "labels": labels, "disc": disc,
            "context": context, "seeds": sorted(seeds), "inputs": len(next(iter(seeds.values()))),
            "kappa_mean": float(means[:, 0].mean()), "kappa_std": float(means[:, 0].std()),
            "dice_mean": float(means[:, 1].mean()), "dice_std": float(means[:, 1].std()),
            "kappa90_min": float(min(v[2] for by_in in seeds.values() for v in by_in.values())),
            "seconds_per_image": float(np.mean(secs)),
            "per_seed": {s: by_in for s, by_in in seeds.items()},
        })
    print_table(rows)
    return rows


def print_table(rows: list[dict]) -> None:
    """One table per group; ``kappa_ratio`` (added to the rows) is against the group's baseline at the
    same layer (layer 4 where that layer has none)."""
    order = {n: i for i, n in enumerate(NETS)}
    seeds = sorted({int(s) for r in rows for s in r["seeds"]})
    for group in ("images", "slides"):
        grows = [r for r in rows if r["group"] == group]
        if not grows:
            continue
        base = {}
        for r in grows:
            if (r["net"], r["labels"], r["disc"], r["context"]) == BASE and not r["tta"]:
                base[r["layer"]] = r
        n_in = max(r["inputs"] for r in grows)
        title = {
            "images": f"images and tiles ({n_in} inputs); ctx: on a white canvas (the stage's default)",
            "slides": f"whole-slide regions ({n_in} SVS), disc {REGION} px, context off/on",
        }[group]
        hdr = (f"{'backbone':<20} {'L':>1} {'labels':<9} {'disc':<4} {'ctx':<4} {'kappa off-90':>14} "
               f"{'Dice off-90':>14} {'k90 min':>7} {'s/img':>6} {'k/base':>6} {'seeds':>5}")
        print(f"\n## {title}\n" + hdr + "\n" + "-" * len(hdr))
        grows.sort(key=lambda r: (-r["layer"], order[r["net"]], r["tta"], r["context"], r["disc"],
                                  r["labels"] != "nearest"))
        for r in grows:
            b = base.get(r["layer"], base.get(4))
            r["kappa_ratio"] = r["kappa_mean"] / b["kappa_mean"] if b else float("nan")
            print(
                f"{r['net'] + (' +tta45' if r['tta'] else ''):<20} {r['layer']:>1} {r['labels']:<9} "
                f"{'on' if r['disc'] else 'off':<4} {'on' if r['context'] else 'off':<4} "
                f"{r['kappa_mean']:.3f} ± {r['kappa_std']:.3f} {r['dice_mean']:.3f} ± {r['dice_std']:.3f} "
                f"{r['kappa90_min']:7.3f} {r['seconds_per_image']:6.1f} {r['kappa_ratio']:6.3f} "
                f"{','.join(str(x) for x in r['seeds']):>5}"
            )
    print(
        f"\nbaseline per group and layer: srenet18, nearest labels, no disc, no context; seeds {seeds} "
        "(mean ± std over a row's seeds of the mean over inputs); SRENet at 0/30/60/90 degrees (exactly "
        "D4-equivariant: other multiples of 30 repeat 30 or 60), others at 0/30/60/90/180; k90 min: "
        "lowest kappa at a multiple of 90 over inputs and seeds; s/img: one stage call (all angles, "
        "features included)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data", nargs="?", type=Path, default=data_dir())
    parser.add_argument("--quick", action="store_true", help="3 inputs instead of 9")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--nets", nargs="+", default=["srenet18", "resnet18", "e2cnn_resnet18"],
                        choices=sorted(NETS))
    parser.add_argument("--tta", nargs="*", default=[], choices=sorted(NETS), help="nets also run with TTA")
    parser.add_argument("--layers", type=int, nargs="+", default=[4], help="SRENet layers (others: 4)")
    parser.add_argument("--e2cnn-disc", action="store_true", help="also disc_input=on for e2cnn (slow)")
    parser.add_argument("--e2cnn-context", action="store_true", help="also context for e2cnn (slow)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--context-only", action="store_true",
                        help="only context on (slides) / the white canvas (images): the stage's defaults")
    parser.add_argument("--no-disc", action="store_true", help="disc_input off only")
    parser.add_argument("--no-baseline", action="store_true",
                        help="do not add srenet18 (a part run, to be --merge'd with one that has it)")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--merge", type=Path, nargs="+", default=None,
                        help="print one table from the --json files of part runs, measure nothing")
    args = parser.parse_args()
    if args.merge:
        per: dict[tuple, dict[int, dict[str, tuple]]] = {}
        for path in args.merge:
            for r in json.loads(path.read_text()):
                key = (r["group"], r["net"], r["tta"], r["layer"], r["labels"], r["disc"], r["context"])
                for seed, by_in in r["per_seed"].items():
                    per.setdefault(key, {})[int(seed)] = {n: tuple(v) for n, v in by_in.items()}
        args.seeds = sorted({s for v in per.values() for s in v})
        rows = _table(per, args)
    else:
        if "srenet18" not in args.nets and not args.no_baseline:
            args.nets = ["srenet18", *args.nets]  # the baseline
        torch.set_num_threads(args.threads)
        rows = run(args)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1, default=str) + "\n")


if __name__ == "__main__":
    main()
