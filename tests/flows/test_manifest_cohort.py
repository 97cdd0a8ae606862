"""A cohort given as a manifest CSV through the real cohort flow: its mpp fills in a resolution the file
lacks, its sample ID names the outputs, a bad row fails alone in one line, the others finish."""

from __future__ import annotations

import json

import pytest

pytestmark = pytest.mark.slow

OPTIONS = {
    "mpp": 10.0,
    "tile": 64,
    "halo": 8,
    "tma": "no",
    "backbone": "resnet18",
    "layer": 2,
    "model_kwargs": {"width": 8},
    "calibration_tiles": 2,
}


def test_manifest_mpp_and_sample_ids_reach_the_run(prefect_harness, tmp_path):
    from PIL import Image

    from equislide.flows.cohort import cohort_flow
    from equislide.storage import read_sample_meta
    from equislide.tiling import write_phantom

    info = write_phantom(tmp_path / "src" / "tma.tiff", cores=4, core_diameter_um=800.0, seed=1)
    slides = tmp_path / "cohort" / "slides"
    slides.mkdir(parents=True)
    with Image.open(info.image_path) as im:  # the same tissue as a PNG without any resolution
        im.convert("RGB").reduce(4).save(slides / "no-mpp.png")
    csv = tmp_path / "cohort" / "cohort.csv"
    csv.write_text("path,mpp,sample_id\nslides/no-mpp.png,2.0,Patient 7\nslides/no-mpp.png,,\n,1,\n")

    report = cohort_flow([], str(tmp_path / "run"), manifest_csv=str(csv), settle_seconds=0, **OPTIONS)
    assert {sid: s["status"] for sid, s in report["samples"].items()} == {
        "Patient_7": "done",
        "cohort.csv line 3": "failed",
        "cohort.csv line 4": "failed",
    }
    meta = read_sample_meta(report["samples"]["Patient_7"]["outputs"]["tiles"])
    assert meta["mpp_source"] == "input_mpp" and meta["source_mpp_xy"] == pytest.approx([2.0, 2.0]), meta
    failed = {i["path"]: i["reason"] for i in report["inputs"] if i["status"] == "failed"}
    assert failed == {
        f"{csv} line 3": f"{csv} line 3: slides/no-mpp.png is already listed on line 2",
        f"{csv} line 4": f"{csv} line 4: empty path",
    }
    selection = json.loads((tmp_path / "run" / "run.json").read_text())["parameters"]["input_selection"]
    assert selection["manifest"] == str(csv) and selection["found"] == 3 and selection["left_for_later"] == 0
