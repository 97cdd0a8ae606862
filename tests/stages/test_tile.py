"""The tile stage (tile_slide) on real slides and the phantom TMA: real reads and stores, reruns, kills."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import zarr
from PIL import Image

from equislide.stages.tile import tile_slide
from equislide.storage import DONE_MARKER, read_sample_meta
from equislide.tiling import (
    THUMBNAIL_MAX,
    NoTissueError,
    NoUsableMppError,
    open_slide,
    read_phantom_info,
    write_phantom,
)


def expected_stores(tree: dict[str, str]) -> set[str]:
    """The store folders in a :func:`_tree_sha` listing."""
    return {k.split(".zarr/")[0] for k in tree if ".zarr/" in k}


def _tree_sha(root: Path, *, skip: tuple[str, ...] = ("tile_report.json",)) -> dict[str, str]:
    """sha256 of every file under ``root`` by relative path."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name not in skip
    }


@pytest.fixture(scope="module")
def phantom(tmp_path_factory) -> Path:
    """A 2 x 3 phantom TMA (one position empty) with small cores: fast to write and to tile."""
    path = tmp_path_factory.mktemp("phantom") / "tma01.tiff"
    write_phantom(path, cores=6, seed=1, mpp=1.0, core_diameter_um=600)
    return path


def test_phantom_cores_are_stored_whole(phantom: Path, tmp_path: Path) -> None:
    info = read_phantom_info(phantom.with_suffix(".json"))
    results = tile_slide(phantom, tmp_path)
    present = sorted(c.name for c in info.cores if c.present)
    assert [r.sample_id for r in results] == [f"tma01/{name}" for name in present]
    sides = {r.side for r in results}
    assert len(sides) == 1 and sides.pop() % 8 == 0
    for r in results:
        assert (
            r.status == "written"
            and r.n_tiles == 1
            and r.store == tmp_path / "tma01" / f"{r.sample_id[6:]}.zarr"
        )
        g = zarr.open_group(str(r.store), mode="r")
        meta = g.attrs["equislide"]
        assert meta["kind"] == "tma_core" and meta["core"]["name"] == r.sample_id[6:]
        assert meta["halo"] == 0 and meta["grid_shape"] == [1, 1] and meta["mpp"] == 2.5
        tile = g["tiles"][0]
        # The core's true centre (level 0, from the phantom's JSON) lies well inside the tile ...
        truth = info.core(meta["core"]["name"])
        l_x, l_y = g["coords"][0]
        cx, cy = truth.l0_x / meta["l0_per_l"][0] - l_x, truth.l0_y / meta["l0_per_l"][1] - l_y
        assert 0.3 * r.side < cx < 0.7 * r.side and 0.3 * r.side < cy < 0.7 * r.side
        # ... and the core is whole: the tile's border is glass (near white), its centre tissue.
        border = np.concatenate([tile[:4].reshape(-1, 3), tile[-4:].reshape(-1, 3)])
        border = np.concatenate([border, tile[:, :4].reshape(-1, 3), tile[:, -4:].reshape(-1, 3)])
        assert (border.min(axis=1) > 200).mean() > 0.97
        assert (tile.min(axis=2) < 200).mean() > 0.15  # stained tissue (fat and lumina are pale)
        mask = g["tissue_mask"]
        assert mask.attrs["downsample"] > 0 and np.asarray(mask).any()


def test_rerun_skips_and_is_byte_identical(phantom: Path, tmp_path: Path) -> None:
    first = tile_slide(phantom, tmp_path)
    before = _tree_sha(tmp_path)
    second = tile_slide(phantom, tmp_path)
    assert [r.status for r in second] == ["skipped"] * len(first)
    assert [r.n_tiles for r in second] == [r.n_tiles for r in first]
    assert _tree_sha(tmp_path) == before
    # The same input into another folder gives the same bytes (no timestamps, no random names).
    other = tmp_path.parent / (tmp_path.name + "-again")
    tile_slide(phantom, other)
    assert _tree_sha(other) == before
    # Changed parameters redo the samples.
    third = tile_slide(phantom, tmp_path, halo=16)
    assert [r.status for r in third] == ["written"] * len(first)


def test_killed_run_resumes_to_identical_stores(phantom: Path, tmp_path: Path) -> None:
    reference = tmp_path / "reference"
    tile_slide(phantom, reference, tma="yes")
    expected = _tree_sha(reference)

    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "equislide", "tile", str(phantom), "--out", str(out), "--tma", "yes"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if any(out.glob(f"tma01/*.zarr/{DONE_MARKER}")):
                break
            time.sleep(0.005)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    n_done_at_kill = len(list(out.glob(f"tma01/*.zarr/{DONE_MARKER}")))
    print(f"killed after {n_done_at_kill} of {len(expected_stores(expected))} samples")
    # Whatever the kill interrupted, add a stale partial store as a crash mid-write would leave.
    stale = out / "tma01" / "B2.zarr.partial-0123456789ab"
    (stale / "tiles").mkdir(parents=True, exist_ok=True)
    (stale / "zarr.json").write_text("{broken")
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert not stale.exists()
    assert _tree_sha(out) == expected
    report = json.loads((out / "tile_report.json").read_text())
    assert report["inputs"][0]["status"] == "ok"


