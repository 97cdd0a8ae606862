"""Measure: which options make the K-means segmentation of SRENet features more rotation-consistent.

The paper's protocol on square crops of real H&E: rotate the input about its centre (white fill),
compute layer-L features, fit K-means at 0 degrees (k = 3 on 2000 seeded, L2-normalised tissue
vectors), label every angle with those centroids, upsample (nearest) and rotate each label map back
to the 0-degree frame, and score Cohen's kappa and mean Dice over clusters against the 0-degree map
on pixels that are tissue at 0 degrees and inside the disc inscribed in the square (valid at every
angle).

SRENet is exactly D4-equivariant, so of the 12 angles 0, 30, ..., 330 only 30 and 60 carry
information (120/210/300 repeat 30, 150/240/330 repeat 60); 90 is computed as an exactness check.
ResNet-18 is not equivariant and is measured at all 12 angles. Off-90 scores average the angles off
multiples of 90; each seed's score is the mean over the inputs; the table gives mean +- std over
network seeds (K-means seed fixed at 0). BatchNorm is recalibrated per network seed on all inputs
at 0 degrees.

Options: rings (hard/soft), antialias (blur before every pool: srenet18(antialias=3|5)),
TTA over 0 and 45 degrees (``equislide.models.tta.rotation_averaged_features``), distance-map
smoothing (``equislide.models.tta.smoothed_labels``, sigma in feature pixels; "up" = distance maps
upsampled bilinearly to input resolution before the argmin), and stage 1-4.

Baseline: "srenet18 hard, layer 4, no options" in the same run; ResNet-18 in the same run.

    python bench/consistency_options.py [DATA] [--quick] [--seeds 0 1 2] [--nets hard soft hard-aa3]
        [--tta hard-aa3] [--sigmas 0 1] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from sklearn.metrics import cohen_kappa_score

from equislide.models.calibration import recalibrate_batchnorm
from equislide.models.extract import normalise_tiles, prepare_backbone
from equislide.models.kmeans import fit_per_sample
from equislide.models.tta import gaussian_blur, rotation_averaged_features, smoothed_labels
from equislide.tiling import open_slide, rotate_image, tissue_mask, unrotate_labels

ROOT = Path(__file__).resolve().parents[1]
K = 3
N_VECTORS = 2000
SRE_ANGLES = (0.0, 30.0, 60.0, 90.0)
# Scored region: the disc inscribed in the square (--disc shrinks it, a diagnostic of border effects).
DISC_FRACTION = 1.0
ALL_ANGLES = tuple(float(a) for a in range(0, 360, 30))
# name -> (builder, model kwargs)
NETS: dict[str, tuple[str, dict]] = {
    "hard": ("srenet18", {"rings": "hard"}),
    "soft": ("srenet18", {"rings": "soft"}),
    "hard-aa3": ("srenet18", {"rings": "hard", "antialias": 3}),
    "hard-aa5": ("srenet18", {"rings": "hard", "antialias": 5}),
    "soft-aa3": ("srenet18", {"rings": "soft", "antialias": 3}),
    "soft-aa5": ("srenet18", {"rings": "soft", "antialias": 5}),
    "resnet18": ("resnet18", {}),
}


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


def _slide_region(path: Path, side: int, read: int = 1024) -> np.ndarray:
    """A ``read``-px level-0 region centred on the tissue's centre of mass, resized to ``side``."""
    with open_slide(path) as slide:
        thumb, down = slide.thumbnail(max_size=512)
        mask = tissue_mask(thumb, mpp=None)
        yy, xx = np.nonzero(mask)
        cy, cx = (yy.mean(), xx.mean()) if len(yy) else (thumb.shape[0] / 2, thumb.shape[1] / 2)
        w, h = slide.dimensions
        x0 = int(np.clip(cx * down - read / 2, 0, w - read))
        y0 = int(np.clip(cy * down - read / 2, 0, h - read))
        rgb = slide.read_region((x0, y0), 0, (read, read))
    return _square(rgb[..., :3], side)


