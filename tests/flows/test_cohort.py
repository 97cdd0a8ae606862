"""The cohort flow end to end: a real Prefect server, a real Dask LocalCluster, real files."""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.slow

# Small but real: 6 grid positions (5 cores of 800 µm), 5 µm/px, SRENet-18 of width 16 at layer 3.
OPTIONS = {"mpp": 5.0, "tile": 128, "halo": 16, "layer": 3, "model_kwargs": {"width": 16}}
CLI_OPTIONS = ["--mpp", "5", "--tile", "128", "--halo", "16", "--layer", "3", "--width", "16"]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, Path]:
    from equislide.tiling import write_phantom

    folder = tmp_path_factory.mktemp("inputs")
    info = write_phantom(folder / "tma.tiff", cores=6, core_diameter_um=800.0, seed=3)
    bad = folder / "broken.svs"
    bad.write_bytes(b"this is not a slide\n")
    return {"phantom": info.image_path, "bad": bad, "json": info.json_path}


def _run(inputs, out, dask_cluster, **options):
    from prefect_dask import DaskTaskRunner

    from equislide.flows._common import result_of
    from equislide.flows.cohort import cohort_flow

    runner = DaskTaskRunner(address=dask_cluster.scheduler_address)
    flow = cohort_flow.with_options(task_runner=runner)
    # A run whose every input failed ends Failed with the report as its data: read it from the state.
    return result_of(flow([str(p) for p in inputs], str(out), return_state=True, **options))


