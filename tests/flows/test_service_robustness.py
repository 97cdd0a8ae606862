"""The cohort flow as a service: real slides end to end, a worker killed mid-run, per-sample K-means.

Everything is real: the session's Prefect server (``prefect_harness``), Dask ``LocalCluster`` worker
processes, the shared SVS slides and files on disk; nothing is mocked.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.slow

SLIDES = ("CMU-1-Small-Region.svs", "TCGA-CR-7395-01A-01-TS1.svs")
# Small but real: 4 µm/px, 128 px tiles, SRENet-18 of width 8 at layer 3.
REAL_OPTIONS = {"mpp": 4.0, "tile": 128, "halo": 16, "layer": 3, "tma": "no", "model_kwargs": {"width": 8}}
PHANTOM_OPTIONS = {"mpp": 5.0, "tile": 128, "halo": 16, "layer": 3, "model_kwargs": {"width": 16}}


def _sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _digests(out: Path) -> dict[str, str]:
    return {
        str(p.relative_to(out)): _sha256(p)
        for p in sorted(out.rglob("*"))
        if p.is_file() and p.name != "run.json"
    }


def _run(inputs, out, address: str, **options):
    from prefect_dask import DaskTaskRunner

    from equislide.flows.cohort import cohort_flow

    runner = DaskTaskRunner(address=address)
    return cohort_flow.with_options(task_runner=runner)([str(p) for p in inputs], str(out), **options)


def _coords(geometry) -> np.ndarray:
    """Every (x, y) vertex of a (Multi)Polygon."""
    polys = geometry["coordinates"] if geometry["type"] == "MultiPolygon" else [geometry["coordinates"]]
    return np.concatenate([np.asarray(ring, float) for poly in polys for ring in poly])


# --- 1. both real slides end to end ---------------------------------------------------------------


def test_real_slides_end_to_end(shared_data, prefect_harness, dask_cluster, tmp_path):
    """CMU-1 (0.499 µm/px in its metadata) and TCGA-CR-7395 (JPEG 2000, no mpp) in one run.

    ``input_mpp`` only fills in a missing resolution: CMU-1 keeps its metadata's 0.499 (0.5 agrees,
    so no warning), TCGA-CR-7395 is read at 0.5 (``mpp_source == "input_mpp"``), which is what
    ``equislide segment --input-mpp 0.5 CMU... TCGA...`` does.
    """
    import zarr
    from shapely.geometry import shape

    from equislide.tiling import open_slide

    paths = [shared_data / "slides" / name for name in SLIDES]
    for p in paths:
        if not p.is_file():
            pytest.skip(f"{p} is missing")
    out = tmp_path / "run"
    report = _run(paths, out, dask_cluster.scheduler_address, input_mpp=0.5, **REAL_OPTIONS)

    manifest = json.loads((out / "run.json").read_text())
    assert [i["path"] for i in manifest["inputs"]] == [str(p) for p in paths]
    for rec, p in zip(manifest["inputs"], paths, strict=True):
        assert rec["status"] == "ok", rec
        assert rec["sha256"] == _sha256(p)
    ids = {p.stem: p for p in paths}
    assert sorted(manifest["samples"]) == sorted(ids)
    assert all(s["status"] == "done" for s in manifest["samples"].values()), manifest["samples"]
    assert report["samples"].keys() == manifest["samples"].keys()

    for sid, s in manifest["samples"].items():
        with open_slide(ids[sid], input_mpp=0.5) as slide:
            l0_w, l0_h = slide.dimensions
            assert slide.mpp_source == ("metadata" if sid.startswith("CMU") else "input_mpp")
        outs = s["outputs"]
        for key in ("ome_zarr", "overlay_png", "geojson", "kmeans", "tiles"):
            assert Path(outs[key]).exists(), (sid, key)

        # OME-Zarr (NGFF 0.5: zarr v3, metadata under "ome") with plain zarr: multiscales on the image
        # and on both label images
        root = zarr.open_group(outs["ome_zarr"], mode="r")
        assert root.attrs["ome"]["version"] == "0.5", sid
        ms = root.attrs["ome"]["multiscales"]
        assert ms and ms[0]["datasets"], sid
        image = root[ms[0]["datasets"][0]["path"]][:]
        assert image.ndim == 3 and image.shape[0] == 3 and image.dtype == np.uint8
        assert sorted(root["labels"].attrs["ome"]["labels"]) == ["clusters", "tissue"]
        maps = {}
        for name in ("clusters", "tissue"):
            ome = root["labels"][name].attrs["ome"]
            assert ome["multiscales"] and "image-label" in ome, (sid, name)
            maps[name] = root["labels"][name][ome["multiscales"][0]["datasets"][0]["path"]][:]
            assert maps[name].shape == image.shape[1:], (sid, name)
        clusters, tissue = maps["clusters"], maps["tissue"]
        assert clusters.min() >= 0 and clusters.max() <= 3, sid
        assert set(np.unique(tissue)) <= {0, 1}, sid
        assert (clusters > 0).any() and ((clusters > 0) <= (tissue > 0)).all(), sid

        # GeoJSON: a valid FeatureCollection in level-0 pixels, inside the slide
        gj = json.loads(Path(outs["geojson"]).read_text())
        assert gj["type"] == "FeatureCollection" and gj["features"], sid
        for feat in gj["features"]:
            assert feat["type"] == "Feature"
            assert feat["geometry"]["type"] in ("Polygon", "MultiPolygon")
            assert 1 <= feat["properties"]["label_value"] <= 3
            xy = _coords(feat["geometry"])
            assert np.isfinite(xy).all()
            assert xy[:, 0].min() >= 0 and xy[:, 0].max() <= l0_w, (sid, xy[:, 0].min(), xy[:, 0].max(), l0_w)
            assert xy[:, 1].min() >= 0 and xy[:, 1].max() <= l0_h, (sid, xy[:, 1].min(), xy[:, 1].max(), l0_h)
            assert shape(feat["geometry"]).is_valid, (sid, feat["properties"])  # JTS in QuPath needs it

        # features beside the tiles: float16, finite
        feats = zarr.open_array(str(Path(outs["tiles"]) / "features/layer3"), mode="r")
        assert feats.dtype == np.float16 and feats.shape[0] > 0
        assert np.isfinite(feats[:]).all(), sid


def _corrupt_tile_under(path: Path, level: int, x: float, y: float) -> int:
    """Zero the JPEG tile of pyramid ``level`` under the level-0 point (x, y); returns how many bytes."""
    import tifffile

    with tifffile.TiffFile(path) as tif:
        page = tif.pages[level]
        x, y = x * page.imagewidth / tif.pages[0].imagewidth, y * page.imagelength / tif.pages[0].imagelength
        tiles_across = -(-page.imagewidth // page.tilewidth)
        index = int(y) // page.tilelength * tiles_across + int(x) // page.tilewidth
        offset, count = page.dataoffsets[index], page.databytecounts[index]
    with open(path, "r+b") as fh:
        fh.seek(offset)
        fh.write(bytes(count))
    return count


def test_an_unreadable_core_fails_alone(prefect_harness, dask_cluster, tmp_path):
    """One TMA core's pixels are corrupt in the level its tiles are read from (4 µm/px for 5 µm/px;
    the thumbnail comes from the 2 µm/px level, so planning works): that core fails with a one-line
    reason naming it, and every other core of the slide finishes, its tiling group's neighbours too
    (9 cores on 2 workers: groups of 3)."""
    from equislide.tiling import write_phantom

    info = write_phantom(tmp_path / "tma.tiff", cores=9, core_diameter_um=800.0, mpp=1.0, seed=2, missing=0)
    a1 = info.core("A1")
    assert _corrupt_tile_under(Path(info.image_path), 2, a1.l0_x, a1.l0_y) > 0
    report = _run([info.image_path], tmp_path / "out", dask_cluster.scheduler_address, **PHANTOM_OPTIONS)
    status = {sid: s["status"] for sid, s in report["samples"].items()}
    others = [f"tma/{r}{c}" for r in "ABC" for c in "123" if (r, c) != ("A", "1")]
    assert status == {"tma/A1": "failed", **dict.fromkeys(others, "done")}
    error = report["samples"]["tma/A1"]["error"]
    assert error.startswith("tile: ") and "\n" not in error, error
    (record,) = report["inputs"]
    assert record["status"] == "failed" and "tma/A1" in record["reason"]
    for sid in others:
        assert Path(report["samples"][sid]["outputs"]["overlay_png"]).is_file()


# --- 2. a worker killed mid-run ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def phantom(tmp_path_factory) -> Path:
    from equislide.tiling import write_phantom

    return write_phantom(
        tmp_path_factory.mktemp("phantom") / "tma.tiff", cores=6, core_diameter_um=800.0, seed=3
    ).image_path


@pytest.fixture(scope="module")
def reference_run(phantom, prefect_harness, dask_cluster, tmp_path_factory) -> Path:
    """An uninterrupted run of the phantom on the session cluster."""
    out = tmp_path_factory.mktemp("reference")
    report = _run([phantom], out, dask_cluster.scheduler_address, **PHANTOM_OPTIONS)
    assert report["samples"] and all(s["status"] == "done" for s in report["samples"].values())
    return out


def _kill_a_feature_worker(client, out: Path, killed: list, stop: threading.Event) -> None:
    """SIGKILL the busiest worker as soon as the first feature array appears (written or being written).

    Feature extraction of the other samples, K-means and segmentation still lie ahead then, so the
    run is mid-flight. (Prefect-dask task keys do not carry task names, so the scheduler cannot say
    which worker runs ``features``; the busiest one is the likeliest.)
    """
    pids = client.run(os.getpid)
    while not stop.is_set():
        try:
            started = any(out.glob("tiles/**/features/layer*"))
        except OSError:  # a store's partial folder was renamed while the glob walked through it
            started = False
        if not started:
            time.sleep(0.005)
            continue
        processing = client.processing()
        victim = (sorted(processing, key=lambda a: -len(processing[a])) or list(pids))[0]
        finished = (out / "run.json").exists()
        os.kill(pids[victim], signal.SIGKILL)
        killed.append((victim, pids[victim], len(processing.get(victim, ())), finished))
        return


def test_worker_killed_during_features_run_completes(phantom, reference_run, prefect_harness, tmp_path):
    """A feature task's worker dies: Dask reruns the task elsewhere, the run finishes bit-identical.

    Features are written under ``features/layer{L}.partial-*`` and renamed when done, so the task that
    was killed mid-write leaves only a partial folder, which the rerun removes.
    """
    from distributed import Client, LocalCluster

    out = tmp_path / "run"
    killed: list = []
    stop = threading.Event()
    with (
        LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster,
        Client(cluster) as client,
    ):
        killer = threading.Thread(target=_kill_a_feature_worker, args=(client, out, killed, stop))
        killer.start()
        try:
            report = _run([phantom], out, cluster.scheduler_address, **PHANTOM_OPTIONS)
        finally:
            stop.set()
            killer.join()
    assert killed, "no feature array was seen being written: nothing was killed"
    assert not killed[0][3], "the worker was killed after the run had finished"
    assert report["samples"] and all(s["status"] == "done" for s in report["samples"].values()), report[
        "samples"
    ]
    assert not list(out.rglob("*.partial-*")), "a partial feature array was left behind"
    assert _digests(out) == _digests(reference_run)


# --- 3. a killed CLI run resumes without recomputing finished samples ---------------------------------


def test_killed_cli_run_resumes_without_recomputing(phantom, reference_run, tmp_path):
    """SIGKILL the whole CLI (flow process and workers) once some, not all, samples are segmented.

    The kill lands while work remains (asserted: some ``.segment.json`` markers are missing); the rerun
    keeps finished samples' markers untouched (mtime) and ends bit-identical to an uninterrupted run.
    """
    total = len(list(reference_run.glob("samples/tma/*.segment.json")))
    assert total >= 4
    out = tmp_path / "resumed"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "equislide", "segment", str(phantom), "--out", str(out), "--workers", "1"]
    cmd += ["--mpp", "5", "--tile", "128", "--halo", "16", "--layer", "3", "--width", "16"]
    proc = subprocess.Popen(
        cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    deadline = time.monotonic() + 300
    try:
        while not list(out.glob("samples/tma/*.segment.json")):
            assert proc.poll() is None, "the run ended before any sample was written"
            assert time.monotonic() < deadline, "no sample finished in 300 s"
            time.sleep(0.01)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the CLI and its Dask worker process
        proc.wait()
    finished = {p: p.stat().st_mtime_ns for p in out.glob("samples/tma/*.segment.json")}
    assert 1 <= len(finished) < total, f"{len(finished)} of {total} samples were done at the kill"
    assert not (out / "run.json").exists()
    features = {p: p.stat().st_mtime_ns for p in out.glob("tiles/**/_equislide_features_done.json")}
    assert len(features) == total  # K-means needs every sample's features before any segment

    rerun = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    for marker, mtime in {**finished, **features}.items():  # finished work was not recomputed
        assert marker.stat().st_mtime_ns == mtime, marker
    report = json.loads((out / "run.json").read_text())
    assert all(s["status"] in ("done", "skipped") for s in report["samples"].values())
    assert _digests(out) == _digests(reference_run)


# --- 4. --fit per-sample through the CLI -------------------------------------------------------------


def test_cli_fit_per_sample_saves_each_samples_centroids(phantom, tmp_path):
    """``equislide segment --fit per-sample``: one K-means per sample, saved beside its outputs."""
    from equislide.models.kmeans import KMeansModel

    out = tmp_path / "per-sample"
    cmd = [sys.executable, "-m", "equislide", "segment", str(phantom), "--out", str(out), "--workers", "1"]
    cmd += ["--mpp", "5", "--tile", "128", "--halo", "16", "--layer", "3", "--width", "8"]
    cmd += ["--fit", "per-sample", "--clusters", "3"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads((out / "run.json").read_text())
    assert report["parameters"]["fit"] == "per-sample" and report["parameters"]["kmeans_model"] is None
    assert not list((out / "models").glob("kmeans-*"))
    assert len(report["samples"]) >= 4
    centroids = {}
    for sid, s in report["samples"].items():
        assert s["status"] == "done", (sid, s)
        path = Path(s["outputs"]["kmeans"])
        assert path == out / "samples" / f"{sid}.kmeans.safetensors" and path.is_file()
        model = KMeansModel.load(path)
        assert model.k == 3
        centroids[sid] = np.asarray(model.centroids)
        assert centroids[sid].shape[0] == 3 and np.isfinite(centroids[sid]).all()
        marker = json.loads((out / "samples" / f"{sid}.segment.json").read_text())
        assert marker["identity"]["kmeans"]["mode"] == "per-sample"
    first, *rest = centroids.values()
    assert any(not np.array_equal(first, c) for c in rest), "every sample got the same centroids"
