"""The optional cuCIM reader against OpenSlide on the real slides (skipped without cuCIM), and the
error without it (always runs).

Tolerances: level 0 is bit-equal to OpenSlide (both decode the same JPEG / JPEG 2000 tiles with
the same libraries here). Above level 0 a region starts at the level pixel nearest to
``l0_x / downsample`` while OpenSlide resamples at the fractional position, so there the pixels
are bit-equal to the TIFF level itself (tifffile) and only close on average to OpenSlide's.
"""

from __future__ import annotations

import math
import os
import pickle
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import tifffile
from PIL import Image

from equislide.tiling import (
    CorruptSlideError,
    CuCIMSlide,
    NotASlideError,
    OpenSlideSlide,
    SlideError,
    UnsupportedImageError,
    open_slide,
)

SLIDES = (
    "CMU-1-Small-Region.svs",  # Aperio JPEG, 1 level, label/macro/thumbnail, aperio.MPP
    "TCGA-CR-7395-01A-01-TS1.svs",  # Aperio JPEG 2000, 2 levels, no mpp
    "CMU-1-Small-Region.pyramid3.tiff",  # generic tiled TIFF, 3 levels, mpp from resolution tags
    "TCGA-CR-7395.pyramid4.tiff",  # generic tiled TIFF, 4 levels, no mpp
)


@pytest.fixture(scope="module")
def cucim() -> ModuleType:
    return pytest.importorskip("cucim", reason="cuCIM is optional (pip install cucim-cu12)")


def _pair(shared_data: Path, name: str) -> tuple[CuCIMSlide, OpenSlideSlide]:
    path = shared_data / "slides" / name
    cu, osl = open_slide(path, backend="cucim"), open_slide(path, backend="openslide")
    assert isinstance(cu, CuCIMSlide) and isinstance(osl, OpenSlideSlide)
    return cu, osl


@pytest.mark.parametrize("name", SLIDES)
def test_metadata_equals_openslide(cucim: ModuleType, shared_data: Path, name: str) -> None:
    cu, osl = _pair(shared_data, name)
    with cu, osl:
        assert repr(cu) == f"CuCIMSlide({str(cu.path)!r})"
        assert cu.level_dimensions == osl.level_dimensions
        assert cu.level_downsamples == pytest.approx(osl.level_downsamples, rel=1e-6)  # float32 in cuCIM
        if osl.mpp is None:
            assert cu.mpp is None and cu.mpp_source is None
        else:
            assert cu.mpp == pytest.approx(osl.mpp, rel=1e-6) and cu.mpp_source == "metadata"
        assert cu.properties["equislide.reader"] == "cucim"
        assert set(cu.associated_images) == set(osl.associated_images)
        for key, img in cu.associated_images.items():
            assert img.dtype == np.uint8 and img.shape[2] == 3
            assert np.array_equal(img, osl.associated_images[key])


def test_svs_mpp_and_override(cucim: ModuleType, shared_data: Path) -> None:
    path = shared_data / "slides" / "CMU-1-Small-Region.svs"
    with open_slide(path, backend="cucim") as slide:
        assert slide.properties["aperio.MPP"] == "0.4990" and slide.mpp == (0.499, 0.499)
    with open_slide(path, backend="cucim", input_mpp=0.25) as slide:
        assert slide.mpp == (0.25, 0.25) and slide.mpp_source == "override"
        copy = pickle.loads(pickle.dumps(slide))
        assert isinstance(copy, CuCIMSlide) and copy.mpp == (0.25, 0.25)
        copy.close()


@pytest.mark.parametrize("name", SLIDES)
def test_level0_equals_openslide(cucim: ModuleType, shared_data: Path, name: str) -> None:
    """Bit-equal at level 0, inside, across tile borders and partly or wholly outside (white)."""
    cu, osl = _pair(shared_data, name)
    with cu, osl:
        l0_w, l0_h = cu.dimensions
        for l0_xy, size in [
            ((1000, 700), (257, 129)),
            ((-20, -10), (64, 48)),
            ((l0_w - 30, l0_h - 20), (64, 64)),
            ((l0_w + 5, 0), (8, 8)),
            ((-100, -100), (l0_w + 200, 150)),  # wider than the level: cuCIM itself refuses this
        ]:
            region = cu.read_region(l0_xy, 0, size)
            assert region.shape == (size[1], size[0], 3) and region.dtype == np.uint8
            assert np.array_equal(region, osl.read_region(l0_xy, 0, size)), (l0_xy, size)
        assert (cu.read_region((l0_w - 30, l0_h - 20), 0, (64, 64))[20:] == 255).all()


