"""The synthetic H&E TMA phantom: a real pyramidal TIFF that OpenSlide reads, with matching ground truth."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import numpy as np
import openslide
import pytest
import tifffile
from skimage.color import rgb2hed, rgb2hsv

from equislide.tiling import LABEL_NAMES, read_phantom_info, write_phantom

MPP = 2.0  # coarse pixels keep the tests fast; the textures are specified in µm


@pytest.fixture(scope="module")
def phantom(tmp_path_factory):
    out = tmp_path_factory.mktemp("phantom") / "tma.tiff"
    info = write_phantom(out, cores=6, seed=7, mpp=MPP)
    with openslide.OpenSlide(out) as slide:
        rgb = np.asarray(slide.read_region((0, 0), 0, slide.dimensions).convert("RGB"))
    labels = tifffile.imread(info.labels_path)
    d = info.label_downsample
    sampled = rgb[d // 2 :: d, d // 2 :: d][: labels.shape[0], : labels.shape[1]]  # aligned with labels
    return info, rgb, labels, sampled


def _sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def test_openslide_reads_a_generic_pyramid_with_mpp(phantom):
    info, rgb, _, _ = phantom
    with openslide.OpenSlide(info.image_path) as slide:
        assert slide.properties["openslide.vendor"] == "generic-tiff"
        assert slide.level_count == info.level_count >= 3
        assert slide.dimensions == info.l0_size == (rgb.shape[1], rgb.shape[0])
        assert [round(d) for d in slide.level_downsamples[:3]] == [1, 2, 4]
        assert float(slide.properties["openslide.mpp-x"]) == pytest.approx(MPP, rel=1e-6)
        assert float(slide.properties["openslide.mpp-y"]) == pytest.approx(MPP, rel=1e-6)
        assert slide.properties["tiff.ResolutionUnit"] == "centimeter"
        assert slide.properties["openslide.level[0].tile-width"] == "256"
    with tifffile.TiffFile(info.image_path) as tif:
        assert all(p.is_tiled and p.compression == tifffile.COMPRESSION.JPEG for p in tif.pages)


def test_labels_match_image_and_json(phantom):
    info, rgb, labels, _ = phantom
    d = info.label_downsample
    assert labels.dtype == np.uint8
    assert labels.shape == (-(-rgb.shape[0] // d), -(-rgb.shape[1] // d))
    assert set(np.unique(labels)) == set(range(len(LABEL_NAMES)))  # every class present, nothing else
    assert read_phantom_info(info.json_path) == info
    raw = json.loads(info.json_path.read_text())
    assert raw["label_names"] == {
        "0": "background",
        "1": "glands",
        "2": "dense_nuclei",
        "3": "stroma",
        "4": "fat",
    }
    assert raw["grid"] == {"rows": 2, "cols": 3} and raw["seed"] == 7 and raw["mpp"] == MPP
    assert [c["name"] for c in raw["cores"]] == ["A1", "A2", "A3", "B1", "B2", "B3"]
    assert 0.25 * 4.0 <= abs(raw["array_angle_deg"]) <= 4.0
    assert sum(not c.present for c in info.cores) == 1


def test_background_is_glass_and_tissue_is_he(phantom):
    _, _, labels, rgb = phantom
    glass = rgb[labels == 0].astype(float)
    tissue = rgb[labels > 0]
    assert glass.mean(axis=0).min() > 235 and np.percentile(glass.min(axis=1), 5) > 225
    hsv = rgb2hsv(tissue[None])[0]
    assert hsv[:, 1].mean() > 0.15  # stained, not grey
    hue = hsv[hsv[:, 1] > 0.12, 0]  # hue of stained pixels (white fat and lumina have no stable hue)
    assert hue.size > 0.5 * len(hsv) and ((hue > 0.75) | (hue < 0.03)).mean() > 0.95  # pink-purple
    hed = rgb2hed(rgb)
    mean_h = [hed[..., 0][labels == k].mean() for k in range(5)]
    assert mean_h[2] > mean_h[3] + 0.02 and mean_h[2] > mean_h[4] + 0.02  # dense nuclei most haematoxylin
    grey = rgb.astype(float).mean(axis=-1)
    assert grey[labels == 2].mean() < grey[labels == 3].mean() < grey[labels == 4].mean()
    assert (grey[labels == 1] > 220).mean() > 0.05  # gland lumina are white


def test_cores_are_where_the_json_says(phantom):
    info, rgb, labels, _ = phantom
    d = info.label_downsample
    radius = info.core_diameter_um / 2 / info.mpp
    yy, xx = np.mgrid[: labels.shape[0], : labels.shape[1]] * d + d // 2
    for core in info.cores:
        disk = (xx - core.l0_x) ** 2 + (yy - core.l0_y) ** 2 < (0.8 * radius) ** 2
        if core.present:
            assert (labels[disk] > 0).mean() > 0.9, core.name
        else:
            wide = (xx - core.l0_x) ** 2 + (yy - core.l0_y) ** 2 < (1.1 * radius) ** 2
            assert not labels[wide].any(), core.name
            x0, y0 = int(core.l0_x - radius), int(core.l0_y - radius)
            patch = rgb[max(y0, 0) : y0 + int(2 * radius), max(x0, 0) : x0 + int(2 * radius)]
            assert patch.min() > 225 and patch.std() < 2, core.name  # really empty glass


def test_same_seed_same_bytes_other_seed_differs(tmp_path):
    a = write_phantom(tmp_path / "a" / "p.tiff", cores=4, seed=1, mpp=4.0)
    b = write_phantom(tmp_path / "b" / "p.tiff", cores=4, seed=1, mpp=4.0)
    c = write_phantom(tmp_path / "c" / "p.tiff", cores=4, seed=2, mpp=4.0)
    for name in ("p.tiff", "p.labels.tiff", "p.json"):
        assert _sha(tmp_path / "a" / name) == _sha(tmp_path / "b" / name), name
        assert _sha(tmp_path / "a" / name) != _sha(tmp_path / "c" / name), name
    same = {f.name for f in dataclasses.fields(a)} - {"image_path", "labels_path", "json_path"}
    assert all(getattr(a, k) == getattr(b, k) for k in same)
    assert a.cores != c.cores


def test_bad_arguments_name_the_value(tmp_path):
    with pytest.raises(ValueError, match="cores=0"):
        write_phantom(tmp_path / "x.tiff", cores=0)
    with pytest.raises(ValueError, match="missing=4"):
        write_phantom(tmp_path / "x.tiff", cores=4, missing=4)
    with pytest.raises(ValueError, match="label_downsample=3"):
        write_phantom(tmp_path / "x.tiff", label_downsample=3)
    assert not list(tmp_path.iterdir())


def test_cli_writes_the_phantom(tmp_path, capsys):
    from equislide.cli import main

    out = tmp_path / "cli" / "demo.tiff"
    assert main(["phantom", str(out), "--cores", "4", "--seed", "3", "--mpp", "4"]) == 0
    printed = capsys.readouterr().out
    for path in (out, tmp_path / "cli" / "demo.labels.tiff", tmp_path / "cli" / "demo.json"):
        assert path.is_file() and str(path) in printed
    assert read_phantom_info(tmp_path / "cli" / "demo.json").seed == 3
    assert main(["phantom", str(tmp_path / "bad.tiff"), "--cores", "0"]) == 2


def test_dearraying_finds_the_present_cores_by_name(phantom):
    """Integration with the TMA finder: the phantom's ground-truth grid is what find_cores recovers."""
    from equislide.tiling import find_cores, tissue_mask

    info, _, _, _ = phantom
    with openslide.OpenSlide(info.image_path) as slide:
        level = slide.level_count - 1
        ds = slide.level_downsamples[level]
        thumb = np.asarray(slide.read_region((0, 0), level, slide.level_dimensions[level]).convert("RGB"))
    cores = find_cores(tissue_mask(thumb, mpp=info.mpp * ds), mpp=info.mpp * ds)
    assert sorted(c.name for c in cores) == sorted(c.name for c in info.cores if c.present)
