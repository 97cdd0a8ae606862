"""The mpp rules (``tiling/_mpp.py``, README "Inputs and resolution") on generated files.

Aperio-style SVS files (a tiled TIFF whose description OpenSlide parses as Aperio's) carry the
hostile ``MPP =`` values; plain TIFF / PNG files their resolution tags.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

from equislide.specs import TilingSpec
from equislide.stages.tile import tile_slide
from equislide.storage import read_sample_meta
from equislide.tiling import (
    MAX_TILES,
    NoUsableMppError,
    OpenSlideSlide,
    open_slide,
    plan_samples,
)
from equislide.tiling._mpp import check_user_mpp, resolve_mpp


def _he(h: int = 512, w: int = 512) -> np.ndarray:
    rgb = np.full((h, w, 3), 235, np.uint8)
    rgb[h // 4 : 3 * h // 4, w // 4 : 3 * w // 4] = (150, 60, 140)
    return rgb


def _aperio(path: Path, mpp: str | None, *, app_mag: str | None = "20", size: int = 512) -> Path:
    fields = [f"AppMag = {app_mag}"] if app_mag is not None else []
    if mpp is not None:
        fields.append(f"MPP = {mpp}")
    desc = f"Aperio Image Library v10.0.50\r\n{size}x{size} [0,0 {size}x{size}] (256x256) JPEG/RGB Q=70|"
    tifffile.imwrite(
        path,
        _he(size, size),
        tile=(256, 256),
        photometric="rgb",
        compression="jpeg",
        description=desc + "|".join(fields),
        metadata=None,
    )
    return path


def _tiff_resolution(path: Path, per_cm: tuple[int, int], shape: tuple[int, int] = (300, 400)) -> Path:
    tifffile.imwrite(
        path, _he(*shape), photometric="rgb", resolution=(per_cm, per_cm), resolutionunit="CENTIMETER"
    )
    return path


def _refused(path: Path, *words: str) -> str:
    with pytest.raises(NoUsableMppError) as info:
        plan_samples(path, sample_id=path.stem, params={})
    text = str(info.value)
    assert "\n" not in text and text.startswith(f"{path.name}: no usable resolution: "), text
    assert "--input-mpp" in text and "--native-pixels" in text
    for w in words:
        assert w in text, text
    return text


@pytest.mark.parametrize(
    ("value", "words"),
    [
        ("nan", "metadata mpp nan µm/px is not a positive number"),
        ("-0.5", "metadata mpp -0.5 µm/px is not a positive number"),
        ("0", "metadata mpp 0.0 µm/px is not a positive number"),
        ("inf", "metadata mpp inf µm/px is not a positive number"),
        ("abc", "'abc' is not a number"),
        ("1e-300", "metadata mpp 1e-300 µm/px is outside the plausible 0.05-20"),
        ("40", "metadata mpp 40 µm/px is outside the plausible"),  # MPP 40 on a 20x slide
        ("2.0", "metadata mpp 2 µm/px contradicts the 20x objective power (~0.5 µm/px expected)"),
    ],
)
def test_unusable_aperio_mpp_is_refused_with_the_reason(tmp_path: Path, value: str, words: str) -> None:
    path = _aperio(tmp_path / f"mpp-{value}.svs", value)
    with open_slide(path) as slide:
        assert isinstance(slide, OpenSlideSlide) and slide.properties["openslide.vendor"] == "aperio"
        assert slide.mpp is None and slide.mpp_source is None
    _refused(path, words)


def test_usable_aperio_mpp_and_objective_agree(tmp_path: Path) -> None:
    with open_slide(_aperio(tmp_path / "ok.svs", "0.4990")) as slide:
        assert slide.mpp == pytest.approx((0.499, 0.499)) and slide.mpp_source == "metadata"
        assert slide.mpp_problem is None and not slide.mpp_warnings


@pytest.mark.parametrize(
    ("name", "per_cm", "words"),
    [
        ("res-zero.tif", (0, 1), "TIFF resolution 0 x 0 pixels per cm is not a positive number"),
        ("res-1e9.tif", (10**9, 1), "metadata mpp 1e-05 µm/px is outside the plausible"),
        ("res-0-over-0.tif", None, "TIFF resolution 0/0 x 0/0 pixels per cm is not a number"),
    ],
)
def test_unusable_tiff_resolution_is_refused(tmp_path: Path, name: str, per_cm, words: str) -> None:
    path = tmp_path / name
    if per_cm is None:  # tifffile will not write 0/0: patch the rationals of a written file
        _tiff_resolution(path, (123457, 1))
        data = path.read_bytes()
        rational = (123457).to_bytes(4, "little") + (1).to_bytes(4, "little")
        assert data.count(rational) == 2
        path.write_bytes(data.replace(rational, bytes(8)))
    else:
        _tiff_resolution(path, per_cm)
    _refused(path, words)


def test_png_of_a_millionth_dpi_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "tiny-dpi.png"
    Image.fromarray(_he(300, 400)).save(path, dpi=(1e-6, 1e-6))
    _refused(path, "dpi is not a positive number")


def test_plausible_mpp_that_makes_the_slide_larger_than_glass(tmp_path: Path) -> None:
    # 15 µm/px is in range, but 9000 px of it is 135 mm: a unit mix-up, not a slide.
    path = _tiff_resolution(tmp_path / "wide.tif", (667, 1), shape=(64, 9000))
    _refused(path, "makes the 9000x64 px image 135x1 mm, larger than a glass slide (100 mm)")


def test_input_mpp_fills_in_and_says_what_it_replaced(tmp_path: Path) -> None:
    bare = tmp_path / "bare.png"
    Image.fromarray(_he(300, 400)).save(bare)
    (result,) = tile_slide(bare, tmp_path / "out", input_mpp=0.5, tma="no")
    meta = read_sample_meta(result.store)
    assert meta["mpp_source"] == "input_mpp" and meta["source_mpp"] == 0.5 and not result.warnings
    garbage = _aperio(tmp_path / "nan.svs", "nan")
    (result,) = tile_slide(garbage, tmp_path / "out", input_mpp=0.5, tma="no")
    assert read_sample_meta(result.store)["mpp_source"] == "input_mpp"
    assert result.warnings == [
        "metadata mpp nan µm/px is not a positive number: --input-mpp 0.5 used instead"
    ]


def test_input_mpp_contradicting_metadata_warns_and_keeps_the_metadata(tmp_path: Path) -> None:
    path = _aperio(tmp_path / "cmu-like.svs", "0.4990")
    (result,) = tile_slide(path, tmp_path / "out", input_mpp=1.25, tma="no")
    meta = read_sample_meta(result.store)
    assert meta["mpp_source"] == "metadata" and meta["source_mpp"] == pytest.approx(0.499)
    (warning,) = result.warnings
    assert warning.startswith("--input-mpp 1.25 contradicts the metadata's 0.499 µm/px: the metadata is used")
    assert meta["warnings"] == result.warnings
    (agrees,) = tile_slide(path, tmp_path / "agree", input_mpp=0.5, tma="no")  # 0.2 % off: silent
    assert not agrees.warnings


def test_force_mpp_overrides_and_warns(tmp_path: Path) -> None:
    path = _aperio(tmp_path / "cmu-like.svs", "0.4990")
    (result,) = tile_slide(path, tmp_path / "out", force_mpp=1.25, tma="no")
    meta = read_sample_meta(result.store)
    assert meta["mpp_source"] == "override" and meta["source_mpp"] == 1.25
    assert result.warnings == ["--force-mpp 1.25 replaces the metadata's 0.499 µm/px"]
    (unusable,) = tile_slide(_aperio(tmp_path / "m40.svs", "40"), tmp_path / "out", force_mpp=0.5, tma="no")
    assert read_sample_meta(unusable.store)["mpp_source"] == "override" and not unusable.warnings


def test_native_pixels_only_when_asked(tmp_path: Path) -> None:
    path = _aperio(tmp_path / "m40.svs", "40")
    _refused(path, "40 µm/px")
    (result,) = tile_slide(path, tmp_path / "out", native_pixels=True, tma="no", tile=128, halo=0)
    meta = read_sample_meta(result.store)
    assert meta["native_pixels"] is True and meta["mpp"] is None and meta["l0_per_l"] == [1.0, 1.0]
    assert "native level-0 pixels" in result.warnings[0] and "40 µm/px" in result.warnings[0]
    # At native pixels the 512 px image is at most 4 x 4 tiles of 128; at a believed 40 µm/px and
    # 2.5 µm/px analysis it would have been 8192 px across, up to 64 x 64 tiles.
    assert max(meta["grid_shape"]) <= 4 and result.n_tiles <= 16


def test_rules_at_the_boundaries() -> None:
    dims = (1000, 1000)
    assert resolve_mpp((0.25, 0.25), dimensions=dims, objective_power=40).mpp == (0.25, 0.25)
    assert resolve_mpp((0.5, 0.5), dimensions=dims, objective_power=40).mpp == (0.5, 0.5)  # factor 2
    assert "contradicts the 40x" in resolve_mpp((0.51, 0.51), dimensions=dims, objective_power=40).problem
    assert resolve_mpp((0.05, 0.05), dimensions=dims).mpp is not None
    assert resolve_mpp((20.0, 20.0), dimensions=dims).mpp is not None
    assert "outside" in resolve_mpp((20.5, 20.5), dimensions=dims).problem
    assert "differ more than" in resolve_mpp((0.25, 0.5), dimensions=dims).problem
    assert resolve_mpp(None, dimensions=dims).problem == "no resolution in the metadata"
    with pytest.raises(ValueError, match="not both"):
        resolve_mpp(None, dimensions=dims, input_mpp=0.5, force_mpp=0.5)
    assert check_user_mpp(0.5, "--input-mpp") is None
    assert check_user_mpp(0.0, "--input-mpp") == "--input-mpp 0.0 must be a positive number of µm per pixel"
    assert (
        check_user_mpp(40.0, "--force-mpp")
        == "--force-mpp 40 is outside the plausible 0.05-20.0 µm per pixel"
    )


def test_tiling_spec_keys() -> None:
    base = TilingSpec()
    assert "force_mpp" not in base.params() and "input_mpp_rule" not in base.params()
    assert TilingSpec(force_mpp=0.5).key() != TilingSpec(input_mpp=0.5).key() != base.key()
    # Whether a slide is tiled, not what its tiles hold: the stores stay reusable.
    assert TilingSpec(native_pixels=True, max_tiles=10).key() == base.key()
    assert base.max_tiles == MAX_TILES
    with pytest.raises(ValueError, match="not both"):
        TilingSpec(input_mpp=0.5, force_mpp=0.5)
    with pytest.raises(ValueError, match="max_tiles"):
        TilingSpec(max_tiles=0)
