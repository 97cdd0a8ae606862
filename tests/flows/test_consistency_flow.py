"""Rotation consistency in the service and as a study: a real Prefect server, a real Dask cluster."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

OPTIONS = {"mpp": 5.0, "tile": 128, "halo": 16, "model_kwargs": {"width": 8}}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, Path]:
    from equislide.tiling import write_phantom

    folder = tmp_path_factory.mktemp("inputs")
    info = write_phantom(folder / "tma.tiff", cores=4, core_diameter_um=800.0, missing=0, seed=2)
    bad = folder / "broken.svs"
    bad.write_bytes(b"this is not a slide\n")
    return {"phantom": info.image_path, "bad": bad, "labels": info.labels_path}


def _runner(dask_cluster):
    from prefect_dask import DaskTaskRunner

    return DaskTaskRunner(address=dask_cluster.scheduler_address)


def test_segment_with_consistency_reports_per_sample_figures(inputs, prefect_harness, dask_cluster, tmp_path):
    from equislide.flows.cohort import cohort_flow, summary_text

    report = cohort_flow.with_options(task_runner=_runner(dask_cluster))(
        [str(inputs["phantom"])], str(tmp_path), layer=2, consistency=True, angles=4, regions=2, **OPTIONS
    )
    scored = {sid: s["consistency"] for sid, s in report["samples"].items() if "consistency" in s}
    assert len(scored) == 1  # 4 angles x 1 core is already the budget's quarter of 4 cores' features
    for sid, figures in scored.items():
        assert figures["kappa_90"] == 1.0 and figures["dice_90"] == 1.0, (sid, figures)
        doc = json.loads(Path(figures["path"]).read_text())
        assert doc["sample_id"] == sid and [a["angle"] for a in doc["angles"]] == [90.0, 180.0, 270.0]
        assert report["samples"][sid]["outputs"]["consistency"] == figures["path"]
    manifest = json.loads((tmp_path / "run.json").read_text())
    assert manifest["parameters"]["consistency"]["angles"] == [0.0, 90.0, 180.0, 270.0]
    assert report["timings"]["consistency_s"] > 0
    assert "(kappa at 90° 1.000)" in summary_text(report)


def test_study_compares_backbones_and_a_bad_input_fails_alone(
    inputs, prefect_harness, dask_cluster, tmp_path
):
    from equislide.flows.consistency import consistency_flow, study_text

    report = consistency_flow.with_options(task_runner=_runner(dask_cluster))(
        [str(inputs["phantom"]), str(inputs["bad"])],
        str(tmp_path),
        backbones=["srenet18", "resnet18"],
        layers=[2],
        angles=4,
        annotations=str(Path(inputs["labels"]).parent),  # the phantom's ground truth, tma.labels.tiff
        **OPTIONS,
    )
    assert list(report["failed"]) == [str(inputs["bad"])]
    assert "\n" not in report["failed"][str(inputs["bad"])]
    with (tmp_path / "metrics.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert list(rows[0])[:6] == ["sample", "backbone", "angle", "kappa", "dice", "valid_pixels"]
    assert len(rows) == 2 * 4 * 3  # backbones x cores x angles
    sre = [float(r["kappa"]) for r in rows if r["backbone"] == "srenet18"]
    res = [float(r["kappa"]) for r in rows if r["backbone"] == "resnet18"]
    assert sre == [1.0] * len(sre)
    assert max(res) < 1.0
    with (tmp_path / "summary.csv").open() as fh:
        summary = {r["backbone"]: r for r in csv.DictReader(fh)}
    assert list(next(iter(summary.values())))[:7] == [
        "backbone",
        "icc_feature",
        "icc_area",
        "kappa_mean",
        "kappa_std",
        "dice_mean",
        "dice_std",
    ]
    assert float(summary["srenet18"]["kappa_mean"]) == 1.0
    assert float(summary["srenet18"]["icc_feature"]) > float(summary["resnet18"]["icc_feature"])
    for picture in ("consistency.png", "rotations.png"):
        assert (tmp_path / picture).stat().st_size > 1000
    assert "srenet18" in study_text(report)
    # Which weights each backbone ran with: random here, as the package makes nothing the default.
    assert sorted(report["weights"]) == ["resnet18 L2", "srenet18 L2"]
    assert report["weights"]["srenet18 L2"].startswith("no trained weights: random(seed=0)")
    assert "weights srenet18 L2: no trained weights" in study_text(report)
    with (tmp_path / "annotations.csv").open() as fh:
        scores = list(csv.DictReader(fh))
    assert len(scores) == 2 * 4 and list(scores[0])[:6] == [
        "sample",
        "backbone",
        "layer",
        "dice_mean",
        "ari",
        "nmi",
    ]
    assert all(0.0 < float(r["dice_mean"]) <= 1.0 and int(r["pixels"]) > 100 for r in scores)
