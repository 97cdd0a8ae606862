"""Slide readers on the real slides (OpenSlide) and on plain images (tifffile / PIL)."""

from __future__ import annotations

import pickle
import time
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

from equislide.tiling import CorruptSlideError, ImageSlide, OpenSlideSlide, Slide, _base, open_slide


def test_svs_metadata(shared_data: Path) -> None:
    path = shared_data / "slides" / "CMU-1-Small-Region.svs"
    with open_slide(path) as slide:
        assert isinstance(slide, OpenSlideSlide) and isinstance(slide, Slide)
        assert repr(slide) == f"OpenSlideSlide({str(path)!r})"
        assert slide.path == path
        assert slide.dimensions == (2220, 2967)
        assert slide.level_count == 1 and slide.level_downsamples == (1.0,)
        assert slide.mpp == pytest.approx((0.499, 0.499))
        assert slide.mpp_source == "metadata"
        assert slide.properties["openslide.vendor"] == "aperio"
        assoc = slide.associated_images
        assert set(assoc) == {"label", "macro", "thumbnail"}
        for img in assoc.values():
            assert img.dtype == np.uint8 and img.ndim == 3 and img.shape[2] == 3


def test_svs_without_mpp_and_override(shared_data: Path) -> None:
    path = shared_data / "slides" / "TCGA-CR-7395-01A-01-TS1.svs"
    with open_slide(path) as slide:
        assert slide.level_dimensions == ((4443, 3567), (2221, 1783))
        assert slide.mpp is None and slide.mpp_source is None
        with pytest.raises(ValueError, match="input_mpp"):
            slide.read_region_mpp((0, 0), (16, 16), 1.0)
        assert slide.read_region_mpp((0, 0), (16, 8), None).shape == (8, 16, 3)
        assert slide.mpp_problem == "no resolution in the metadata"
    with open_slide(path, input_mpp=0.25) as slide:  # fills in: the file has none
        assert slide.mpp == (0.25, 0.25) and slide.mpp_source == "input_mpp" and not slide.mpp_warnings
    cmu = shared_data / "slides" / "CMU-1-Small-Region.svs"
    with open_slide(cmu, input_mpp=0.5) as slide:  # agrees with the metadata's 0.499: silent
        assert slide.mpp == pytest.approx((0.499, 0.499)) and slide.mpp_source == "metadata"
        assert not slide.mpp_warnings
    with open_slide(cmu, input_mpp=1.25) as slide:  # contradicts it: the metadata wins, said once
        assert slide.mpp == pytest.approx((0.499, 0.499)) and slide.mpp_source == "metadata"
        (warning,) = slide.mpp_warnings
        assert "--input-mpp 1.25 contradicts the metadata's 0.499" in warning and "--force-mpp" in warning
    with open_slide(cmu, force_mpp=1.25) as slide:
        assert slide.mpp == (1.25, 1.25) and slide.mpp_source == "override"
        assert "replaces the metadata's 0.499" in slide.mpp_warnings[0]
    with pytest.raises(ValueError, match="not both"):
        open_slide(cmu, input_mpp=0.5, force_mpp=0.5)


def test_read_region_white_outside(shared_data: Path) -> None:
    with open_slide(shared_data / "slides" / "CMU-1-Small-Region.svs") as slide:
        region = slide.read_region((2200, 2950), 0, (40, 30))
        assert region.shape == (30, 40, 3) and region.dtype == np.uint8
        assert (region[20:, :] == 255).all() and (region[:, 20:] == 255).all()
        inside = slide.read_region((1000, 1000), 0, (64, 64))
        assert inside.mean() < 240  # tissue there
        with pytest.raises(IndexError, match="level=1"):
            slide.read_region((0, 0), 1, (8, 8))
        with pytest.raises(ValueError, match="size"):
            slide.read_region((0, 0), 0, (0, 8))


def test_read_region_mpp_matches_resized_level0(shared_data: Path) -> None:
    """At 2x the native mpp the result equals a box-downsampled level-0 read."""
    with open_slide(shared_data / "slides" / "CMU-1-Small-Region.svs") as slide:
        mpp0 = slide.mpp[0]
        out = slide.read_region_mpp((512, 1024), (128, 96), 2 * mpp0)
        assert out.shape == (96, 128, 3)
        ref = slide.read_region((512, 1024), 0, (256, 192)).reshape(96, 2, 128, 2, 3).mean(axis=(1, 3))
        assert np.abs(out.astype(float) - ref).max() <= 1.0
        same = slide.read_region_mpp((512, 1024), (64, 64), mpp0)
        assert np.array_equal(same, slide.read_region((512, 1024), 0, (64, 64)))


