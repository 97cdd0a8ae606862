"""The rotation-consistency study: every sample under 12 rotations, for several backbones, in one run.

Stages (the same Dask and Prefect machinery as the cohort flow, :mod:`equislide.flows._common`):

1. ``plan`` / ``tile``: the inputs into ``OUT/tiles`` (reused when a cohort run or an earlier study
   over the same folder tiled them with the same parameters).
2. per backbone and layer: ``backbone`` (given weights, or a seeded random initialisation with
   BatchNorm recalibrated on the cohort's tiles), then ``consistency`` per group of samples:
   :func:`equislide.stages.consistency.store_consistency` writes
   ``OUT/consistency/<sample>.<backbone>-layer<L>.consistency.json`` and its ``.rotations.png``.
   A backbone that cannot be prepared fails alone (its reason in ``summary.csv``'s log line).
3. ``report``: ``OUT/metrics.csv`` (``sample,backbone,angle,kappa,dice,valid_pixels``, then ``layer,
   icc_feature``), ``OUT/summary.csv`` (``backbone,icc_feature,icc_area,kappa_mean,kappa_std,dice_mean,
   dice_std``, then the same over the non-multiples of 90 degrees, ``layer``, ``samples``),
   ``OUT/angles.csv`` (mean and std over samples per angle), ``OUT/consistency.png`` (kappa and Dice
   against angle) and ``OUT/rotations.png`` (one sample's rotated-back maps, a row per backbone), and
   the same as Prefect artifacts. With ``annotations``, ``OUT/annotations.csv``
   (``sample,backbone,layer,dice_mean,ari,nmi,pixels``): each sample's 0-degree clusters against its
   annotation after Hungarian matching.
"""

from __future__ import annotations

import csv
import functools
import io
import time
from pathlib import Path
from typing import Any

import numpy as np
from prefect import flow, get_run_logger, task

from equislide.flows._common import (
    LOCK_HOOKS,
    TASK_OPTIONS,
    RunState,
    backbone_task,
    collect,
    consistency_task,
    deployment_runner,
    failure,
    groups,
    label_of,
    outcome,
    packaged_for,
    resolve_stage,
    run_flow,
    start_run,
    tile_stage,
    timed,
    weights_note,
)
from equislide.flows.monitor import Monitor
from equislide.specs import ClusterSpec, FeatureSpec, TilingSpec
from equislide.stages.consistency import ConsistencySpec, is_off90
from equislide.stages.inputs import SETTLE_SECONDS
from equislide.text import path_text

__all__ = ["consistency_flow", "run_study", "study_text", "summarise_study"]


