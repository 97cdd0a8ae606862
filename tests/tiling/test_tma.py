"""TMA dearraying on synthetic masks: discs on a (rotated) grid, missing cores, noise blobs."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from equislide.tiling import Core, core_name, find_cores, is_tma, open_slide, tissue_mask


def _synth(
    n_rows: int,
    n_cols: int,
    degrees: float,
    missing: set[tuple[int, int]] = frozenset(),
    *,
    pitch: float = 60.0,
    radius: float = 22.0,
    shape: tuple[int, int] = (640, 760),
    noise_blobs: int = 12,
    seed: int = 0,
) -> tuple[np.ndarray, dict[str, tuple[float, float]]]:
    """Mask with discs on a grid rotated by ``degrees`` (counter-clockwise as displayed).

    Returns the mask and the true (x, y) centre of each present core by name.
    """
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    mask = np.zeros(shape, dtype=bool)
    truth: dict[str, tuple[float, float]] = {}
    theta = math.radians(-degrees)  # y points down: a displayed CCW turn is negative in (x, y)
    cx, cy = shape[1] / 2, shape[0] / 2
    for row in range(n_rows):
        for col in range(n_cols):
            if (row, col) in missing:
                continue
            gx, gy = (col - (n_cols - 1) / 2) * pitch, (row - (n_rows - 1) / 2) * pitch
            x = cx + gx * math.cos(theta) - gy * math.sin(theta) + rng.normal(0, 1.5)
            y = cy + gx * math.sin(theta) + gy * math.cos(theta) + rng.normal(0, 1.5)
            r = radius * rng.uniform(0.85, 1.1)
            mask |= (xx - x) ** 2 + (yy - y) ** 2 <= r * r
            truth[core_name(row, col)] = (x, y)
    for _ in range(noise_blobs):
        x, y = rng.integers(0, shape[1] - 4), rng.integers(0, shape[0] - 4)
        mask[y : y + 3, x : x + 3] = True
    return mask, truth


def _check_names(cores: list[Core], truth: dict[str, tuple[float, float]], *, tol_px: float = 3.0) -> None:
    assert sorted(c.name for c in cores) == sorted(truth)
    for core in cores:
        tx, ty = truth[core.name]
        assert math.hypot(core.centroid[0] - tx, core.centroid[1] - ty) < tol_px, core
        x0, y0, x1, y1 = core.bbox
        assert x0 <= core.centroid[0] <= x1 and y0 <= core.centroid[1] <= y1
        assert core.name == core_name(core.row, core.col)


@pytest.mark.parametrize("degrees", [0.0, 3.0, -3.0, 6.0])
def test_rotated_grid_with_missing_cores(degrees: float) -> None:
    missing = {(0, 0), (5, 7), (2, 3), (3, 4), (4, 0)}  # two corners, middle, an edge
    mask, truth = _synth(6, 8, degrees, missing)
    cores = find_cores(mask, mpp=None)
    _check_names(cores, truth)
    assert "A1" not in {c.name for c in cores} and "A2" in {c.name for c in cores}
    assert is_tma(mask, None)


def test_names_with_mpp_and_size_filter() -> None:
    mask, truth = _synth(4, 5, 3.0, {(1, 1)}, noise_blobs=30)
    mask[10:30, 10:400] = True  # a long thin strip of debris: not a core
    cores = find_cores(mask, mpp=20.0)  # discs of ~880 µm diameter
    _check_names(cores, truth)
    assert cores == sorted(cores, key=lambda c: (c.row, c.col))
    assert [c.name for c in cores][:3] == ["A1", "A2", "A3"]


def test_labels_point_at_components() -> None:
    from skimage.measure import label

    mask, _ = _synth(3, 3, 0.0, noise_blobs=0)
    labels = label(mask, connectivity=2)
    for core in find_cores(mask, mpp=None):
        assert (labels == core.label).sum() == core.area and core.labels == (core.label,)


def test_single_core_is_one_sample() -> None:
    yy, xx = np.mgrid[:200, :200]
    mask = (xx - 90) ** 2 + (yy - 110) ** 2 < 60**2
    cores = find_cores(mask, mpp=None)
    assert len(cores) == 1 and cores[0].name == "A1"
    assert cores[0].centroid == pytest.approx((90, 110), abs=0.5)
    assert not is_tma(mask, None)


def test_not_a_tma() -> None:
    assert find_cores(np.zeros((50, 50), bool), mpp=None) == []
    assert not is_tma(np.zeros((50, 50), bool), None)
    yy, xx = np.mgrid[:400, :600]
    section = ((xx - 300) / 250) ** 2 + ((yy - 200) / 150) ** 2 < 1  # one large section
    section |= (xx - 40) ** 2 + (yy - 30) ** 2 < 100  # plus a small fragment
    assert not is_tma(section, None)
    sy, sx = np.mgrid[:600, :600]
    for seed in range(10):  # round blobs scattered at random, not on a grid
        rng = np.random.default_rng(seed)
        scattered = np.zeros((600, 600), bool)
        for x, y in rng.uniform(50, 550, size=(12, 2)):
            scattered |= (sx - x) ** 2 + (sy - y) ** 2 < 15**2
        assert not is_tma(scattered, None), seed


def test_core_name() -> None:
    assert core_name(0, 0) == "A1"
    assert core_name(1, 2) == "B3"
    assert core_name(25, 9) == "Z10"
    assert core_name(26, 0) == "AA1"
    with pytest.raises(ValueError):
        core_name(-1, 0)


def test_core_is_frozen() -> None:
    mask, _ = _synth(2, 2, 0.0, noise_blobs=0)
    core = find_cores(mask, mpp=None)[0]
    with pytest.raises(AttributeError):
        core.name = "Z9"  # type: ignore[misc]


def test_real_slides_are_not_tmas(shared_data: Path) -> None:
    for name in ("CMU-1-Small-Region.svs", "TCGA-CR-7395-01A-01-TS1.svs"):
        with open_slide(shared_data / "slides" / name) as slide:
            rgb, _ = slide.thumbnail(max_size=512)
        assert not is_tma(tissue_mask(rgb, mpp=None), None)


def test_tma_image_end_to_end(shared_data: Path) -> None:
    """Real H&E discs pasted on white glass in a 3-degree-rotated 4 x 5 grid, two cores missing."""
    with open_slide(shared_data / "images" / "he-carcinoma-1000.png") as slide:
        he = slide.read_region((0, 0), 0, (1000, 1000))
    rgb = np.full((520, 640, 3), 250, np.uint8)
    yy, xx = np.mgrid[:520, :640]
    truth: dict[str, tuple[float, float]] = {}
    theta = math.radians(-3.0)
    for row in range(4):
        for col in range(5):
            if (row, col) in {(0, 4), (2, 2)}:
                continue
            gx, gy = (col - 2) * 110.0, (row - 1.5) * 110.0
            x = 320 + gx * math.cos(theta) - gy * math.sin(theta)
            y = 260 + gx * math.sin(theta) + gy * math.cos(theta)
            disc = (xx - x) ** 2 + (yy - y) ** 2 < 40**2
            rgb[disc] = he[(yy[disc] + 150 * row) % 1000, (xx[disc] + 130 * col) % 1000]
            truth[core_name(row, col)] = (x, y)
    mask = tissue_mask(rgb, mpp=10.0)  # 800 µm cores at 10 µm/px
    cores = find_cores(mask, mpp=10.0)
    _check_names(cores, truth, tol_px=25)  # tissue is not centred in pale cores; pitch is 110 px
    assert any(len(core.labels) > 1 for core in cores)  # lumens split some cores; fragments rejoin
    assert is_tma(mask, 10.0)


def test_split_core_is_one_core() -> None:
    mask, truth = _synth(3, 4, 3.0, noise_blobs=0)
    x, y = truth["B2"]
    mask[int(y) - 1 : int(y) + 2, int(x) - 30 : int(x) + 30] = False  # cut B2 in two halves
    cores = {c.name: c for c in find_cores(mask, mpp=None)}
    assert sorted(cores) == sorted(truth)
    b2 = cores["B2"]
    assert len(b2.labels) == 2 and b2.label in b2.labels
    assert math.hypot(b2.centroid[0] - x, b2.centroid[1] - y) < 3
    assert b2.area > 0.9 * cores["B3"].area


@pytest.mark.parametrize("seed", [0, 3])
def test_phantom_tma_end_to_end(tmp_path: Path, seed: int) -> None:
    """Slide -> thumbnail -> tissue mask -> cores on the synthetic TMA: every name as written."""
    from equislide.tiling import write_phantom

    info = write_phantom(tmp_path / "tma.tiff", cores=16, seed=seed, mpp=4.0)
    with open_slide(tmp_path / "tma.tiff") as slide:
        rgb, downsample = slide.thumbnail(max_size=1024)
        mpp = slide.mpp[0] * downsample
    mask = tissue_mask(rgb, mpp=mpp)
    assert is_tma(mask, mpp)
    cores = find_cores(mask, mpp=mpp)
    present = {c.name for c in info.cores if c.present}
    assert {c.name for c in cores} == present
    centres = [(c.l0_x / downsample, c.l0_y / downsample) for c in info.cores]
    pitch = min(math.dist(a, b) for a in centres for b in centres if a != b)  # thumbnail px
    for core in cores:
        truth = info.core(core.name)
        # Pale fat is not in the mask, so a centroid may sit off the core's centre, never a pitch off.
        assert math.dist(core.centroid, (truth.l0_x / downsample, truth.l0_y / downsample)) < 0.25 * pitch


@pytest.mark.parametrize("seed", [0, 1])
def test_large_phantom_tma_with_fat_cut_cores(tmp_path: Path, seed: int) -> None:
    """64 cores at ~6 µm per thumbnail pixel: fat cuts cores into crescents and islands, names still hold.

    Regression: the lattice was once fitted on the fragments' own centroids, read a pitch 20 % short,
    opened a ninth column and called the array no TMA at all.
    """
    from equislide.tiling import write_phantom

    info = write_phantom(
        tmp_path / "tma64.tiff", cores=64, seed=seed, mpp=4.0, core_diameter_um=600.0, missing=0
    )
    with open_slide(tmp_path / "tma64.tiff") as slide:
        rgb, downsample = slide.thumbnail(max_size=1024)
        mpp = slide.mpp[0] * downsample
    assert mpp > 5.0  # the coarse thumbnail the bug needs
    mask = tissue_mask(rgb, mpp=mpp)
    assert is_tma(mask, mpp)
    cores = find_cores(mask, mpp=mpp)
    assert sorted(c.name for c in cores) == sorted(c.name for c in info.cores)
    for core in cores:
        truth = info.core(core.name)
        diameter = 600.0 / mpp
        assert math.dist(core.centroid, (truth.l0_x / downsample, truth.l0_y / downsample)) < 0.35 * diameter
