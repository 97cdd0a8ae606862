"""Readers on hostile files: colour by photometric interpretation and bits per sample, truncated
headers, and time / memory bounds on huge images without a pyramid.

Every file is written here (tifffile / PIL); the huge ones from a single pre-compressed tile or
strip repeated, so they are a few MB on disk and take well under a second to write.
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
import textwrap
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

from equislide.tiling import (
    CorruptSlideError,
    ImageSlide,
    OpenSlideSlide,
    SlideError,
    SlideTooLargeError,
    open_slide,
    plan_samples,
)
from equislide.tiling import _image_slide as image_slide_module


def _assert_one_line(err: SlideError, path: Path, *words: str) -> str:
    text = str(err)
    assert "\n" not in text and text.startswith(f"{path.name}: "), text
    for w in words:
        assert w in text, text
    return text


def _he(h: int = 96, w: int = 128) -> np.ndarray:
    """An H&E-coloured square on near-white glass."""
    rgb = np.full((h, w, 3), 235, np.uint8)
    rgb[h // 4 : 3 * h // 4, w // 4 : 3 * w // 4] = (150, 60, 140)
    rgb[h // 3 : h // 2, w // 3 : w // 2] = (90, 40, 120)
    return rgb


def _read(path: Path) -> np.ndarray:
    with open_slide(path) as slide:
        w, h = slide.dimensions
        return slide.read_region((0, 0), 0, (w, h))


# --- truncated and header-only files ---------------------------------------------------------------


def test_tiff_of_only_the_magic_bytes(tmp_path: Path) -> None:
    path = tmp_path / "magic.tif"
    path.write_bytes(b"II*\x00")
    with pytest.raises(CorruptSlideError) as info:
        open_slide(path)
    text = _assert_one_line(info.value, path, "truncated TIFF", "4-byte file")
    assert "unpack" not in text  # not Python's struct message


def test_tiff_header_pointing_past_the_end(tmp_path: Path) -> None:
    path = tmp_path / "ifd.tif"
    path.write_bytes(b"II*\x00" + (10**6).to_bytes(4, "little") + b"\x00" * 16)
    with pytest.raises(CorruptSlideError) as info:
        open_slide(path)
    _assert_one_line(info.value, path, "TIFF")


def test_jpeg_with_headers_only(tmp_path: Path) -> None:
    buf = io.BytesIO()
    Image.fromarray(_he()).save(buf, "JPEG")
    data = buf.getvalue()
    path = tmp_path / "headers.jpg"
    path.write_bytes(data[: data.index(b"\xff\xda") + 12])  # up to the start of the scan
    with pytest.raises(CorruptSlideError) as info:
        open_slide(path)
    _assert_one_line(info.value, path, "truncated or corrupt JPEG")
    assert not isinstance(info.value, OSError)  # a flow must not retry it as an I/O error


# --- colour spaces and bit depths -----------------------------------------------------------------


def test_cmyk_tiff_is_converted_not_read_as_rgba(tmp_path: Path) -> None:
    rgb = _he()
    k = (255 - rgb.max(axis=-1)).astype(np.float64)
    cmy = (255 - rgb - k[..., None]) / np.maximum(1e-9, 255 - k[..., None]) * 255
    cmyk = np.concatenate([cmy, k[..., None]], axis=-1)
    path = tmp_path / "cmyk.tif"
    tifffile.imwrite(path, np.rint(cmyk).astype(np.uint8), photometric="separated")
    got = _read(path)
    assert np.abs(got.astype(int) - rgb).max() <= 2
    # With K taken as alpha this area of zero K would be fully transparent, i.e. white.
    assert got[48, 64].tolist() != [255, 255, 255]


def test_cmyk_with_alpha_is_composited(tmp_path: Path) -> None:
    cmyka = np.zeros((8, 8, 5), np.uint8)
    cmyka[..., 0] = 255  # pure cyan
    cmyka[..., 4] = 255
    cmyka[:, 4:, 4] = 0  # right half transparent
    path = tmp_path / "cmyka.tif"
    tifffile.imwrite(path, cmyka, photometric="separated", extrasamples=["unassalpha"])
    got = _read(path)
    assert got[0, 0].tolist() == [0, 255, 255] and got[0, 7].tolist() == [255, 255, 255]


def test_cmyk_with_other_inks_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "six-inks.tif"  # InkSet 2: not CMYK (the ink names would say which)
    ink_set = [(332, "H", 1, 2, True)]
    tifffile.imwrite(path, np.zeros((8, 8, 6), np.uint8), photometric="separated", extratags=ink_set)
    with pytest.raises(SlideError) as info:
        open_slide(path)
    _assert_one_line(info.value, path, "not CMYK")


def test_cielab_tiff_is_converted(tmp_path: Path) -> None:
    from skimage.color import rgb2lab

    rgb = _he()
    lab = rgb2lab(rgb)
    raw = np.empty(rgb.shape, np.uint8)
    raw[..., 0] = np.rint(lab[..., 0] * 255 / 100)
    raw[..., 1:] = np.rint(lab[..., 1:]).astype(np.int8).view(np.uint8)  # signed a*, b*
    path = tmp_path / "lab.tif"
    tifffile.imwrite(path, raw, photometric="cielab")
    with open_slide(path) as slide:
        assert slide.properties["tiff.photometric"] == "CIELAB"
    got = _read(path)
    assert np.abs(got.astype(int) - rgb).max() <= 3  # 8-bit L*a*b* rounding
    assert np.abs(raw.astype(int) - rgb).max() > 40  # read as RGB it would be far off


def test_twelve_bit_data_scaled_by_bits_per_sample(tmp_path: Path) -> None:
    rgb = _he()
    twelve = ((rgb.astype(np.uint32) * 4095 + 127) // 255).astype(np.uint16)
    packed = tmp_path / "packed12.tif"
    tifffile.imwrite(packed, twelve, photometric="rgb", bitspersample=12)
    with open_slide(packed) as slide:
        assert slide.properties["tiff.bitspersample"] == "12"
    plain = tmp_path / "uint16-holding-12-bit.tif"  # BitsPerSample 16, values up to 4095
    tifffile.imwrite(plain, twelve, photometric="rgb")
    for path in (packed, plain):
        got = _read(path)
        assert np.abs(got.astype(int) - rgb).max() <= 1, path.name
    full = tmp_path / "sixteen.tif"  # real 16-bit data keeps the full range
    tifffile.imwrite(full, rgb.astype(np.uint16) * 257, photometric="rgb")
    assert np.array_equal(_read(full), rgb)


def test_four_bit_grey_is_scaled_by_bits_per_sample(tmp_path: Path) -> None:
    path = tmp_path / "four-bit.tif"
    tifffile.imwrite(path, (np.arange(256).reshape(16, 16) % 16).astype(np.uint8), bitspersample=4)
    assert _read(path)[0, :, 0].tolist() == [17 * v for v in range(16)]


def test_min_is_white_grey_is_inverted(tmp_path: Path) -> None:
    grey = np.zeros((16, 16), np.uint8)
    grey[4:12, 4:12] = 200  # dark ink on white in a min-is-white file
    path = tmp_path / "miniswhite.tif"
    tifffile.imwrite(path, grey, photometric="miniswhite")
    got = _read(path)
    assert got[0, 0].tolist() == [255, 255, 255] and got[8, 8].tolist() == [55, 55, 55]


# --- huge images: refused or streamed, never decoded whole ----------------------------------------


def _tiled_tiff(path: Path, side: int, *, samples: int = 3, tile: int = 512) -> None:
    """A ``side`` x ``side`` tiled TIFF with no pyramid, every tile the same pre-compressed white one."""
    shape = (tile, tile, samples) if samples > 1 else (tile, tile)
    block = zlib.compress(np.full(shape, 255, np.uint8).tobytes())
    n = (-(-side // tile)) ** 2
    tifffile.imwrite(
        path,
        (block for _ in range(n)),
        shape=(side, side, samples) if samples > 1 else (side, side),
        dtype="uint8",
        tile=(tile, tile),
        photometric="rgb" if samples > 1 else "minisblack",
        compression="zlib",
        bigtiff=True,
        metadata=None,
        resolution=((20000, 1), (20000, 1)),  # 0.5 µm/px: only the size is wrong with it
        resolutionunit="CENTIMETER",
    )


def _striped_grey_tiff(path: Path, side: int, value: int = 250, rows: int = 64) -> None:
    """A ``side`` x ``side`` grey TIFF in zlib strips (no tiles: OpenSlide leaves it to tifffile)."""
    full = zlib.compress(np.full((rows, side), value, np.uint8).tobytes())
    last = zlib.compress(np.full((side - rows * ((side - 1) // rows), side), value, np.uint8).tobytes())
    n = -(-side // rows)
    tifffile.imwrite(
        path,
        (full if i < n - 1 else last for i in range(n)),
        shape=(side, side),
        dtype="uint8",
        rowsperstrip=rows,
        photometric="minisblack",
        compression="zlib",
        metadata=None,
    )


def test_huge_tiled_tiff_without_pyramid_is_refused_at_once(tmp_path: Path) -> None:
    path = tmp_path / "huge.tif"
    _tiled_tiff(path, 200_000)
    assert path.stat().st_size < 200 * 2**20
    t0 = time.perf_counter()
    with pytest.raises(SlideTooLargeError) as info:
        plan_samples(path, sample_id="huge", params={})
    assert time.perf_counter() - t0 < 5.0
    _assert_one_line(info.value, path, "200000x200000 px with no pyramid", "above the limit")


def test_huge_striped_grey_tiff_is_refused_without_decoding(tmp_path: Path) -> None:
    path = tmp_path / "grey30k.tif"
    _striped_grey_tiff(path, 30_000)
    code = f"""
        import resource, time
        from equislide.tiling import open_slide, SlideTooLargeError
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        t0 = time.perf_counter()
        slide = open_slide({str(path)!r}, input_mpp=0.5)
        try:
            slide.thumbnail(max_size=1024)
            reason = None
        except SlideTooLargeError as err:
            reason = str(err)
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        print(json.dumps({{"reason": reason, "type": type(slide).__name__, "mb": (after - before) / 1024,
                          "s": time.perf_counter() - t0}}))
    """
    result = _run_child(code)
    assert result["type"] == "ImageSlide" and result["reason"].startswith("grey30k.tif: 30000x30000 px")
    assert result["s"] < 5.0
    assert result["mb"] < 100  # decoded whole it would be 900 MB of grey and 2.7 GB of RGB


def test_large_striped_tiff_thumbnail_streams_in_bounded_memory(tmp_path: Path) -> None:
    path = tmp_path / "grey8k.tif"
    _striped_grey_tiff(path, 8000, value=200)
    code = f"""
        import resource, time
        from equislide.tiling import open_slide
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        t0 = time.perf_counter()
        with open_slide({str(path)!r}) as slide:
            lazy = slide._rgb is None
            thumb, ds = slide.thumbnail(max_size=500)
            region = slide.read_region((7990, 7990), 0, (20, 20))
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        values = sorted(set(thumb.ravel().tolist()))
        print(json.dumps({{"lazy": lazy, "shape": list(thumb.shape), "values": values,
                          "edge": [int(region[0, 0, 0]), int(region[-1, -1, 0])], "ds": ds,
                          "mb": (after - before) / 1024, "s": time.perf_counter() - t0}}))
    """
    result = _run_child(code)
    assert result["lazy"] and result["shape"] == [500, 500, 3] and result["values"] == [200]
    assert result["edge"] == [200, 255] and result["ds"] == 16.0  # white outside the image
    assert result["mb"] < 120, result  # whole: 64 MB grey + 192 MB RGB
    assert result["s"] < 60, result


def _run_child(code: str) -> dict:
    """Run ``code`` in a fresh interpreter (its peak RSS is its own) and parse its JSON line."""
    proc = subprocess.run(
        [sys.executable, "-c", "import json\n" + textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_lazy_reads_match_the_whole_decode(tmp_path: Path, monkeypatch) -> None:
    """The region-by-region path gives the very pixels of the whole decode (RGB, CMYK, 12-bit)."""
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (300, 410, 3), dtype=np.uint8)
    files = {
        "rgb.tif": (rgb, {"photometric": "rgb", "tile": (64, 64)}),
        "cmyk.tif": (
            255 - np.concatenate([rgb, np.zeros_like(rgb[..., :1])], -1),
            {"photometric": "separated", "rowsperstrip": 7},
        ),
        "twelve.tif": (
            rgb.astype(np.uint16) * 16,
            {"photometric": "rgb", "bitspersample": 12, "rowsperstrip": 7},
        ),
    }
    for name, (data, kwargs) in files.items():
        path = tmp_path / name
        tifffile.imwrite(path, data, **kwargs)
        with ImageSlide(path) as eager:
            assert eager._rgb is not None
            whole = eager.read_region((-5, -3), 0, (420, 310))
            thumb = eager.thumbnail(max_size=100)[0]
        monkeypatch.setattr(image_slide_module, "EAGER_PIXELS", 1000)
        with ImageSlide(path) as lazy:
            assert lazy._rgb is None
            assert np.array_equal(lazy.read_region((-5, -3), 0, (420, 310)), whole), name
            assert np.array_equal(lazy.read_region((100, 50), 0, (33, 77)), whole[53:130, 105:138]), name
            assert np.array_equal(lazy.thumbnail(max_size=100)[0], thumb), name
        monkeypatch.undo()


def test_lazy_tiff_in_one_giant_strip_is_refused(tmp_path: Path, monkeypatch) -> None:
    path = tmp_path / "one-strip.tif"
    tifffile.imwrite(path, np.zeros((400, 400), np.uint8), rowsperstrip=400)
    monkeypatch.setattr(image_slide_module, "EAGER_PIXELS", 1000)
    monkeypatch.setattr(image_slide_module, "MAX_CHUNK_BYTES", 10_000)
    with pytest.raises(SlideTooLargeError) as info:
        open_slide(path)
    _assert_one_line(info.value, path, "strips of", "save it as a tiled TIFF")


def test_too_many_tiles_refused_before_reading_them(tmp_path: Path) -> None:
    path = tmp_path / "many.tif"
    tifffile.imwrite(
        path,
        _he(600, 800),
        photometric="rgb",
        resolution=((40000, 1), (40000, 1)),
        resolutionunit="CENTIMETER",
    )  # 0.25 µm/px
    plan = plan_samples(path, sample_id="many", params={}, mpp=0.25, tile=64, halo=0, tma="no")
    n = plan.todo[0].grid.n_tiles
    with pytest.raises(SlideTooLargeError) as info:
        plan_samples(path, sample_id="many", params={}, mpp=0.25, tile=64, halo=0, tma="no", max_tiles=n - 1)
    _assert_one_line(info.value, path, f"planned {n} tiles at 0.25 µm/px", f"limit of {n - 1} per slide")


def test_generic_tiled_tiff_goes_through_openslide(tmp_path: Path) -> None:
    """The huge-tiff test exercises OpenSlide's reader, where the limit used to be missing."""
    path = tmp_path / "small-tiled.tif"
    _tiled_tiff(path, 1024)
    with open_slide(path) as slide:
        assert isinstance(slide, OpenSlideSlide) and slide.mpp == pytest.approx((0.5, 0.5))
