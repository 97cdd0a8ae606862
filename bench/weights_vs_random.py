"""Measure: given weights against the seeded random initialisation, side by side in one run.

The judge of default weights (README, "Weights"): trained weights become a backbone's packaged default
only if they beat random here. Three parts, each with the random networks measured in the same run:

1. ``demo``: the demo's adjusted Rand index against the phantom's ground truth, over ``--seeds``
   (each seed is another phantom and run seed), through the demo's own functions
   (:func:`equislide.commands.demo.demo_args`, :func:`equislide.commands.segment.run_flow`,
   :func:`equislide.evaluate.phantom_agreement`) on one local Dask cluster and one Prefect server.
   ``random`` is the demo as it runs without default weights (SRENet-18 width
   :data:`~equislide.commands.demo.DEMO_WIDTH`, BatchNorm recalibrated); ``weights`` is the demo with
   ``--weights FILE`` made the packaged default (a temporary registry named by
   ``EQUISLIDE_WEIGHTS_DIR``: the product's path), BatchNorm as trained; ``weights+BN`` the same with
   the registry's ``"batchnorm": "recalibrate"``.
2. ``annotations``: layer-4 features, averaged over each tile, of the labelled tiles of the data
   folder: ``tiles/histolab`` (background ``no-tissue*`` / ``almost-white-*``, pen ``*-pen*`` (pen wins
   over background and tissue), tissue ``tissue-*`` and the nuclei-score tiles) and ``tiles/nct-crc``
   (tissue), every tile resized to 224 px. Scores: leave-one-out 1-nearest-neighbour accuracy
   (cosine) and K-means (k = classes, 10 seeds) purity against the three labels.
3. ``rotation``: off-90-degree kappa / Dice of per-sample K-means segmentations of real tissue, the
   product's protocol (:func:`equislide.stages.consistency.rotation_consistency` on a white canvas,
   layer 4, nearest labels, k = 3), on the inputs of ``bench/consistency_options.py``
   (:func:`consistency_options.load_inputs`: H&E images, NCT/TCGA tiles, the central 512 px of the
   SVS regions).

In parts 2 and 3 ``random`` is the weights' own architecture (the checkpoint's config) seeded with each
``--seeds`` and BatchNorm-recalibrated on the part's inputs, as a run recalibrates on its cohort.
``--baseline-weights FILE`` (a ResNet-18) adds the same rows for ``resnet18`` (not in the demo, which
runs SRENet). Ratios are ``weights / random`` of the means.

    python bench/weights_vs_random.py --weights W.safetensors [--baseline-weights R.safetensors]
        [DATA] [--quick] [--seeds 0 1 2] [--parts demo annotations rotation] [--no-recalibrate]
        [--json out.json]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _data import data_dir  # noqa: E402

from equislide.files import sha256_file  # noqa: E402
from equislide.models.checkpoint import read_checkpoint_document  # noqa: E402
from equislide.models.defaults import REGISTRY_FORMAT, WEIGHTS_DIR_ENV  # noqa: E402
from equislide.models.extract import normalise_tiles, prepare_backbone  # noqa: E402

TILE = 224
PARTS = ("demo", "annotations", "rotation")


def label_of(name: str) -> str | None:
    """A labelled tile's class from its file name (None: not a labelled tile)."""
    stem = name.lower()
    if "-pen" in stem:
        return "pen"
    if stem.startswith(("no-tissue", "almost-white")):
        return "background"
    if stem.startswith("tissue-") or "nuclei-score" in stem:
        return "tissue"
    return None


def labelled_tiles(data: Path) -> tuple[np.ndarray, list[str], list[str]]:
    """``(tiles (N, 224, 224, 3) uint8, labels, names)`` of the histolab and NCT-CRC tiles."""
    tiles, labels, names = [], [], []
    for path in sorted((data / "tiles" / "histolab").glob("*")):
        if (label := label_of(path.name)) is not None:
            tiles.append(path), labels.append(label), names.append(path.name)
    for path in sorted((data / "tiles" / "nct-crc").glob("*")):
        tiles.append(path), labels.append("tissue"), names.append(path.name)
    arrays = []
    for path in tiles:
        with Image.open(path) as im:
            arrays.append(np.asarray(im.convert("RGB").resize((TILE, TILE), Image.Resampling.LANCZOS)))
    return np.stack(arrays), labels, names