@pytest.fixture(scope="module")
def cohort_run(inputs, prefect_harness, dask_cluster, tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    t0 = time.perf_counter()
    report = _run([inputs["phantom"], inputs["bad"]], out, dask_cluster, **OPTIONS)
    return {"out": out, "report": report, "seconds": time.perf_counter() - t0}


def test_outputs_open_with_plain_tools(cohort_run, inputs):
    import zarr
    from PIL import Image
    from shapely.geometry import shape

    from equislide.tiling import read_phantom_info

    out, report = cohort_run["out"], cohort_run["report"]
    present = [c.name for c in read_phantom_info(inputs["json"]).cores if c.present]
    ok = {sid: s for sid, s in report["samples"].items() if s["status"] == "done"}
    assert sorted(ok) == sorted(f"tma/{name}" for name in present)

    manifest = json.loads((out / "run.json").read_text())
    assert manifest["schema"] == "equislide-run"
    for key in ("inputs", "parameters", "versions", "device", "samples", "timings"):
        assert manifest[key], key
    assert manifest["parameters"]["weights_note"].startswith("no trained weights: random(seed=0)")
    assert manifest["timings"]["total_s"] > 0
    assert {i["path"] for i in manifest["inputs"]} == {str(inputs["phantom"]), str(inputs["bad"])}
    assert manifest["device"]["workers"] == 2
    # This CPU has no bf16 units, so auto resolves to fp32 here; the feature stores say the same.
    assert manifest["parameters"]["precision_requested"] == "auto"
    assert manifest["parameters"]["precision"] == manifest["parameters"]["backbone_checkpoint"]["precision"]
    # tiles/s per worker: every tile of the run computed once, by one of the two workers.
    workers = manifest["stages"]["features"]["workers"]
    assert 1 <= len(workers) <= 2 and all(w.startswith("tcp://") for w in workers), workers
    n_tiles = sum(
        zarr.open_group(str(Path(s["outputs"]["tiles"])), mode="r")["tiles"].shape[0] for s in ok.values()
    )
    assert sum(w["tiles"] for w in workers.values()) == n_tiles
    for w in workers.values():
        assert w["seconds"] > 0 and w["tiles_per_s"] == pytest.approx(w["tiles"] / w["seconds"], rel=1e-2)

    for sid, s in ok.items():
        assert set(s["timings"]) >= {"tile_s", "features_s", "segment_s"}
        labels = zarr.open_array(str(Path(s["outputs"]["ome_zarr"]) / "labels/clusters/0"))[:]
        tissue = zarr.open_array(str(Path(s["outputs"]["ome_zarr"]) / "labels/tissue/0"))[:]
        image = zarr.open_array(str(Path(s["outputs"]["ome_zarr"]) / "0"))[:]
        assert labels.shape == tissue.shape == image.shape[-2:]
        assert labels.min() >= 0 and labels.max() <= 3, sid
        assert (labels > 0).sum() > 0.2 * labels.size, sid  # a core fills most of its crop
        assert ((labels > 0) <= (tissue > 0)).all(), "a cluster outside the tissue"
        gj = json.loads(Path(s["outputs"]["geojson"]).read_text())
        assert gj["type"] == "FeatureCollection" and gj["features"]
        for feat in gj["features"]:
            assert feat["geometry"]["type"] == "MultiPolygon"
            assert 1 <= feat["properties"]["label_value"] <= 3
            ring = np.asarray(feat["geometry"]["coordinates"][0][0])
            assert (ring[0] == ring[-1]).all() and len(ring) >= 4
            assert shape(feat["geometry"]).is_valid, (sid, feat["properties"])
        with Image.open(s["outputs"]["overlay_png"]) as png:
            # The picture at the OME-Zarr's level-0 size (a core's tile), plus the title and legend.
            assert png.mode == "RGB" and png.width >= labels.shape[1] and png.height > labels.shape[0]
        feats = zarr.open_array(str(Path(s["outputs"]["tiles"]) / "features/layer3"))
        assert feats.dtype == np.float16 and np.isfinite(feats[:]).all()
        assert feats.attrs["equislide_features"]["precision"] == manifest["parameters"]["precision"]

    # The slide's grid for QuPath: every position as a tmaCore object, the empty one isMissing.
    (tma_path,) = {s["outputs"]["tma_geojson"] for s in ok.values()}
    assert tma_path == str(out / "samples" / "tma.tma.geojson")
    cores = {f["properties"]["name"]: f for f in json.loads(Path(tma_path).read_text())["features"]}
    assert set(present) <= set(cores) and len(cores) == len(present) + 1
    assert {n for n, f in cores.items() if f["properties"]["isMissing"]} == set(cores) - set(present)
    assert all(
        f["properties"]["objectType"] == "tmaCore" and shape(f["geometry"]).is_valid for f in cores.values()
    )


def test_bad_input_is_named_and_the_others_finish(cohort_run, inputs):
    report = cohort_run["report"]
    bad = [i for i in report["inputs"] if i["status"] == "failed"]
    assert [i["path"] for i in bad] == [str(inputs["bad"])]
    assert "not a slide or image" in bad[0]["reason"] and "\n" not in bad[0]["reason"]
    assert report["samples"]["broken"]["status"] == "failed"
    good = [s for sid, s in report["samples"].items() if sid != "broken"]
    assert good and all(s["status"] == "done" for s in good)


def _digests(out: Path) -> dict[str, str]:
    skip = {"run.json"}
    return {
        str(p.relative_to(out)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(out.rglob("*"))
        if p.is_file() and p.name not in skip
    }


# The killed-and-resumed CLI run lives in test_service_robustness.py, which also checks that the
# kill lands while work remains.


def test_rotated_sample_gives_rotated_labels(inputs, prefect_harness, dask_cluster, tmp_path):
    import tifffile
    import zarr
    from PIL import Image

    from equislide.tiling import read_phantom_info

    info = read_phantom_info(inputs["json"])
    core = next(c for c in info.cores if c.present)
    with tifffile.TiffFile(info.image_path) as tif:
        level = tif.pages[2].asarray()  # downsample 4: 2 µm/px
    cx, cy, half = int(core.l0_x / 4), int(core.l0_y / 4), 96
    crop = np.ascontiguousarray(level[cy - half : cy + half, cx - half : cx + half, :3])
    Image.fromarray(crop).save(tmp_path / "core.png")
    Image.fromarray(np.ascontiguousarray(np.rot90(crop, 1))).save(tmp_path / "core_rot90.png")
    report = _run(
        [tmp_path / "core.png", tmp_path / "core_rot90.png"],
        tmp_path / "run",
        dask_cluster,
        mpp=2.0,
        input_mpp=2.0,
        tile=2 * half,
        halo=0,
        tma="no",
        layer=3,
        model_kwargs={"width": 16},
    )
    maps = {}
    for sid in ("core", "core_rot90"):
        s = report["samples"][sid]
        assert s["status"] == "done", s
        maps[sid] = zarr.open_array(str(Path(s["outputs"]["ome_zarr"]) / "labels/clusters/0"))[:]
    back = np.rot90(maps["core_rot90"], -1)
    assert back.shape == maps["core"].shape
    both = (back > 0) & (maps["core"] > 0)
    assert both.sum() > 0.5 * both.size
    agree = float((back[both] == maps["core"][both]).mean())
    assert agree >= 0.999, agree


def test_native_pixel_sample_is_labelled_but_left_out_of_the_cohort_fit(
    inputs, prefect_harness, dask_cluster, tmp_path, capsys
):
    """One core with a resolution, the same core as a PNG without one, ``native_pixels=True``: the
    PNG is segmented with the model of the other, not pooled into its fit (nor silently refused)."""
    import tifffile
    from PIL import Image

    from equislide.tiling import read_phantom_info

    info = read_phantom_info(inputs["json"])
    core = next(c for c in info.cores if c.present)
    with tifffile.TiffFile(info.image_path) as tif:
        level = tif.pages[2].asarray()  # downsample 4: 2 µm/px
    cx, cy, half = int(core.l0_x / 4), int(core.l0_y / 4), 96
    crop = np.ascontiguousarray(level[cy - half : cy + half, cx - half : cx + half, :3])
    res = ((5000, 1), (5000, 1))  # 2 µm/px
    tifffile.imwrite(
        tmp_path / "scaled.tif", crop, photometric="rgb", resolution=res, resolutionunit="CENTIMETER"
    )
    Image.fromarray(crop).save(tmp_path / "native.png")
    paths = [tmp_path / "scaled.tif", tmp_path / "native.png"]
    options = {
        "mpp": 2.0,
        "tile": 2 * half,
        "halo": 0,
        "tma": "no",
        "layer": 3,
        "model_kwargs": {"width": 16},
    }
    from equislide.cli import main

    cli = [
        "--mpp",
        "2",
        "--tile",
        str(2 * half),
        "--halo",
        "0",
        "--tma",
        "no",
        "--layer",
        "3",
        "--width",
        "16",
    ]
    out = str(tmp_path / "run")
    args = [
        "segment",
        *map(str, paths),
        "--out",
        out,
        "--native-pixels",
        "--scheduler",
        dask_cluster.scheduler_address,
    ]
    assert main([*args, *cli]) == 0
    err = capsys.readouterr().err
    assert f"WARNING {paths[1]}: no usable resolution: processed at native level-0 pixels" in err
    assert f"WARNING {paths[1]}: tiled at native pixels: left out of the cohort K-means fit" in err
    manifest = json.loads((tmp_path / "run" / "run.json").read_text())
    assert {sid: s["status"] for sid, s in manifest["samples"].items()} == {
        "scaled": "done",
        "native": "done",
    }
    params = manifest["parameters"]
    assert params["native_pixels"] is True and params["fit_native"] is False
    assert params["kmeans_model"]["samples"] == 1  # fitted on the scaled core alone
    native = next(r for r in params["input_records"] if r["path"].endswith("native.png"))
    assert any("left out of the cohort K-means fit" in w for w in native["warnings"]), native

    _run(paths, tmp_path / "pooled", dask_cluster, native_pixels=True, fit_native=True, **options)
    manifest = json.loads((tmp_path / "pooled" / "run.json").read_text())
    assert manifest["parameters"]["kmeans_model"]["samples"] == 2

    report = _run([tmp_path / "native.png"], tmp_path / "alone", dask_cluster, native_pixels=True, **options)
    (sample,) = report["samples"].values()
    assert sample["status"] == "failed" and "no sample with a resolution to fit on" in sample["error"], sample


def test_relative_out_folder_names_the_same_files_everywhere(
    inputs, prefect_harness, dask_cluster, tmp_path, monkeypatch
):
    """``--out`` given relative (the demo's default, ./equislide-demo): every sample is done and every
    file lies under that folder once. The run used to fail every sample ("every range ran but none of
    its tasks published the sample"), its stores written under OUT/tiles/OUT/tiles."""
    monkeypatch.chdir(tmp_path)
    report = _run([inputs["phantom"]], Path("rel") / "run", dask_cluster, **OPTIONS)
    assert report["samples"] and all(s["status"] == "done" for s in report["samples"].values()), report
    root = tmp_path / "rel" / "run"
    assert (root / "tiles").is_dir() and not (root / "tiles" / "rel").exists()
    assert not (root / "models" / "rel").exists()
    assert sorted(p.name for p in (root / "samples").rglob("*.geojson"))