def load_inputs(data: Path, quick: bool) -> dict[str, np.ndarray]:
    """Square uint8 crops of the shared real H&E data, sides multiples of 8."""
    img, tiles, slides = data / "images", data / "tiles", data / "slides"
    specs = {
        "he-carcinoma-512": lambda: _image(img / "he-carcinoma-1000.png", 512),
        "histoqc-t1-496": lambda: _image(img / "histoqc-template1.png", 496),
        "histoqc-t3-496": lambda: _image(img / "histoqc-template3.png", 496),
        "nct-TUM-224": lambda: _image(tiles / "nct-crc/TUM-AEPINLNQ.png", 224),
        "nct-NORM-224": lambda: _image(tiles / "nct-crc/NORM-TCGA-YLVCMEHK.tif", 224),
        "tcga-chol-256": lambda: _image(tiles / "tcga/TCGA-3X-AAVA-01Z-00-DX1__0_0_0_506.jpg", 256),
        "tcga-crc-512": lambda: _image(tiles / "tcga/TCGA-AD-6964-01Z-00-DX1__Tile_16896_20480.jpg", 512),
        "cmu-svs-512": lambda: _slide_region(slides / "CMU-1-Small-Region.svs", 512),
        "tcga-svs-512": lambda: _slide_region(slides / "TCGA-CR-7395-01A-01-TS1.svs", 512),
    }
    if quick:
        keep = ("he-carcinoma-512", "histoqc-t1-496", "nct-TUM-224", "cmu-svs-512")
        specs = {k: specs[k] for k in keep}
    return {name: fn() for name, fn in specs.items()}


def _disc(side: int, fraction: float = 1.0) -> np.ndarray:
    c = (side - 1) / 2.0
    yy, xx = np.mgrid[:side, :side]
    return (yy - c) ** 2 + (xx - c) ** 2 <= (fraction * side / 2.0) ** 2


def mean_dice(a: np.ndarray, b: np.ndarray, k: int = K) -> float:
    """Mean Dice over clusters present in ``a`` or ``b``."""
    scores = []
    for c in range(k):
        pa, pb = a == c, b == c
        n = int(pa.sum() + pb.sum())
        if n:
            scores.append(2.0 * float((pa & pb).sum()) / n)
    return float(np.mean(scores)) if scores else 1.0


def _disc_input(im: np.ndarray) -> np.ndarray:
    """Diagnostic: white outside the inscribed disc, so every angle sees the same tissue."""
    out = im.copy()
    out[~_disc(im.shape[0])] = 255
    return out


@dataclass
class Scores:
    """Per-(option, seed) kappa and Dice per input and angle, and timings."""

    kappa: dict[str, dict[float, float]] = field(default_factory=dict)
    dice: dict[str, dict[float, float]] = field(default_factory=dict)
    feat_s: float = 0.0
    label_s: float = 0.0
    n_passes: int = 0


def _labels_full(model_labels: np.ndarray, side: int) -> np.ndarray:
    s = side // model_labels.shape[-1]
    return np.repeat(np.repeat(model_labels, s, 0), s, 1) if s > 1 else model_labels