def test_read_region_mpp_picks_pyramid_level(shared_data: Path) -> None:
    """On the 4-level TIFF, 4x downsampling reads level 2 and agrees with the SVS read at level 0."""
    tiff = shared_data / "slides" / "CMU-1-Small-Region.pyramid3.tiff"
    with open_slide(tiff) as slide, open_slide(shared_data / "slides" / "CMU-1-Small-Region.svs") as svs:
        assert slide.level_count == 3
        assert slide.mpp == pytest.approx((0.499, 0.499))
        target = 4 * slide.mpp[0]
        assert slide.best_level_for_downsample(4.0) == 2
        assert slide.best_level_for_downsample(3.9) == 1
        assert slide.best_level_for_downsample(0.5) == 0
        pyr = slide.read_region_mpp((400, 800), (200, 200), target).astype(float)
        ref = svs.read_region_mpp((400, 800), (200, 200), target).astype(float)
        # Different JPEG encodings and pyramid rounding: close on average, not bit-equal.
        assert np.abs(pyr - ref).mean() < 12


def test_thumbnail_uses_levels(shared_data: Path) -> None:
    with open_slide(shared_data / "slides" / "TCGA-CR-7395.pyramid4.tiff") as slide:
        thumb, downsample = slide.thumbnail(max_size=512)
        assert max(thumb.shape[:2]) == 512 and thumb.shape[2] == 3
        assert downsample == pytest.approx(4443 / 512)
        assert thumb.shape[0] == round(3567 / downsample)
        assert 100 < thumb.mean() < 250
    with open_slide(shared_data / "slides" / "CMU-1-Small-Region.svs") as slide:
        small, ds_small = slide.thumbnail(max_size=4096)  # larger than the slide: level 0 as is
        assert ds_small == 1.0 and small.shape == (2967, 2220, 3)


def test_read_region_mpp_speed(shared_data: Path) -> None:
    """The hot path: 256 px tiles at 1 µm/px from a 0.5 µm/px SVS (reported, loosely bounded)."""
    with open_slide(shared_data / "slides" / "CMU-1-Small-Region.svs") as slide:
        start = time.perf_counter()
        n = 0
        for l0_y in range(0, 2967 - 512, 512):
            for l0_x in range(0, 2220 - 512, 512):
                slide.read_region_mpp((l0_x, l0_y), (256, 256), 1.0)
                n += 1
        rate = n / (time.perf_counter() - start)
    assert rate > 5, f"{rate:.1f} tiles/s"


def test_plain_tiff_reader(plain_tiff: Path, gradient_rgb: np.ndarray) -> None:
    with open_slide(plain_tiff) as slide:
        assert isinstance(slide, ImageSlide)
        assert slide.dimensions == (400, 300) and slide.level_count == 1
        assert slide.mpp == pytest.approx((0.5, 0.5)) and slide.mpp_source == "metadata"
        assert slide.properties["equislide.reader"] == "tifffile"
        assert slide.associated_images == {}
        assert np.array_equal(slide.read_region((0, 0), 0, (400, 300)), gradient_rgb)
        part = slide.read_region((-10, 290), 0, (30, 20))
        assert (part[:, :10] == 255).all() and (part[10:] == 255).all()
        assert np.array_equal(part[:10, 10:], gradient_rgb[290:, :20])
        half = slide.read_region_mpp((0, 0), (200, 150), 1.0)
        ref = gradient_rgb.reshape(150, 2, 200, 2, 3).mean(axis=(1, 3))
        assert np.abs(half.astype(float) - ref).max() <= 1.0
        thumb, ds = slide.thumbnail(max_size=100)
        assert thumb.shape == (75, 100, 3) and ds == 4.0


def test_png_dpi_is_ignored_when_implausible(tmp_path: Path, gradient_rgb: np.ndarray) -> None:
    """72 dpi is a screen default, not a microscope's resolution; 50800 dpi is 0.5 µm/px."""
    screen, scope = tmp_path / "screen.png", tmp_path / "scope.png"
    Image.fromarray(gradient_rgb).save(screen, dpi=(72, 72))
    Image.fromarray(gradient_rgb).save(scope, dpi=(50800, 50800))
    with open_slide(screen) as slide:
        assert slide.mpp is None
    with open_slide(scope) as slide:
        assert slide.mpp == pytest.approx((0.5, 0.5), rel=1e-3)