# --- the networks -------------------------------------------------------------------------------


def networks(args: argparse.Namespace) -> list[dict]:
    """One entry per backbone compared: its weights file and the builder config of its random twin."""
    nets = []
    for path in [args.weights, args.baseline_weights]:
        if path is None:
            continue
        config = dict(read_checkpoint_document(path)["model"])
        arch = config.pop("arch")
        nets.append({"arch": arch, "weights": Path(path), "kwargs": config})
    return nets


def variants(net: dict, seeds: list[int], recalibrate: bool) -> list[tuple[str, int | None]]:
    out = [("random", s) for s in seeds] + [("weights", None)]
    return out + ([("weights+BN", None)] if recalibrate else [])


def build(net: dict, variant: str, seed: int | None, calib: list[np.ndarray]) -> torch.nn.Module:
    if variant == "random":
        model, _ = prepare_backbone(
            net["arch"], layer=4, calibration_tiles=calib, seed=seed, device="cpu", model_kwargs=net["kwargs"]
        )
    else:
        model, _ = prepare_backbone(
            net["arch"],
            weights=net["weights"],
            layer=4,
            calibration_tiles=calib if variant == "weights+BN" else None,
            recalibrate=variant == "weights+BN",
            device="cpu",
        )
    return model


# --- part 2: annotations ------------------------------------------------------------------------


def tile_features(model: torch.nn.Module, tiles: np.ndarray) -> np.ndarray:
    """Layer-4 features averaged over each tile, L2-normalised, ``(N, C)``."""
    out = []
    with torch.inference_mode():
        for i in range(0, len(tiles), 4):
            f = model.features(normalise_tiles(tiles[i : i + 4], device="cpu"), 4).float().mean((2, 3))
            out.append(torch.nn.functional.normalize(f, dim=1).numpy())
    return np.concatenate(out)


def annotation_scores(features: np.ndarray, labels: list[str]) -> dict[str, float]:
    from sklearn.cluster import KMeans

    y = np.array(labels)
    sim = features @ features.T
    np.fill_diagonal(sim, -np.inf)
    knn = float((y[sim.argmax(1)] == y).mean())
    k = len(set(labels))
    purities = []
    for seed in range(10):
        pred = KMeans(k, n_init=1, random_state=seed).fit_predict(features)
        hits = sum(max(np.sum(y[pred == c] == lab) for lab in set(labels)) for c in set(pred))
        purities.append(hits / len(y))
    return {"knn_accuracy": knn, "kmeans_purity": float(np.mean(purities))}


def part_annotations(args, nets, rows: list[dict]) -> None:
    tiles, labels, names = labelled_tiles(args.data)
    counts = {lab: labels.count(lab) for lab in sorted(set(labels))}
    print(f"annotations: {len(tiles)} labelled tiles {counts}", flush=True)
    for net in nets:
        for variant, seed in variants(net, args.seeds, args.recalibrate):
            t0 = time.perf_counter()
            model = build(net, variant, seed, [tiles])
            scores = annotation_scores(tile_features(model, tiles), labels)
            for metric, value in scores.items():
                rows.append({"part": "annotations", "arch": net["arch"], "variant": variant, "seed": seed,
                             "metric": metric, "value": value})
            secs = time.perf_counter() - t0
            print(f"  {net['arch']} {variant} {seed}: {scores} ({secs:.0f} s)", flush=True)


# --- part 3: rotation consistency ---------------------------------------------------------------


