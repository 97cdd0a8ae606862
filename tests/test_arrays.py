"""The array-module switch: numpy on the host (the code paths every machine runs), cupy on a GPU
(skipped without cupy), and the DLPack hand-off to torch."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from equislide.arrays import array_module, asnumpy, cupy_or_none, is_cupy, like, to_torch
from equislide.models.kmeans import KMeansParams, fit_kmeans
from equislide.storage import stitch_labels

cupy = cupy_or_none()
needs_cupy = pytest.mark.skipif(
    cupy is None, reason="cupy is optional (pip install 'equislide[gpu]') and needs a GPU"
)


def _labels(seed: int = 0):
    rng = np.random.default_rng(seed)
    tile_labels = rng.integers(-1, 5, (6, 4, 4))
    coords = np.array([[x * 8, y * 8] for y in range(2) for x in range(3)]) + 16  # stride 2, 4x4 each
    mask = rng.random((7, 9)) > 0.3
    return tile_labels, coords, mask


def test_numpy_and_host_inputs_select_numpy() -> None:
    assert array_module(np.zeros(2)) is np
    assert array_module([1, 2], None, torch.zeros(2)) is np
    assert not is_cupy(np.zeros(2)) and not is_cupy(torch.zeros(2))


def test_torch_hand_off_shares_host_memory_and_comes_back_as_the_input_kind() -> None:
    a = np.arange(12, dtype=np.float32).reshape(3, 4)
    t = to_torch(a)
    assert isinstance(t, torch.Tensor) and t.data_ptr() == a.ctypes.data
    assert to_torch(t) is t
    back = like(t * 2, a)
    assert isinstance(back, np.ndarray) and np.array_equal(back, a * 2)
    assert like(t, t) is t
    assert np.array_equal(asnumpy(t), a) and asnumpy(a) is a


def test_numpy_stitching_paints_tiles_in_order_later_wins() -> None:
    """The numpy path against a plain reference painter (no mask): k + 1 for cluster k, 0 for -1."""
    tile_labels, coords, _ = _labels()
    coords = coords.copy()
    coords[1] = coords[0] + 2  # an overlap, one feature px off: the later tile wins there
    got = stitch_labels(tile_labels, coords, stride=2, l_origin=(16, 16))
    f_xy = (coords - 16) // 2
    ref = np.zeros((int(f_xy[:, 1].max()) + 4, int(f_xy[:, 0].max()) + 4), np.uint8)
    for lab, (fx, fy) in zip(tile_labels, f_xy, strict=True):
        ref[fy : fy + 4, fx : fx + 4] = np.where(lab >= 0, lab + 1, 0)
    assert got.dtype == np.uint8 and np.array_equal(got, ref)


def test_numpy_predict_equals_the_torch_tensor_path() -> None:
    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(300, 8)).astype(np.float32)
    model = fit_kmeans(vectors, params=KMeansParams(k=3, seed=0, backend="torch", device="cpu"))
    maps = rng.normal(size=(2, 8, 5, 6)).astype(np.float16)
    got = model.predict(maps)
    assert isinstance(got, np.ndarray) and got.shape == (2, 5, 6)
    assert np.array_equal(got, model.predict(torch.from_numpy(maps)).numpy())


@needs_cupy
def test_cupy_stitching_equals_numpy_and_stays_on_the_device() -> None:
    tile_labels, coords, mask = _labels()
    kwargs = dict(stride=2, l_origin=(16, 16), mask_downsample=3.0, mask_origin=(10.0, 12.0))
    ref = stitch_labels(tile_labels, coords, tissue_mask=mask, **kwargs)
    got = stitch_labels(cupy.asarray(tile_labels), coords, tissue_mask=cupy.asarray(mask), **kwargs)
    assert is_cupy(got) and np.array_equal(cupy.asnumpy(got), ref)


@needs_cupy
def test_cupy_predict_and_normalise_hand_off_through_dlpack() -> None:
    from equislide.models.extract import normalise_tiles

    rng = np.random.default_rng(1)
    vectors = rng.normal(size=(300, 8)).astype(np.float32)
    model = fit_kmeans(vectors, params=KMeansParams(k=3, seed=0, backend="torch", device="cpu"))
    maps = rng.normal(size=(2, 8, 5, 6)).astype(np.float32)
    got = model.predict(cupy.asarray(maps))
    assert is_cupy(got) and np.array_equal(cupy.asnumpy(got), model.predict(maps))
    tiles = rng.integers(0, 256, (2, 16, 16, 3), dtype=np.uint8)
    on_gpu = cupy.asarray(tiles)
    x = normalise_tiles(on_gpu, device="cuda")
    assert x.device.type == "cuda" and torch.equal(x.cpu(), normalise_tiles(tiles))
    assert to_torch(on_gpu).data_ptr() == on_gpu.data.ptr  # DLPack: the same device buffer


@needs_cupy
def test_cupy_tile_feature_masks_equal_numpy(shared_data: Path, tmp_path: Path) -> None:
    from equislide import stages

    slide = shared_data / "slides" / "CMU-1-Small-Region.svs"
    if not slide.is_file():
        pytest.skip(f"{slide.name} is not in the shared data")
    [res] = stages.tile_slide(slide, tmp_path / "tiles", mpp=4.0, tile=64, halo=8)
    ref = stages.tile_feature_masks(res.store, 4)
    got = stages.tile_feature_masks(res.store, 4, xp=cupy)
    assert is_cupy(got) and np.array_equal(cupy.asnumpy(got), ref)