@pytest.mark.parametrize("name", [n for n in SLIDES if n.endswith(".tiff")])
def test_upper_levels_equal_the_tiff_levels(cucim: ModuleType, shared_data: Path, name: str) -> None:
    """Above level 0: the TIFF level's pixels from round(l0 / downsample), white outside; near OpenSlide."""
    path = shared_data / "slides" / name
    with tifffile.TiffFile(path) as tif:
        levels = [series.asarray() for series in tif.series[0].levels]
    cu, osl = _pair(shared_data, name)
    with cu, osl:
        for level in range(1, cu.level_count):
            ds = cu.level_downsamples[level]
            l_h, l_w = levels[level].shape[:2]
            for l0_xy in [
                (0, 0),
                (1001, 555),
                (-7, -13),
                (-1, 3),
                (3, 5),
                (int(l_w * ds) - 40, int(l_h * ds) - 30),
            ]:
                region = cu.read_region(l0_xy, level, (100, 80))
                ref = np.full((80 + 20, 100 + 20, 3), 255, dtype=np.uint8)  # 10 px white margin
                l_x, l_y = math.floor(l0_xy[0] / ds + 0.5), math.floor(l0_xy[1] / ds + 0.5)
                x0, y0 = max(l_x, 0), max(l_y, 0)
                part = levels[level][y0 : l_y + 80, x0 : l_x + 100]
                ref[
                    10 + y0 - l_y : 10 + y0 - l_y + part.shape[0],
                    10 + x0 - l_x : 10 + x0 - l_x + part.shape[1],
                ] = part
                assert np.array_equal(region, ref[10:-10, 10:-10]), (level, l0_xy)
            inside = (1001, 555)
            diff = np.abs(
                cu.read_region(inside, level, (100, 80)).astype(int)
                - osl.read_region(inside, level, (100, 80))
            )
            assert diff.mean() < 15  # OpenSlide resamples up to half a level pixel away: 12.7 at worst here


def test_read_region_mpp_and_thumbnail(cucim: ModuleType, shared_data: Path) -> None:
    cu, osl = _pair(shared_data, "CMU-1-Small-Region.svs")
    with cu, osl:
        for mpp in (0.499, 1.0, 2.0):  # one level: the same level-0 pixels through the same resize
            a, b = (
                cu.read_region_mpp((512, 1024), (128, 96), mpp),
                osl.read_region_mpp((512, 1024), (128, 96), mpp),
            )
            assert np.array_equal(a, b), mpp
        thumb, ds = cu.thumbnail(max_size=300)
        ref, ref_ds = osl.thumbnail(max_size=300)
        assert ds == ref_ds and np.array_equal(thumb, ref)
    cu, osl = _pair(shared_data, "CMU-1-Small-Region.pyramid3.tiff")
    with cu, osl:
        target = 4 * cu.mpp[0]  # reads level 2
        a = cu.read_region_mpp((400, 800), (200, 200), target).astype(int)
        b = osl.read_region_mpp((400, 800), (200, 200), target).astype(int)
        assert a.shape == b.shape == (200, 200, 3) and np.abs(a - b).mean() < 4  # 1.8: sub-pixel offsets
        thumb, ds = cu.thumbnail(max_size=300)  # from level 2 at offset 0: bit-equal
        ref, ref_ds = osl.thumbnail(max_size=300)
        assert ds == ref_ds and np.array_equal(thumb, ref)


def test_rgba_tiff_is_composited_on_white(cucim: ModuleType, tmp_path: Path) -> None:
    """cuCIM's slow path (stripped or RGBA TIFF) gives premultiplied RGBA; OpenSlide straight alpha."""
    rng = np.random.default_rng(0)
    rgba = rng.integers(0, 255, (64, 96, 4), dtype=np.uint8)
    path = tmp_path / "rgba.tif"
    tifffile.imwrite(path, rgba, photometric="rgb", tile=(32, 32), extrasamples=[2])
    with open_slide(path, backend="cucim") as cu, open_slide(path, backend="openslide") as osl:
        a, b = (
            cu.read_region((-4, 0), 0, (100, 64)).astype(int),
            osl.read_region((-4, 0), 0, (100, 64)).astype(int),
        )
    assert np.abs(a - b).max() <= 1  # rounding of premultiplication


