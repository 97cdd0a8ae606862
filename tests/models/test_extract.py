"""Feature extraction on tile batches: shapes, halo cropping, float16 safety, equivariance, seeds."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from equislide.models import (
    NORMALISATION,
    FeatureRangeError,
    ModelConfigError,
    extract_features,
    prepare_backbone,
    save_checkpoint,
    to_float16,
)

SMALL = {"width": 4}


def _tiles(n: int = 2, side: int = 32, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, side, side, 3), dtype=np.uint8)


class _BlockMean(nn.Module):
    """A 'backbone' with no receptive field beyond its stride: features = s x s block means."""

    feature_strides = (1, 2, 4, 8)
    feature_channels = (3, 3, 3, 3)

    def features(self, x: torch.Tensor, layer: int) -> torch.Tensor:
        s = self.feature_strides[layer - 1]
        return F.avg_pool2d(x, s) if s > 1 else x


@pytest.mark.parametrize(
    ("name", "layer", "stride", "halo", "side"),
    [
        ("srenet18", 1, 1, 8, 32),
        ("srenet18", 4, 8, 8, 32),
        ("resnet18", 2, 4, 8, 32),
        ("resnet18", 4, 16, 16, 64),
    ],
)
def test_shapes_and_strides(name, layer, stride, halo, side):
    tiles = _tiles(3, side)
    model, info = prepare_backbone(
        name, layer=layer, calibration_tiles=tiles, device="cpu", model_kwargs=SMALL
    )
    f = extract_features(model, tiles, layer=layer, halo=halo, device="cpu")
    interior = (side - 2 * halo) // stride
    assert f.dtype == np.float32
    assert f.shape == (3, 4 * 2 ** (layer - 1), interior, interior)
    assert info["stride"] == stride and info["layer"] == layer and info["device"] == "cpu"
    assert info["weights_random"] is True and info["calibrated"] is True and info["calibration_tiles"] == 3
    assert info["normalisation"] == NORMALISATION
    assert np.isfinite(f).all()


def test_halo_crop_indexes_the_interior_of_a_larger_context():
    rng = np.random.default_rng(1)
    image = rng.integers(0, 256, (64, 96, 3), dtype=np.uint8)
    tile, halo = 16, 8
    coords = [(8, 8), (24, 8), (40, 24), (72, 40)]  # interior top-left (l_x, l_y)
    tiles = np.stack([image[y - halo : y + tile + halo, x - halo : x + tile + halo] for x, y in coords])
    full = (torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255 - 0.5) / 0.25
    for layer, s in ((1, 1), (2, 2), (4, 8)):
        f = extract_features(_BlockMean(), tiles, layer=layer, halo=halo, device="cpu")
        ref = _BlockMean().features(full, layer)[0].numpy()
        for i, (x, y) in enumerate(coords):
            want = ref[:, y // s : (y + tile) // s, x // s : (x + tile) // s]
            np.testing.assert_allclose(f[i], want, rtol=0, atol=1e-6)


def test_halo_crop_matches_manual_crop_of_uncropped_features():
    tiles = _tiles(2, 32)
    model, _ = prepare_backbone(
        "srenet18", layer=2, calibration_tiles=tiles, device="cpu", model_kwargs=SMALL
    )
    cropped = extract_features(model, tiles, layer=2, halo=8, device="cpu")
    full = extract_features(model, tiles, layer=2, halo=0, device="cpu")
    np.testing.assert_array_equal(cropped, full[:, :, 4:12, 4:12])


def test_halo_not_divisible_by_stride_is_refused():
    model, _ = prepare_backbone("srenet18", layer=4, calibration_tiles=_tiles(1), model_kwargs=SMALL)
    with pytest.raises(ModelConfigError, match="multiples of the layer-4 stride 8"):
        extract_features(model, _tiles(1, 36), layer=4, halo=6, device="cpu")
    with pytest.raises(ValueError, match="uint8"):
        extract_features(model, _tiles(1).astype(np.float32), layer=4, halo=8, device="cpu")


def test_float16_is_finite_after_calibration_and_overflow_is_refused():
    tiles = _tiles(4, 32)
    model, info = prepare_backbone(
        "srenet18", layer=4, calibration_tiles=tiles, device="cpu", model_kwargs=SMALL
    )
    f16 = to_float16(extract_features(model, tiles, layer=4, halo=8, device="cpu"))
    assert f16.dtype == np.float16 and np.isfinite(f16).all()
    assert float(np.abs(f16).max()) < 100  # BatchNorm-normalised scale, far from 65504
    with pytest.raises(FeatureRangeError, match="overflow float16"):
        to_float16(np.array([1.0, 1e7], np.float32))
    with pytest.raises(FeatureRangeError, match="NaN or inf"):
        to_float16(np.array([1.0, np.inf], np.float32))


def test_random_weights_need_calibration_tiles():
    with pytest.raises(ModelConfigError, match="calibration_tiles"):
        prepare_backbone("srenet18", layer=2, model_kwargs=SMALL)


def test_rot90_of_tiles_rotates_features_exactly():
    tiles = _tiles(2, 32, seed=3)
    model, _ = prepare_backbone(
        "srenet18", layer=4, calibration_tiles=tiles, device="cpu", model_kwargs=SMALL
    )
    f = extract_features(model, tiles, layer=4, halo=8, device="cpu")
    for k in (1, 2, 3):
        fr = extract_features(model, np.rot90(tiles, k, axes=(1, 2)).copy(), layer=4, halo=8, device="cpu")
        np.testing.assert_allclose(fr, np.rot90(f, k, axes=(2, 3)), rtol=1e-4, atol=1e-4 * np.abs(f).max())


def test_seed_is_deterministic_and_global_rng_untouched():
    tiles = _tiles(2, 32)
    state = torch.random.get_rng_state()
    a, ia = prepare_backbone("resnet18", layer=3, calibration_tiles=tiles, seed=5, model_kwargs=SMALL)
    assert torch.equal(torch.random.get_rng_state(), state)
    b, _ = prepare_backbone("resnet18", layer=3, calibration_tiles=tiles, seed=5, model_kwargs=SMALL)
    c, _ = prepare_backbone("resnet18", layer=3, calibration_tiles=tiles, seed=6, model_kwargs=SMALL)
    fa, fb, fc = (extract_features(m, tiles, layer=3, halo=8, device="cpu") for m in (a, b, c))
    np.testing.assert_array_equal(fa, fb)
    assert not np.allclose(fa, fc)
    assert ia["weights"] == "random(seed=5)" and ia["weights_sha256"] is None


def test_loaded_weights_are_recorded_by_sha256_and_not_recalibrated(tmp_path):
    tiles = _tiles(2, 32)
    trained, _ = prepare_backbone("resnet18", layer=2, calibration_tiles=tiles, model_kwargs=SMALL)
    path = save_checkpoint(trained, tmp_path / "r.safetensors")
    model, info = prepare_backbone("resnet18", weights=path, layer=2, device="cpu")
    assert info["weights_random"] is False and info["calibrated"] is False
    assert info["weights"] == f"sha256:{info['weights_sha256']}" and len(info["weights_sha256"]) == 64
    np.testing.assert_array_equal(
        extract_features(model, tiles, layer=2, halo=8, device="cpu"),
        extract_features(trained, tiles, layer=2, halo=8, device="cpu"),
    )
    with pytest.raises(ModelConfigError, match="not 'srenet18'"):
        prepare_backbone("srenet18", weights=path, layer=2)


def test_auto_device_resolves(monkeypatch):
    from equislide.models.extract import resolve_device

    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device("cpu").type == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ModelConfigError, match="CUDA is not available"):
        resolve_device("cuda")