def test_backend_choice(shared_data: Path, plain_tiff: Path) -> None:
    with open_slide(shared_data / "slides" / "CMU-1-Small-Region.svs", backend="openslide") as slide:
        assert isinstance(slide, OpenSlideSlide)
    with open_slide(plain_tiff, backend="image") as slide:
        assert isinstance(slide, ImageSlide)
    with pytest.raises(ValueError, match="backend"):
        open_slide(plain_tiff, backend="bogus")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="input_mpp"):
        open_slide(plain_tiff, input_mpp=-1.0)


def test_broken_tile_is_a_corrupt_slide_error_at_read(tmp_path: Path) -> None:
    """OpenSlide opens a tiled TIFF lazily; a zeroed JPEG tile fails when read, as CorruptSlideError."""
    rng = np.random.default_rng(0)
    path = tmp_path / "tiled.tif"
    tifffile.imwrite(
        path,
        rng.integers(0, 255, (512, 512, 3), dtype=np.uint8),
        photometric="rgb",
        tile=(256, 256),
        compression="jpeg",
    )
    with tifffile.TiffFile(path) as tif:
        offset, count = tif.pages.first.dataoffsets[3], tif.pages.first.databytecounts[3]
    data = bytearray(path.read_bytes())
    data[offset : offset + count] = bytes(count)
    path.write_bytes(bytes(data))
    with open_slide(path) as slide:
        assert isinstance(slide, OpenSlideSlide)
        assert slide.read_region((0, 0), 0, (16, 16)).shape == (16, 16, 3)  # tile 0 is fine
        with pytest.raises(CorruptSlideError) as info:
            slide.read_region((300, 300), 0, (16, 16))
    assert "\n" not in str(info.value) and path.name in str(info.value)


def test_thumbnail_in_strips_matches_one_read(shared_data: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Bounded-memory strip reading gives the same thumbnail as reading the level at once."""
    with open_slide(shared_data / "slides" / "TCGA-CR-7395.pyramid4.tiff") as slide:
        whole, ds_whole = slide.thumbnail(max_size=300)
        monkeypatch.setattr(_base, "_STRIP_PIXELS", 20_000)
        strips, ds_strips = slide.thumbnail(max_size=300)
    assert ds_whole == ds_strips and whole.shape == strips.shape
    # Not bit-equal: OpenSlide interpolates strips that start at a fractional level row, and PIL's
    # box filter takes whole pixels by their centre. But aligned: a one-row shift is far worse.
    whole, strips = whole.astype(int), strips.astype(int)
    aligned = np.abs(whole - strips).mean()
    shifted = min(np.abs(whole[1:] - strips[:-1]).mean(), np.abs(whole[:-1] - strips[1:]).mean())
    assert aligned < 2.5 and aligned < 0.3 * shifted


def test_read_region_mpp_upsamples(plain_tiff: Path, gradient_rgb: np.ndarray) -> None:
    """A finer mpp than the file's enlarges bilinearly; the geometry stays anchored at l0_xy."""
    with open_slide(plain_tiff) as slide:
        up = slide.read_region_mpp((100, 50), (80, 60), 0.25).astype(int)
    assert up.shape == (60, 80, 3)
    ref = np.repeat(np.repeat(gradient_rgb[50:80, 100:140], 2, axis=0), 2, axis=1).astype(int)
    assert np.abs(up - ref)[..., :2].max() <= 2  # the smooth channels: within half a source pixel


def test_slides_pickle_by_path(shared_data: Path, plain_tiff: Path) -> None:
    """Dask ships slides to workers: the copy reopens the same file with the same options."""
    with open_slide(shared_data / "slides" / "TCGA-CR-7395-01A-01-TS1.svs", input_mpp=0.5) as slide:
        copy = pickle.loads(pickle.dumps(slide))
        assert isinstance(copy, OpenSlideSlide) and copy.mpp == (0.5, 0.5)
        region = slide.read_region((1000, 1000), 1, (32, 32))
        assert np.array_equal(copy.read_region((1000, 1000), 1, (32, 32)), region)
        copy.close()
    with open_slide(plain_tiff) as slide:
        copy = pickle.loads(pickle.dumps(slide))
        assert isinstance(copy, ImageSlide) and copy.dimensions == slide.dimensions and copy.mpp == slide.mpp