def test_unsupported_files_are_one_line_slide_errors(
    cucim: ModuleType, tmp_path: Path, shared_data: Path
) -> None:
    png, text, truncated = tmp_path / "image.png", tmp_path / "notes.svs", tmp_path / "cut.svs"
    Image.new("RGB", (16, 16), (10, 20, 30)).save(png)
    text.write_text("not a slide\n" * 10)
    svs = (shared_data / "slides" / "CMU-1-Small-Region.svs").read_bytes()
    truncated.write_bytes(svs[: len(svs) // 3])
    for path, cls in [(png, UnsupportedImageError), (text, NotASlideError), (truncated, CorruptSlideError)]:
        with pytest.raises(cls) as info:
            open_slide(path, backend="cucim")
        assert "\n" not in str(info.value) and str(info.value).startswith(f"{path.name}: ")
        assert "cuCIM" in str(info.value)
    with pytest.raises(SlideError, match="file not found"):
        open_slide(tmp_path / "missing.svs", backend="cucim")
    with open_slide(png) as slide:  # auto never picks cuCIM
        assert not isinstance(slide, CuCIMSlide)
    with open_slide(shared_data / "slides" / "CMU-1-Small-Region.svs") as slide:
        assert isinstance(slide, OpenSlideSlide)


def test_without_cucim_the_error_says_how_to_install(tmp_path: Path) -> None:
    """A fresh interpreter with no PYTHONPATH (so no development copy of cuCIM): a clear ValueError."""
    code = (
        "import importlib.util, sys\n"
        "if importlib.util.find_spec('cucim'): sys.exit(3)\n"
        "from equislide.tiling import open_slide\n"
        "try:\n"
        "    open_slide(sys.argv[1], backend='cucim')\n"
        "except ValueError as err:\n"
        "    print(err)\n"
        "    sys.exit(0)\n"
        "sys.exit(1)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    run = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "slide.svs")],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    if run.returncode == 3:
        pytest.skip("cuCIM is installed in this environment")
    assert run.returncode == 0, run.stderr
    message = run.stdout.strip()
    assert "\n" not in message and message.startswith("slide.svs: ")
    assert "cuCIM" in message and "not installed" in message and "pip install cucim-cu12" in message


def test_gpu_read_falls_back_to_the_host_readers_without_cucim_or_a_gpu(
    shared_data: Path, tmp_path: Path
) -> None:
    """Without cuCIM, cupy or a GPU (this CPU machine), or for a format cuCIM does not read, the GPU
    read is OpenSlide's / the plain-image reader's numpy region, pixel for pixel."""
    from equislide.tiling import gpu_decode_reader, read_region_on_device

    png = tmp_path / "plain.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 50, 3), dtype=np.uint8)).save(png)
    assert gpu_decode_reader(png) == "host"  # never cuCIM for a PNG, GPU or not
    with open_slide(png) as s:
        assert np.array_equal(
            read_region_on_device(png, (3, 4), 0, (20, 10)), s.read_region((3, 4), 0, (20, 10))
        )
    svs = shared_data / "slides" / SLIDES[0]
    if gpu_decode_reader(svs) != "host":
        pytest.skip("cuCIM with a GPU is here: the GPU read is checked by the next test")
    got = read_region_on_device(svs, (100, 200), 0, (96, 64))
    with open_slide(svs, backend="openslide") as s:
        assert isinstance(got, np.ndarray) and np.array_equal(got, s.read_region((100, 200), 0, (96, 64)))
    with pytest.raises(SlideError, match="missing.svs"):
        read_region_on_device(tmp_path / "missing.svs", (0, 0), 0, (8, 8))


@pytest.mark.parametrize("name", SLIDES)
def test_gpu_read_equals_the_cpu_decode(cucim: ModuleType, shared_data: Path, name: str) -> None:
    """cuCIM's GPU decode against its CPU decode, inside and across the image's edge (needs cuCIM,
    cupy and a GPU; skipped otherwise)."""
    from equislide.arrays import cupy_or_none
    from equislide.tiling import gpu_decode_reader, read_region_on_device

    cp = cupy_or_none()
    if cp is None:
        pytest.skip("cupy with a GPU is needed for cuCIM's GPU decode")
    path = shared_data / "slides" / name
    assert gpu_decode_reader(path) == "cucim-gpu"
    with open_slide(path, backend="cucim") as s:
        w, h = s.level_dimensions[0]
        for l0_xy in ((0, 0), (w - 40, h - 30)):
            got = read_region_on_device(path, l0_xy, 0, (128, 96))
            ref = s.read_region(l0_xy, 0, (128, 96))
            diff = np.abs(cp.asnumpy(got).astype(int) - ref.astype(int))
            assert got.shape == ref.shape and diff.mean() < 1.0 and diff.max() <= 16