def test_cmu_svs_at_the_analysis_mpp(shared_data: Path, tmp_path: Path) -> None:
    svs = shared_data / "slides" / "CMU-1-Small-Region.svs"
    (result,) = tile_slide(svs, tmp_path, tile=256, halo=16)
    assert result.sample_id == "CMU-1-Small-Region" and not result.warnings
    g = zarr.open_group(str(result.store), mode="r")
    meta = g.attrs["equislide"]
    assert meta["mpp"] == 2.5 and meta["source_mpp"] == pytest.approx(0.499, abs=1e-3)
    assert meta["mpp_source"] == "metadata" and meta["kind"] == "slide"
    assert meta["source_sha256"] == result.input_sha256 and meta["source_path"] == str(svs.resolve())
    # 2220 x 2967 px at 0.499 -> 444 x 594 analysis px -> a 2 x 3 grid of 256 px tiles.
    assert meta["grid_shape"] == [3, 2] and 1 <= result.n_tiles <= 6
    tiles, coords = g["tiles"], g["coords"][:]
    # The grid is centred on the tissue's box, not anchored at (0, 0): coords step by whole tiles.
    assert tiles.shape == (result.n_tiles, 288, 288, 3) and ((coords - coords.min(0)) % 256 == 0).all()
    # A stored tile is exactly what read_region_mpp returns at its level-0 read origin.
    l0_per_l = meta["l0_per_l"]
    l0_xy = (round((coords[0, 0] - 16) * l0_per_l[0]), round((coords[0, 1] - 16) * l0_per_l[1]))
    with open_slide(svs) as slide:
        direct = slide.read_region_mpp(l0_xy, (288, 288), 2.5)
    assert np.array_equal(tiles[0], direct)
    # Mask px span 2967 / THUMBNAIL_MAX level-0 px (the longest side), 1 / l0_per_l analysis px each.
    assert g["tissue_mask"].attrs["downsample"] == pytest.approx(2967 / THUMBNAIL_MAX / l0_per_l[0], rel=0.01)


def test_tcga_without_mpp_refused_unless_native_pixels(shared_data: Path, tmp_path: Path) -> None:
    svs = shared_data / "slides" / "TCGA-CR-7395-01A-01-TS1.svs"
    with pytest.raises(NoUsableMppError) as info:
        tile_slide(svs, tmp_path / "refused")
    assert str(info.value).startswith(
        "TCGA-CR-7395-01A-01-TS1.svs: no usable resolution: no resolution in the metadata (give --input-mpp"
    )
    assert not (tmp_path / "refused").exists() or not any((tmp_path / "refused").iterdir())
    (native,) = tile_slide(svs, tmp_path / "native", tile=1024, halo=0, native_pixels=True)
    assert native.warnings and "native level-0 pixels" in native.warnings[0]
    meta = read_sample_meta(native.store)
    assert meta["mpp"] is None and meta["mpp_source"] is None and meta["l0_per_l"] == [1.0, 1.0]
    assert meta["native_pixels"] is True
    assert meta["warnings"] == native.warnings
    assert meta["grid_shape"] == [4, 5]  # 4443 x 3567 native px in 1024 px tiles

    (scaled,) = tile_slide(svs, tmp_path / "scaled", input_mpp=0.5)
    assert not scaled.warnings
    meta = read_sample_meta(scaled.store)
    assert meta["mpp"] == 2.5 and meta["mpp_source"] == "input_mpp" and meta["source_mpp"] == 0.5
    assert meta["native_pixels"] is False
    assert meta["grid_shape"] == [2, 2] and scaled.n_tiles >= 2  # 889 x 714 analysis px


def test_no_tissue_raises(tmp_path: Path) -> None:
    path = tmp_path / "white.png"
    Image.new("RGB", (600, 400), (250, 250, 250)).save(path)
    with pytest.raises(NoTissueError, match=r"white\.png: no tissue found"):
        tile_slide(path, tmp_path / "out", native_pixels=True)
    assert not any((tmp_path / "out").glob("*.zarr*")) if (tmp_path / "out").exists() else True


def test_bad_parameters_name_the_value(phantom: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="tma='maybe'"):
        tile_slide(phantom, tmp_path, tma="maybe")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="tile=3"):
        tile_slide(phantom, tmp_path, tile=3)
    with pytest.raises(ValueError, match="mpp=-1"):
        tile_slide(phantom, tmp_path, mpp=-1)
    assert not os.listdir(tmp_path)


def test_split_native_leaves_native_pixel_samples_out_of_a_cohort_fit(tmp_path: Path) -> None:
    import tifffile

    from equislide.stages.cluster import split_native

    rgb = np.full((300, 400, 3), 235, np.uint8)
    rgb[75:225, 100:300] = (150, 60, 140)
    Image.fromarray(rgb).save(tmp_path / "bare.png")
    res = ((20000, 1), (20000, 1))  # 0.5 µm/px
    tifffile.imwrite(
        tmp_path / "scaled.tif", rgb, photometric="rgb", resolution=res, resolutionunit="CENTIMETER"
    )
    (native,) = tile_slide(
        tmp_path / "bare.png", tmp_path / "t", native_pixels=True, mpp=0.5, tile=64, tma="no"
    )
    (scaled,) = tile_slide(tmp_path / "scaled.tif", tmp_path / "t", mpp=0.5, tile=64, tma="no")
    (filled,) = tile_slide(tmp_path / "bare.png", tmp_path / "f", input_mpp=0.5, mpp=0.5, tile=64, tma="no")
    stores = [native.store, scaled.store, filled.store]
    assert split_native(stores) == ([scaled.store, filled.store], [native.store])
    assert split_native(stores, fit_native=True) == (stores, [])
