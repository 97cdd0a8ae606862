"""open_slide on inputs that are broken, odd or hostile: each gives a clear SlideError or opens.

Decisions tested here:
- A PNG named ``*.svs`` opens through the plain-image fallback (the content decides, not the name).
- RGBA is composited on white, grayscale expanded, 16 bit scaled, 1x1 accepted.
- A file starting with TIFF/PNG magic that fails to decode is a CorruptSlideError; an unknown
  header is a NotASlideError.
"""

from __future__ import annotations

import os
import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

from equislide.tiling import (
    CorruptSlideError,
    ImageSlide,
    NotASlideError,
    OpenSlideSlide,
    PermissionDeniedError,
    SlideError,
    SlideNotFoundError,
    SlideTooLargeError,
    open_slide,
    tissue_mask,
)


def _assert_one_line(err: SlideError, path: Path) -> None:
    text = str(err)
    assert "\n" not in text
    assert path.name in text
    assert err.path == path
    assert err.reason and err.reason in text


def _expect(cls: type[SlideError], path: Path) -> SlideError:
    with pytest.raises(cls) as info:
        open_slide(path)
    _assert_one_line(info.value, path)
    return info.value


def test_zero_byte_file(tmp_path: Path) -> None:
    path = tmp_path / "empty.svs"
    path.write_bytes(b"")
    err = _expect(NotASlideError, path)
    assert "0 bytes" in str(err)


def test_text_renamed_svs(tmp_path: Path) -> None:
    path = tmp_path / "notes.svs"
    path.write_text("this is not a slide\nsecond line\n")
    err = _expect(NotASlideError, path)
    assert "unknown format" in err.reason and "OpenSlide" in str(err)


@pytest.mark.parametrize("n_bytes", [16, 4096, 300_000, 1_500_000])
def test_truncated_svs(tmp_path: Path, shared_data: Path, n_bytes: int) -> None:
    path = tmp_path / "cut.svs"
    path.write_bytes((shared_data / "slides" / "CMU-1-Small-Region.svs").read_bytes()[:n_bytes])
    err = _expect(CorruptSlideError, path)
    assert "truncated" in err.reason


def test_truncated_tiff(tmp_path: Path, shared_data: Path) -> None:
    """The IFD survives but the tile data is cut: found at open because plain images decode eagerly."""
    path = tmp_path / "cut.tiff"
    path.write_bytes((shared_data / "slides" / "CMU-1-Small-Region.pyramid3.tiff").read_bytes()[:100_000])
    _expect(CorruptSlideError, path)