def score_input(
    feats: dict[float, np.ndarray], tissue: np.ndarray, side: int, sigmas: list[float | str]
) -> dict[float | str, tuple[dict[float, float], dict[float, float], float]]:
    """Kappa and Dice of every angle against 0 degrees for one input and layer, per labelling.

    One K-means fit at 0 degrees serves every labelling; the time returned per labelling is the
    labelling alone (predict, upsample), not the fit or the scoring.
    """
    f0 = feats[0.0]
    s = side // f0.shape[-1]
    t_f = tissue.reshape(side // s, s, side // s, s).mean((1, 3)) > 0.5 if s > 1 else tissue
    km = fit_per_sample(f0, t_f, k=K, n_vectors=N_VECTORS, seed=0, backend="torch", device="cpu")
    region = tissue & _disc(side, DISC_FRACTION)
    out = {}
    for sigma in sigmas:

        def label(f: np.ndarray, sigma=sigma) -> np.ndarray:
            if sigma == 0:
                return _labels_full(km.predict(f), side)
            if isinstance(sigma, str):  # "up" or "up<sigma>": distance maps upsampled to the input
                blur = float(sigma[2:]) if len(sigma) > 2 else 0.0
                return smoothed_labels(f, km.centroids, sigma=blur, out_size=side)
            return _labels_full(smoothed_labels(f, km.centroids, sigma=float(sigma)), side)

        lt = 0.0
        t0 = time.perf_counter()
        ref = label(f0)
        lt += time.perf_counter() - t0
        kap, dic = {}, {}
        for a, f in feats.items():
            if a == 0.0:
                continue
            t0 = time.perf_counter()
            lab = label(f).astype(np.int64)
            lt += time.perf_counter() - t0
            back, valid = unrotate_labels(lab, a)
            m = region & valid
            x, y = ref[m], back[m]
            kap[a] = 1.0 if np.array_equal(x, y) else float(cohen_kappa_score(x, y))
            dic[a] = mean_dice(x, y)
        out[sigma] = (kap, dic, lt / len(feats))
    return out


def run(args: argparse.Namespace) -> list[dict]:
    inputs = load_inputs(args.data, args.quick)
    tissue = {n: tissue_mask(im, mpp=None) for n, im in inputs.items()}
    for n, im in inputs.items():
        print(f"input {n}: {im.shape[0]} px, tissue {tissue[n].mean():.0%}", flush=True)
    calib = [im[None] for im in inputs.values()]
    layers = (1, 2, 3, 4) if args.layers is None else tuple(args.layers)
    sigmas: list[float | str] = [float(s) if s[0].isdigit() else s for s in args.sigmas]
    # scores[(net, tta, layer, sigma)][seed] -> Scores
    results: dict[tuple, dict[int, Scores]] = {}
    nets = list(dict.fromkeys(["hard", *args.nets, "resnet18"]))
    for net in nets:
        # "<net>+ib<sigma>": the input is blurred (Gaussian, sigma px) at every angle, BN included.
        base_net, _, ib = net.partition("+ib")
        builder, kwargs = NETS[base_net]
        ib_sigma = float(ib) if ib else 0.0
        angles = ALL_ANGLES if builder == "resnet18" or args.all_angles else SRE_ANGLES
        for seed in args.seeds:
            t_cal = time.perf_counter()
            model, _ = prepare_backbone(
                builder, layer=4, calibration_tiles=calib, seed=seed, device="cpu", model_kwargs=kwargs
            )
            if ib_sigma:
                recalibrate_batchnorm(
                    model, [gaussian_blur(normalise_tiles(c), ib_sigma) for c in calib], layer=4
                )
            t_cal = time.perf_counter() - t_cal
            ttas = [False, True] if net in args.tta else [False]
            for tta in ttas:

                def fn(t: torch.Tensor, model=model, ib_sigma=ib_sigma) -> list[torch.Tensor]:
                    return model.forward_intermediates(gaussian_blur(t, ib_sigma), layers)

                for name, im in inputs.items():
                    side = im.shape[0]
                    feats: dict[int, dict[float, np.ndarray]] = {L: {} for L in layers}
                    t0 = time.perf_counter()
                    with torch.inference_mode():
                        for a in angles:
                            src = _disc_input(im) if args.disc_input else im
                            x = normalise_tiles(rotate_image(src, a)[None])
                            outs = rotation_averaged_features(fn, x) if tta else fn(x)
                            for L, o in zip(layers, outs, strict=True):
                                feats[L][a] = o[0].float().numpy()
                    dt = time.perf_counter() - t0
                    for L in layers:
                        scored = score_input(feats[L], tissue[name], side, sigmas)
                        for sg, (kap, dic, lt) in scored.items():
                            sc = results.setdefault((net, tta, L, sg), {}).setdefault(seed, Scores())
                            sc.kappa[name], sc.dice[name] = kap, dic
                            sc.feat_s += dt / len(angles)
                            sc.label_s += lt
                            sc.n_passes += 1
                last = results[(net, tta, layers[-1], sigmas[0])][seed]
                print(
                    f"  {net} seed={seed} tta={tta}: calib {t_cal:.0f} s, "
                    f"L{layers[-1]} kappa {_seed_mean(last)[0]:.3f}",
                    flush=True,
                )
    return _table(results, args)


def _seed_mean(sc: Scores) -> tuple[float, float, float]:
    """(off-90 kappa, off-90 Dice, min 90-multiple kappa) averaged over inputs."""
    ks, ds, k90 = [], [], []
    for name in sc.kappa:
        off = [a for a in sc.kappa[name] if a % 90]
        ks.append(np.mean([sc.kappa[name][a] for a in off]))
        ds.append(np.mean([sc.dice[name][a] for a in off]))
        k90 += [sc.kappa[name][a] for a in sc.kappa[name] if a % 90 == 0]
    return float(np.mean(ks)), float(np.mean(ds)), float(min(k90))


def _table(results: dict[tuple, dict[int, Scores]], args: argparse.Namespace) -> list[dict]:
    rows = []
    layers_max = max(key[2] for key in results)
    for (net, tta, layer, sigma), per_seed in results.items():
        means = [_seed_mean(sc) for sc in per_seed.values()]
        k = np.array([m[0] for m in means])
        d = np.array([m[1] for m in means])
        n_inputs = len(next(iter(per_seed.values())).kappa)
        passes = sum(sc.n_passes for sc in per_seed.values())
        feat = sum(sc.feat_s for sc in per_seed.values())
        lab = sum(sc.label_s for sc in per_seed.values())
        label = f"{net}{' +tta45' if tta else ''} L{layer}" + (f" smooth={sigma}" if sigma != 0 else "")
        rows.append(
            {
                "option": label,
                "net": net,
                "tta": tta,
                "layer": layer,
                "sigma": sigma,
                "seeds": list(per_seed),
                "inputs": n_inputs,
                "kappa_mean": float(k.mean()),
                "kappa_std": float(k.std()),
                "dice_mean": float(d.mean()),
                "dice_std": float(d.std()),
                "kappa90_min": float(min(m[2] for m in means)),
                # Seconds per image and angle (TTA's two passes count as one angle).
                "feat_s_per_angle": feat / max(1, passes),
                "label_s_per_angle": lab / max(1, passes),
                "per_seed": {s: {"kappa": sc.kappa, "dice": sc.dice} for s, sc in per_seed.items()},
            }
        )
    base = next(
        r for r in rows if r["net"] == "hard" and not r["tta"] and r["layer"] == 4 and r["sigma"] == 0
    )
    hdr = (
        f"{'option':<34} {'seeds':>7} {'kappa off-90':>15} {'Dice off-90':>15} {'k90 min':>8} "
        f"{'s/angle':>8} {'kappa/base':>10} {'cost/base':>9}"
    )
    print("\n" + hdr + "\n" + "-" * len(hdr))
    for r in sorted(rows, key=lambda r: (-r["layer"], r["net"] == "resnet18", -r["kappa_mean"])):
        cost = (r["feat_s_per_angle"] + r["label_s_per_angle"]) / (
            base["feat_s_per_angle"] + base["label_s_per_angle"]
        )
        seeds = ",".join(str(s) for s in r["seeds"])
        print(
            f"{r['option']:<34} {seeds:>7} {r['kappa_mean']:.3f} ± {r['kappa_std']:.3f}   "
            f"{r['dice_mean']:.3f} ± {r['dice_std']:.3f}   {r['kappa90_min']:8.3f} "
            f"{r['feat_s_per_angle'] + r['label_s_per_angle']:8.2f} "
            f"{r['kappa_mean'] / base['kappa_mean']:10.3f} {cost:9.2f}"
        )
    print(
        f"baseline: srenet18 hard, layer {layers_max}, no options; "
        "resnet18 at 12 angles, SRENet at 0/30/60/90"
    )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default_data = Path(os.environ.get("EQUISLIDE_DATA", ROOT.parent / "shared/data"))
    parser.add_argument("data", nargs="?", type=Path, default=default_data)
    parser.add_argument("--quick", action="store_true", help="4 inputs instead of 9")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--nets", nargs="*", default=["soft"], help=f"{sorted(NETS)}, '+ib<sigma>' suffix")
    parser.add_argument("--tta", nargs="*", default=[], help="nets also run with TTA")
    parser.add_argument("--sigmas", nargs="+", default=["0", "1"], help="smoothing sigmas; 'up', 'up1'")
    parser.add_argument("--layers", type=int, nargs="+", default=None)
    parser.add_argument("--all-angles", action="store_true", help="all 12 angles for SRENet too")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--disc", type=float, default=1.0, help="diagnostic: score inside a smaller disc")
    parser.add_argument("--disc-input", action="store_true", help="diagnostic: white outside the disc")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    for net in args.nets + args.tta:
        if net.partition("+ib")[0] not in NETS:
            parser.error(f"unknown net {net!r}; choose from {sorted(NETS)} (optionally with '+ib<sigma>')")
    torch.set_num_threads(args.threads)
    global DISC_FRACTION
    DISC_FRACTION = args.disc
    rows = run(args)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1, default=str) + "\n")


if __name__ == "__main__":
    main()