def part_rotation(args, nets, rows: list[dict]) -> None:
    from consistency_options import OTHER_ANGLES, SRE_ANGLES, CachedBackbone, load_inputs

    from equislide.specs import ClusterSpec
    from equislide.stages.consistency import ConsistencySpec, is_off90, rotation_consistency

    images, _ = load_inputs(args.data, args.quick)
    calib = [im[None] for im in images.values()]
    cluster = ClusterSpec(fit="per-sample", backend="torch")
    print(f"rotation: {len(images)} inputs {sorted(images)}", flush=True)
    for net in nets:
        angles = SRE_ANGLES if net["arch"] == "srenet18" else OTHER_ANGLES
        spec = ConsistencySpec(angles=angles, labels="nearest", track=500, canvas=True)
        for variant, seed in variants(net, args.seeds, args.recalibrate):
            t0 = time.perf_counter()
            wrapped = CachedBackbone(build(net, variant, seed, calib), (4,))
            kappas, dices = [], []
            for im in images.values():
                wrapped.clear()
                res = rotation_consistency(
                    im, wrapped, layer=4, spec=spec, cluster=cluster, mpp=None, device="cpu"
                )
                off = [r for r in res["angles"] if is_off90(r["angle"])]
                kappas.append(np.mean([r["kappa"] for r in off]))
                dices.append(np.mean([r["dice"] for r in off]))
            for metric, values in (("kappa_off90", kappas), ("dice_off90", dices)):
                rows.append({"part": "rotation", "arch": net["arch"], "variant": variant, "seed": seed,
                             "metric": metric, "value": float(np.mean(values))})
            print(f"  {net['arch']} {variant} {seed}: kappa {np.mean(kappas):.3f} dice {np.mean(dices):.3f} "
                  f"({time.perf_counter() - t0:.0f} s)", flush=True)


# --- part 1: the demo ---------------------------------------------------------------------------


@contextlib.contextmanager
def packaged_registry(weights: Path, batchnorm: str):
    """``weights`` as the packaged srenet18 default of a temporary registry, for the block."""
    with tempfile.TemporaryDirectory(prefix="equislide-bench-weights-") as tmp:
        folder = Path(tmp)
        for suffix in (".safetensors", ".json"):
            src = weights.with_suffix(suffix)
            if src.is_file():
                (folder / f"srenet18{suffix}").symlink_to(src.resolve())
        entry = {"file": "srenet18.safetensors", "sha256": sha256_file(weights), "default": True,
                 "batchnorm": batchnorm, "why": "bench/weights_vs_random.py"}
        (folder / "defaults.json").write_text(
            json.dumps({"format": REGISTRY_FORMAT, "format_version": 1, "backbones": {"srenet18": entry}})
        )
        old = os.environ.get(WEIGHTS_DIR_ENV)
        os.environ[WEIGHTS_DIR_ENV] = str(folder)
        try:
            yield
        finally:
            if old is None:
                os.environ.pop(WEIGHTS_DIR_ENV, None)
            else:
                os.environ[WEIGHTS_DIR_ENV] = old


def part_demo(args, nets, rows: list[dict]) -> None:
    import logging

    from distributed import LocalCluster

    from equislide.commands.demo import demo_args
    from equislide.commands.segment import run_flow
    from equislide.evaluate import phantom_agreement
    from equislide.flows.cluster import PRELOAD, shared_prefect_api, worker_environment
    from equislide.tiling import write_phantom

    net = next((n for n in nets if n["arch"] == "srenet18"), None)
    if net is None:
        print("demo: skipped (the demo runs SRENet-18; --weights holds no srenet18)")
        return
    logging.getLogger("distributed").setLevel(logging.WARNING)
    work = Path(tempfile.mkdtemp(prefix="equislide-bench-demo-"))
    cores = 4 if args.quick else 9
    choices = [("random", None), ("weights", "trained")]
    choices += [("weights+BN", "recalibrate")] if args.recalibrate else []
    with worker_environment():
        cluster = LocalCluster(n_workers=args.workers, threads_per_worker=1, dashboard_address=None,
                               preload=[PRELOAD])
    with cluster, shared_prefect_api():
        for seed in args.seeds:
            slide = work / f"phantom-{seed}" / "phantom.tiff"
            write_phantom(slide, cores=cores, core_diameter_um=800.0, seed=seed)
            for variant, batchnorm in choices:
                out = work / f"run-{seed}-{variant}"
                t0 = time.perf_counter()
                registry = (
                    contextlib.nullcontext()
                    if batchnorm is None
                    else packaged_registry(net["weights"], batchnorm)
                )
                try:
                    with registry:  # the demo without --weights: the packaged default, if any
                        weights = "random" if batchnorm is None else None
                        seg = demo_args(out, slide, workers=None, seed=seed, weights=weights)
                        seg.scheduler = cluster.scheduler_address
                        report = run_flow(seg, command=["bench/weights_vs_random.py"])
                    ari = phantom_agreement(report, slide.with_suffix(".json"))["ari"]
                    note = report["parameters"]["weights_note"]
                except Exception as err:  # noqa: BLE001 - one variant failing must not lose the others
                    ari, note = float("nan"), f"FAILED: {type(err).__name__}: {err}"
                rows.append({"part": "demo", "arch": "srenet18", "variant": variant, "seed": seed,
                             "metric": "ari", "value": float(ari)})
                secs = time.perf_counter() - t0
                print(f"  demo seed {seed} {variant}: ARI {ari:.3f} ({secs:.0f} s; {note})", flush=True)