def _rows(docs: dict[tuple[str, str, int], dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    for (sid, name, layer), doc in sorted(docs.items()):
        for a in doc["angles"]:
            rows.append(
                {
                    "sample": sid,
                    "backbone": name,
                    "angle": a["angle"],
                    "kappa": round(a["kappa"], 6),
                    "dice": round(a["dice"], 6),
                    "valid_pixels": a["valid_pixels"],
                    "layer": layer,
                    "icc_feature": None if doc.get("icc_feature") is None else round(doc["icc_feature"], 6),
                }
            )
    return rows


def summarise_study(docs: dict[tuple[str, str, int], dict[str, Any]]) -> tuple[list[dict], list[dict]]:
    """``(summary rows per backbone and layer, per-angle rows)``: mean ± std over samples.

    Per sample, kappa and Dice are first averaged over its angles (all, or the non-multiples of 90);
    the mean and sample standard deviation are then taken over samples. ``icc_area`` is ICC(3,1) of
    the clusters' area fractions with targets = every sample's clusters, raters = angles.
    """
    from equislide.evaluate import icc3_1, summarise

    summary, per_angle = [], []
    for name, layer in sorted({(b, layer) for _, b, layer in docs}):
        mine = {sid: d for (sid, b, lay), d in docs.items() if b == name and lay == layer}

        def per_sample(keep, metric: str, mine=mine) -> list[float]:
            out = []
            for d in mine.values():
                vals = [a[metric] for a in d["angles"] if keep(a["angle"])]
                if vals:
                    out.append(float(np.mean(vals)))
            return out

        areas = []
        for d in mine.values():
            for region in d["regions"]:
                a = np.asarray(region["area_fractions"], float)  # angles x k
                areas.append(a.T)
        icc_area = icc3_1(np.concatenate(areas)) if areas else float("nan")
        row = {"backbone": name}
        icc = [d["icc_feature"] for d in mine.values() if d.get("icc_feature") is not None]
        row["icc_feature"] = round(float(np.nanmean(icc)), 6) if icc else None
        row["icc_area"] = round(float(icc_area), 6)
        for suffix, keep in (("", lambda a: True), ("_off90", is_off90)):
            for metric in ("kappa", "dice"):
                values = per_sample(keep, metric)
                s = summarise(values) if values else {"mean": None, "std": None, "n": 0}
                row[f"{metric}_mean{suffix}"] = round(s["mean"], 6) if s["n"] else None
                row[f"{metric}_std{suffix}"] = round(s["std"], 6) if s["n"] else None
        row["layer"] = layer
        row["samples"] = len(mine)
        summary.append(row)
        angles = sorted({a["angle"] for d in mine.values() for a in d["angles"]})
        for angle in angles:
            entry = {"backbone": name, "layer": layer, "angle": angle}
            for metric in ("kappa", "dice"):
                vals = [a[metric] for d in mine.values() for a in d["angles"] if a["angle"] == angle]
                s = summarise(vals)
                entry[f"{metric}_mean"] = round(s["mean"], 6)
                entry[f"{metric}_std"] = round(s["std"], 6)
            entry["samples"] = len(mine)
            per_angle.append(entry)
    return summary, per_angle


def _write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    from equislide.files import atomic_write_bytes

    buf = io.StringIO()
    if rows:
        writer = csv.DictWriter(buf, fieldnames=list(rows[0]), lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    atomic_write_bytes(path, buf.getvalue().encode("utf-8"))


def study_report_run_name(parameters: dict[str, Any]) -> str:
    runs = {tuple(k.split("|")[1:]) for k in parameters["docs"]}
    samples = {k.split("|")[0] for k in parameters["docs"]}
    return f"study report {Path(parameters['out']).name} ({len(samples)} samples x {len(runs)} backbones)"


@task(name="study-report", task_run_name=study_report_run_name, retries=1, **TASK_OPTIONS)
def study_report_task(out: str, docs: dict, first_sample: str | None) -> dict[str, Any]:
    """metrics.csv, summary.csv, angles.csv and the two pictures."""
    from equislide.storage import stack_strips, write_angle_plot

    root = Path(out)
    keyed = {tuple(k.split("|")[:2]) + (int(k.split("|")[2]),): v for k, v in docs.items()}
    rows = _rows(keyed)
    summary, per_angle = summarise_study(keyed)
    _write_csv(root / "metrics.csv", rows)
    _write_csv(root / "summary.csv", summary)
    _write_csv(root / "angles.csv", per_angle)
    annotated = [
        {
            "sample": sid,
            "backbone": name,
            "layer": layer,
            **{k: round(v, 6) for k, v in doc["annotation"].items() if k != "pixels"},
            "pixels": doc["annotation"]["pixels"],
        }
        for (sid, name, layer), doc in sorted(keyed.items())
        if doc.get("annotation")
    ]
    if annotated:
        _write_csv(root / "annotations.csv", annotated)
    series: dict[str, dict[float, tuple[float, float]]] = {}
    for e in per_angle:
        tag = f"{e['backbone']} L{e['layer']}"
        series.setdefault(tag, {0.0: (1.0, 0.0)})[e["angle"]] = (e["kappa_mean"], e["kappa_std"])
        series.setdefault(f"{tag} dice", {0.0: (1.0, 0.0)})[e["angle"]] = (e["dice_mean"], e["dice_std"])
    if series:
        write_angle_plot(root / "consistency.png", series, title="agreement with the 0° segmentation")
    strips = sorted((root / "consistency").glob(f"{first_sample}.*.rotations.png")) if first_sample else []
    if strips:
        stack_strips(root / "rotations.png", strips)
    return {"summary": summary, "angles": per_angle, "metrics": len(rows), "annotations": annotated}


@flow(
    name="equislide-consistency",
    persist_result=False,
    log_prints=False,
    task_runner=deployment_runner(),
    **LOCK_HOOKS,
)
def consistency_flow(
    inputs: list[str] | None,
    out: str,
    *,
    manifest_csv: str | None = None,
    settle_seconds: float = SETTLE_SECONDS,
    backbones: list[str] | None = None,
    weights: dict[str, str] | None = None,
    layers: list[int] | None = None,
    angles: int = 12,
    regions: int = ConsistencySpec.regions,
    region: int = ConsistencySpec.region,
    clusters: int = ClusterSpec.k,
    per_sample: int = ClusterSpec.per_sample,
    mpp: float = TilingSpec.mpp,
    tile: int = TilingSpec.tile,
    halo: int = TilingSpec.halo,
    input_mpp: float | None = None,
    tma: str = TilingSpec.tma,
    seed: int = 0,
    model_kwargs: dict[str, Any] | None = None,
    calibration_tiles: int = FeatureSpec.calibration_tiles,
    device: str = FeatureSpec.device,
    precision: str = FeatureSpec.precision,
    annotations: str | None = None,
) -> dict[str, Any]:
    """The rotation study; returns ``{"summary", "angles", "failed", "path"}``.

    Args:
        inputs: Slide or image files, globs or folders (TMA slides are dearrayed; each core is a sample).
        out: Study folder: ``tiles/``, ``models/``, ``consistency/``, the CSVs and pictures.
        manifest_csv, settle_seconds: A manifest CSV of inputs, and the check that leaves files still
            arriving for the next run (:func:`~equislide.stages.inputs.resolve_inputs`; as
            :func:`~equislide.flows.cohort.cohort_flow`).
        backbones: Registered names (default ``srenet18``, ``resnet18``, ``e2cnn_resnet18``).
        weights: ``{backbone: checkpoint or "random"}``; others get their packaged default weights
            where the package makes some the default, else seeded random weights (BatchNorm
            recalibrated).
        layers: Feature stages (default ``[4]``).
        angles: Rotation steps around the circle (12: every 30 degrees).
        regions, region: Regions per whole slide and their side (analysis px).
        clusters, per_sample: The per-sample K-means at 0 degrees (the paper: 3 and 2000).
        mpp, tile, halo, input_mpp, tma: Tiling (:class:`~equislide.specs.TilingSpec`).
        seed: Seeds weights, regions, tracked pixels and K-means.
        model_kwargs: Builder arguments of random weights (e.g. ``{"width": 16}``), every backbone.
        calibration_tiles: Tiles BatchNorm is recalibrated on.
        device: Feature device on the workers.
        precision: Forward precision (``auto``, ``fp32``, ``bf16``, ``fp16``), as the cohort flow's;
            each result file records the resolved one.
        annotations: A folder of label images matched by sample or slide ID
            (:func:`~equislide.stages.consistency.find_annotation`): each sample's 0-degree clusters are
            matched to the annotation's classes (Hungarian) and scored (per-class Dice, ARI, NMI) in
            ``annotations.csv``.
    """
    logger = get_run_logger()
    t_start = time.perf_counter()
    names = list(backbones or ["srenet18", "resnet18", "e2cnn_resnet18"])
    tiling = TilingSpec(mpp=mpp, tile=tile, halo=halo, input_mpp=input_mpp, tma=tma)
    spec = ConsistencySpec.steps(angles, regions=regions, region=region, seed=seed)
    cluster = ClusterSpec(k=clusters, fit="per-sample", per_sample=per_sample, seed=seed)
    resolved = resolve_stage(inputs, manifest_csv, settle_seconds)
    state: RunState = start_run(resolved, out)
    logger.info("rotation study, backbones %s", names)
    runs = [(name, layer) for name in names for layer in layers or [4]]
    monitor = Monitor(study_weights(runs), key="equislide-progress", description=_PROGRESS_DESCRIPTION)
    with timed(state, "tile"):
        tile_stage(state, tiling, functools.partial(monitor.advance, "tile"))
    monitor.advance("tile", 1.0)
    logger.info(
        "tiled %d inputs into %d samples (%d inputs failed, %d samples failed)",
        len(state.ids),
        len(state.samples),
        len({p for p, r in state.records.items() if r.get("status") == "failed"}),
        len(state.errors),
    )
    results_dir = state.root / "consistency"
    docs: dict[str, dict[str, Any]] = {}
    failed: dict[str, str] = dict(state.errors)
    used: dict[str, str] = {}  # "<backbone> L<layer>" -> the weights it ran with, in words
    for name in names:
        for layer in layers or [4]:
            features = FeatureSpec(
                backbone=name,
                layer=layer,
                weights=(weights or {}).get(name),
                seed=seed,
                model_kwargs=model_kwargs or {},
                calibration_tiles=calibration_tiles,
                device=device,
                precision=precision,
            )
            live = state.live()
            if not live:
                break
            with timed(state, f"backbone_{name}_{layer}"):
                fut = backbone_task.submit(
                    sorted(s for _, s in live), str(state.models_dir), features, packaged_for(features)
                )
                reason = failure(fut)
            monitor.advance(f"backbone {name} {layer}", 1.0)
            if reason is not None:
                monitor.advance(f"consistency {name} {layer}", 1.0)
                failed[f"{name} layer {layer}"] = reason
                logger.warning("FAILED backbone %s layer %d: %s", name, layer, reason)
                continue
            net = fut.result()
            used[f"{name} L{layer}"] = weights_note(net, features.weights)

            def done(sid: str, doc: dict[str, Any], name=name, layer=layer) -> None:
                docs[f"{sid}|{name}|{layer}"] = doc

            def fail(sid: str, reason: str, name=name) -> None:
                failed[f"{sid} ({name})"] = reason
                logger.warning("FAILED %s (%s): %s", sid, name, reason)

            with timed(state, f"consistency_{name}_{layer}"):
                submitted = {
                    consistency_task.submit(
                        g,
                        str(results_dir),
                        net,
                        spec,
                        cluster,
                        None,
                        device,
                        label_of(g),
                        study=True,
                        annotations=annotations,
                    ): g
                    for g in groups(live, state.workers)
                }
                collect(
                    f"consistency {name}",
                    submitted,
                    done,
                    fail,
                    progress=functools.partial(monitor.advance, f"consistency {name} {layer}"),
                )
            _publish_so_far(monitor, docs, failed)
    for rec in state.records.values():  # inputs that gave no sample
        if rec.get("status") == "failed":
            failed[rec["path"]] = rec["reason"]  # the shown path: printable and JSON-safe
    first = next((sid for sid, _ in state.live()), None)
    report = study_report_task.submit(str(state.root), docs, first).result()
    report["failed"] = failed
    report["weights"] = used
    report["path"] = path_text(state.root)
    report["input_selection"] = resolved.describe()
    report["timings"] = {k: round(v, 3) for k, v in state.stage_s.items()}
    report["timings"]["total_s"] = round(time.perf_counter() - t_start, 3)
    _artifacts(monitor, report)
    monitor.finish()
    # One line here: the CLI prints the whole table, and a deployed run has it as an artifact.
    logger.info("%s; table in artifact equislide-consistency", study_text(report).splitlines()[0])
    return outcome(report, *_failed_inputs(state, failed, names, layers or [4]))


def _failed_inputs(
    state: RunState, failed: dict[str, str], names: list[str], layers: list[int]
) -> tuple[int, int]:
    """``(failed, total)`` inputs: an input fails with any of its samples, and all of them with a backbone
    that could not be prepared."""
    if any(f"{name} layer {layer}" in failed for name in names for layer in layers):
        return len(state.paths), len(state.paths)
    bad = {p for p in state.paths if p in failed}
    for key in failed:
        sid = key.split(" (", 1)[0]
        if sid in state.samples:
            bad.add(state.samples[sid]["input"])
    return len(bad), len(state.paths)


def study_text(report: dict[str, Any]) -> str:
    """The study's summary table as text."""
    lines = [
        f"equislide consistency: {report['path']} ({report['timings']['total_s']:.1f} s)",
        f"{'backbone':16s}{'layer':>6s}{'n':>4s}{'kappa off-90':>16s}{'Dice off-90':>16s}{'kappa all':>12s}"
        f"{'ICC feat':>10s}{'ICC area':>10s}",
    ]

    def pm(row: dict[str, Any], metric: str) -> str:
        m, s = row.get(f"{metric}_mean_off90"), row.get(f"{metric}_std_off90")
        return "-" if m is None else f"{m:.3f} ± {s:.3f}"

    for row in report["summary"]:
        icc = "-" if row["icc_feature"] is None else f"{row['icc_feature']:.3f}"
        kappa_all = "-" if row["kappa_mean"] is None else f"{row['kappa_mean']:.3f}"
        lines.append(
            f"{row['backbone']:16s}{row['layer']:>6d}{row['samples']:>4d}{pm(row, 'kappa'):>16s}"
            f"{pm(row, 'dice'):>16s}{kappa_all:>12s}{icc:>10s}{row['icc_area']:>10.3f}"
        )
    for what, note in report.get("weights", {}).items():
        lines.append(f"  weights {what}: {note}")
    for what, reason in report["failed"].items():
        lines.append(f"  FAILED {what}: {reason}")
    return "\n".join(lines)


_PROGRESS_DESCRIPTION = "work done: tiling, then each backbone's calibration and consistency"


def study_weights(runs: list[tuple[str, int]]) -> dict[str, float]:
    """Progress weights of the study: tiling 5 %, then each backbone and layer an equal share, a tenth of
    it for the network's preparation. Not measured per backbone (E2CNN costs several times SRENet per
    sample), so the bar moves unevenly between backbones; it still never goes back."""
    weights = {"tile": 0.05, "report": 0.01}
    for name, layer in runs:
        weights[f"backbone {name} {layer}"] = 0.094 / len(runs)
        weights[f"consistency {name} {layer}"] = 0.846 / len(runs)
    return weights


def _publish_so_far(monitor: Monitor, docs: dict[str, dict[str, Any]], failed: dict[str, str]) -> None:
    """After each backbone: the summary of the backbones finished so far, under the final table's key."""
    keyed = {tuple(k.split("|")[:2]) + (int(k.split("|")[2]),): v for k, v in docs.items()}
    summary, _ = summarise_study(keyed)
    if summary:
        monitor.table("equislide-consistency-summary", summary, "per backbone (so far)")
    if failed:
        shown = sorted(failed)
        more = f" and {len(shown) - 5} more" if len(shown) > 5 else ""
        get_run_logger().warning("%d failed so far: %s%s", len(failed), "; ".join(shown[:5]), more)


def _artifacts(monitor: Monitor, report: dict[str, Any]) -> None:
    if report["summary"]:
        monitor.table("equislide-consistency-summary", report["summary"], "per backbone")
    if report["angles"]:
        monitor.table("equislide-consistency-angles", report["angles"], "per angle")
    monitor.markdown(
        "equislide-consistency",
        "# equislide rotation study\n\n```\n" + study_text(report) + "\n```\n",
        "rotation-consistency study",
    )


def run_study(inputs: list[str], out: str, **options: Any) -> dict[str, Any]:
    """Run :func:`consistency_flow` (``scheduler=``, ``workers=`` pick the cluster); returns the report."""
    return run_flow(consistency_flow, inputs, out, **options)