def test_truncated_stripped_tiff(tmp_path: Path, gradient_rgb: np.ndarray) -> None:
    full, path = tmp_path / "full.tif", tmp_path / "cut.tif"
    tifffile.imwrite(full, gradient_rgb, photometric="rgb", compression="zlib")
    path.write_bytes(full.read_bytes()[: full.stat().st_size // 2])
    _expect(CorruptSlideError, path)


def test_truncated_png(tmp_path: Path, gradient_rgb: np.ndarray) -> None:
    full, path = tmp_path / "full.png", tmp_path / "cut.png"
    Image.fromarray(gradient_rgb).save(full)
    path.write_bytes(full.read_bytes()[: full.stat().st_size // 2])
    _expect(CorruptSlideError, path)


def test_png_named_svs_opens(tmp_path: Path, gradient_rgb: np.ndarray) -> None:
    path = tmp_path / "really-a-png.svs"
    Image.fromarray(gradient_rgb).save(path, format="PNG")
    with open_slide(path) as slide:
        assert isinstance(slide, ImageSlide)
        assert np.array_equal(slide.read_region((0, 0), 0, slide.dimensions), gradient_rgb)


def test_rgba_png_composited_on_white(tmp_path: Path) -> None:
    rgba = np.zeros((10, 12, 4), dtype=np.uint8)
    rgba[..., 0] = 200
    rgba[:, :6, 3] = 255  # left half opaque red-ish, right half transparent
    rgba[:, 6:, 3] = 0
    path = tmp_path / "rgba.png"
    Image.fromarray(rgba, mode="RGBA").save(path)
    with open_slide(path) as slide:
        rgb = slide.read_region((0, 0), 0, (12, 10))
    assert rgb.shape == (10, 12, 3)
    assert (rgb[:, :6] == [200, 0, 0]).all()
    assert (rgb[:, 6:] == 255).all()


def test_real_rgba_tile(shared_data: Path) -> None:
    path = shared_data / "tiles" / "histolab" / "tissue-level2-1784-6289-5880-10386.png"
    assert Image.open(path).mode == "RGBA"
    with open_slide(path) as slide:
        assert slide.read_region((0, 0), 0, slide.dimensions).shape == (512, 512, 3)


def test_16bit_tiff_is_scaled(tmp_path: Path) -> None:
    gray16 = np.array([[0, 65535], [257 * 100, 257 * 200]], dtype=np.uint16)
    rgb16 = np.stack([gray16, gray16 // 2, gray16], axis=-1)
    for name, data, photometric in [("g16.tif", gray16, "minisblack"), ("rgb16.tif", rgb16, "rgb")]:
        path = tmp_path / name
        tifffile.imwrite(path, data, photometric=photometric)
        with open_slide(path) as slide:
            rgb = slide.read_region((0, 0), 0, (2, 2))
        assert rgb.dtype == np.uint8
        assert rgb[0, 0, 0] == 0 and rgb[0, 1, 0] == 255
        assert rgb[1, 0, 0] == 100 and rgb[1, 1, 0] == 200


def test_16bit_png_is_scaled(tmp_path: Path) -> None:
    path = tmp_path / "g16.png"
    Image.fromarray(np.array([[0, 65535]], dtype=np.uint16)).save(path)
    with open_slide(path) as slide:
        assert slide.read_region((0, 0), 0, (2, 1)).tolist() == [[[0, 0, 0], [255, 255, 255]]]


def test_grayscale_and_palette_png(tmp_path: Path) -> None:
    gray = np.arange(64, dtype=np.uint8).reshape(8, 8) * 4
    Image.fromarray(gray, mode="L").save(tmp_path / "gray.png")
    Image.fromarray(np.dstack([gray] * 3)).convert("P").save(tmp_path / "pal.png")
    with open_slide(tmp_path / "gray.png") as slide:
        rgb = slide.read_region((0, 0), 0, (8, 8))
    assert np.array_equal(rgb, np.dstack([gray] * 3))
    with open_slide(tmp_path / "pal.png") as slide:
        assert slide.read_region((0, 0), 0, (8, 8)).shape == (8, 8, 3)


def test_palette_tiff(tmp_path: Path) -> None:
    rgb = np.zeros((16, 16, 3), np.uint8)
    rgb[:, 8:] = (200, 30, 90)
    path = tmp_path / "palette.tif"
    Image.fromarray(rgb).convert("P").save(path)
    with open_slide(path) as slide:
        out = slide.read_region((0, 0), 0, (16, 16))
    assert slide.properties["tiff.photometric"] == "PALETTE"
    assert np.abs(out.astype(int) - np.asarray(Image.open(path).convert("RGB"))).max() <= 1
    assert (out[:, :8] == 0).all() and out[0, 12, 0] > 150  # the web palette rounds (200, 30, 90)


def test_one_pixel_image(tmp_path: Path) -> None:
    path = tmp_path / "dot.png"
    Image.new("RGB", (1, 1), (10, 20, 30)).save(path)
    with open_slide(path) as slide:
        assert slide.dimensions == (1, 1)
        assert slide.read_region((0, 0), 0, (1, 1)).tolist() == [[[10, 20, 30]]]
        thumb, ds = slide.thumbnail(max_size=64)
        assert thumb.shape == (1, 1, 3) and ds == 1.0


def test_tiff_decompression_bomb(tmp_path: Path, tiff_bomb) -> None:
    path = tiff_bomb(tmp_path / "bomb.tif", 100_000, 100_000)
    err = _expect(SlideTooLargeError, path)
    assert "100000x100000" in str(err)


def test_png_decompression_bomb(tmp_path: Path) -> None:
    path = tmp_path / "bomb.png"
    Image.new("RGB", (8, 8)).save(path)
    data = bytearray(path.read_bytes())
    ihdr = struct.pack(">II", 100_000, 100_000) + bytes(data[24:29])
    data[16:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    path.write_bytes(bytes(data))
    _expect(SlideTooLargeError, path)


def test_bomb_limit_is_configurable(plain_tiff: Path) -> None:
    with pytest.raises(SlideTooLargeError):
        open_slide(plain_tiff, max_pixels=1000)


def test_all_white_image_opens_with_empty_mask(tmp_path: Path) -> None:
    path = tmp_path / "white.png"
    Image.new("RGB", (256, 200), (255, 255, 255)).save(path)
    with open_slide(path) as slide:
        thumb, _ = slide.thumbnail()
    assert not tissue_mask(thumb, mpp=None).any()


def test_missing_file(tmp_path: Path) -> None:
    err = _expect(SlideNotFoundError, tmp_path / "nope.svs")
    assert isinstance(err, FileNotFoundError)


def test_directory(tmp_path: Path) -> None:
    path = tmp_path / "folder.svs"
    path.mkdir()
    err = _expect(NotASlideError, path)
    assert "directory" in err.reason


def test_fifo_is_refused_without_blocking(tmp_path: Path) -> None:
    path = tmp_path / "pipe.svs"
    os.mkfifo(path)
    err = _expect(NotASlideError, path)
    assert "regular file" in err.reason


_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0


@pytest.mark.skipif(_ROOT, reason="root reads files whatever their mode; the FIFO test covers special files")
def test_unreadable_file(tmp_path: Path, gradient_rgb: np.ndarray) -> None:
    path = tmp_path / "locked.png"
    Image.fromarray(gradient_rgb).save(path)
    path.chmod(0)
    try:
        _expect(PermissionDeniedError, path)
    finally:
        path.chmod(0o644)


def test_unicode_and_spaces_in_names(tmp_path: Path, shared_data: Path, gradient_rgb: np.ndarray) -> None:
    folder = tmp_path / "dossier é ✓"
    folder.mkdir()
    svs = folder / "coupe n°1 — tümör.svs"
    shutil.copyfile(shared_data / "slides" / "CMU-1-Small-Region.svs", svs)
    with open_slide(svs) as slide:
        assert isinstance(slide, OpenSlideSlide) and slide.dimensions == (2220, 2967)
    png = folder / "核心 A1.png"
    Image.fromarray(gradient_rgb).save(png)
    with open_slide(png) as slide:
        assert slide.dimensions == (400, 300)
    err = _expect(SlideNotFoundError, folder / "absent ✓.svs")
    assert "absent ✓.svs" in str(err)


def test_path_with_dotdot(tmp_path: Path, gradient_rgb: np.ndarray) -> None:
    (tmp_path / "a").mkdir()
    Image.fromarray(gradient_rgb).save(tmp_path / "img.png")
    with open_slide(tmp_path / "a" / ".." / "img.png") as slide:
        assert slide.dimensions == (400, 300)
    with open_slide(str(tmp_path / "a" / ".." / "img.png")) as slide:
        assert slide.dimensions == (400, 300)