# --- the table ----------------------------------------------------------------------------------


def print_table(rows: list[dict], recalibrate: bool) -> None:
    cols = ["random", "weights"] + (["weights+BN"] if recalibrate else [])
    hdr = f"{'part':<12} {'backbone':<10} {'metric':<15} " + " ".join(f"{c:>15}" for c in cols)
    hdr += f" {'w/random':>9}" + (f" {'w+BN/random':>11}" if recalibrate else "")
    print("\n" + hdr + "\n" + "-" * len(hdr))
    keys = list(dict.fromkeys((r["part"], r["arch"], r["metric"]) for r in rows))
    for part, arch, metric in keys:
        cells, means = [], {}
        for c in cols:
            vals = [r["value"] for r in rows if (r["part"], r["arch"], r["metric"], r["variant"]) ==
                    (part, arch, metric, c)]
            if not vals:
                cells.append(f"{'-':>15}")
                continue
            means[c] = float(np.mean(vals))
            sd = f" ± {np.std(vals):.3f}" if len(vals) > 1 else ""
            cells.append(f"{means[c]:.3f}{sd}".rjust(15))

        def ratio(c: str, means=means) -> str:
            return f"{means[c] / means['random']:.3f}" if c in means and means.get("random") else "-"

        line = f"{part:<12} {arch:<10} {metric:<15} " + " ".join(cells) + f" {ratio('weights'):>9}"
        print(line + (f" {ratio('weights+BN'):>11}" if recalibrate else ""))
    print("\nrandom: mean ± std over seeds (same architecture; the demo: its width-32 random network); "
          "weights: BatchNorm as trained; weights+BN: recalibrated on the part's inputs; ratios of means, "
          "> 1 = the weights do better")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data", nargs="?", type=Path, default=data_dir())
    parser.add_argument("--weights", type=Path, required=True, help="SRENet-18 checkpoint to judge")
    parser.add_argument("--baseline-weights", type=Path, default=None, help="ResNet-18, same recipe")
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="default 0 1 2 (--quick: 0)")
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS))
    parser.add_argument("--quick", action="store_true", help="one seed, 4-core phantom, 3 rotation inputs")
    parser.add_argument("--no-recalibrate", dest="recalibrate", action="store_false",
                        help="leave out the weights+BN column (weights with BatchNorm recalibrated)")
    parser.add_argument("--workers", type=int, default=2, help="local Dask workers of the demo part")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    args.seeds = args.seeds or ([0] if args.quick else [0, 1, 2])
    if args.threads:
        torch.set_num_threads(args.threads)
    for option, path in (("--weights", args.weights), ("--baseline-weights", args.baseline_weights)):
        if path is not None:
            from equislide.commands._common import check_weights

            if problem := check_weights(str(path), None, option=option):
                sys.exit(f"weights_vs_random: {problem}")
    needs_data = {"annotations", "rotation"} & set(args.parts)
    if needs_data and not (args.data / "tiles").is_dir():
        print(f"no data folder at {args.data}: parts {sorted(needs_data)} skipped")
        args.parts = [p for p in args.parts if p not in needs_data]
    nets = networks(args)
    rows: list[dict] = []
    t0 = time.perf_counter()
    for part in PARTS:
        if part in args.parts:
            run_part = {"demo": part_demo, "annotations": part_annotations, "rotation": part_rotation}[part]
            run_part(args, nets, rows)
    print_table(rows, args.recalibrate)
    print(f"weights {args.weights} (sha256 {sha256_file(args.weights)[:12]}); seeds {args.seeds}; "
          f"{time.perf_counter() - t0:.0f} s in all")
    if args.json:
        doc = {"weights": str(args.weights), "seeds": args.seeds, "rows": rows}
        args.json.write_text(json.dumps(doc, indent=1))


if __name__ == "__main__":
    main()
