"""Feature precision: resolving ``auto``, autocast in ``extract_features``, and the features' key."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from equislide.models import ModelConfigError, extract_features, prepare_backbone, to_float16
from equislide.models.extract import bf16_native, resolve_precision
from equislide.specs import BackboneRef, FeatureSpec
from equislide.storage import params_hash

SMALL = {"width": 4}


def _tiles(n: int = 2, side: int = 32, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, side, side, 3), dtype=np.uint8)


def test_auto_follows_the_cpus_bf16_units(monkeypatch):
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    assert not bf16_native("cpu") and resolve_precision("auto", "cpu") == "fp32"
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True)
    assert bf16_native("cpu") and resolve_precision("auto", "cpu") == "bf16"
    # An explicit choice is kept whatever the hardware.
    assert resolve_precision("fp32", "cpu") == "fp32" and resolve_precision("bf16", "cpu") == "bf16"


def test_fp16_on_cpu_and_unknown_precisions_are_refused_in_one_line():
    with pytest.raises(ModelConfigError, match="fp16.*GPU") as err:
        resolve_precision("fp16", "cpu")
    assert "\n" not in str(err.value)
    with pytest.raises(ModelConfigError, match="precision='half'"):
        resolve_precision("half", "cpu")
    with pytest.raises(ValueError, match="precision='half'"):
        FeatureSpec(precision="half")


@pytest.mark.parametrize("name", ["srenet18", "resnet18"])
def test_bf16_features_are_float32_close_to_fp32_and_store_as_finite_float16(name):
    tiles = _tiles(4, 64, seed=1)
    model, _ = prepare_backbone(
        name, layer=2, calibration_tiles=tiles, device="cpu", model_kwargs={"width": 16}
    )
    f32 = extract_features(model, tiles, layer=2, halo=16, device="cpu", precision="fp32")
    bf = extract_features(model, tiles, layer=2, halo=16, device="cpu", precision="bf16")
    assert bf.dtype == np.float32 and bf.shape == f32.shape
    # bf16 keeps 8 mantissa bits (~0.4 % per rounding); noise-calibrated random networks amplify it
    # with depth (rms about 2 % at layer 2, width 16, on random tiles), so: close, not silently fp32.
    rel = float(np.sqrt(np.mean((bf - f32) ** 2) / np.mean(f32**2)))
    assert 0 < rel < 0.05, rel
    stored = to_float16(bf)
    assert stored.dtype == np.float16 and np.isfinite(stored).all()
    # The weights stay float32: the same cached network serves an fp32 call afterwards, bit for bit.
    assert all(p.dtype == torch.float32 for p in model.parameters())
    np.testing.assert_array_equal(extract_features(model, tiles, layer=2, halo=16, device="cpu"), f32)


def test_bf16_keeps_the_rot90_property_of_srenet_features():
    tiles = _tiles(2, 32, seed=3)
    model, _ = prepare_backbone(
        "srenet18", layer=4, calibration_tiles=tiles, device="cpu", model_kwargs=SMALL
    )
    f = extract_features(model, tiles, layer=4, halo=8, device="cpu", precision="bf16")
    for k in (1, 2, 3):
        rotated = np.rot90(tiles, k, axes=(1, 2)).copy()
        fr = extract_features(model, rotated, layer=4, halo=8, device="cpu", precision="bf16")
        # Equal up to bf16 rounding of sums taken in another order (labels are checked end to end
        # in tests/stages/test_precision_stages.py).
        np.testing.assert_allclose(fr, np.rot90(f, k, axes=(2, 3)), rtol=0, atol=2e-2 * np.abs(f).max())


def _ref(precision: str) -> BackboneRef:
    return BackboneRef(
        path="x.safetensors",
        sha256="0" * 64,
        backbone="srenet18",
        layer=4,
        weights_random=True,
        provenance={},
        status="written",
        precision=precision,
    )


def test_precision_keys_the_features_and_fp32_keeps_the_earlier_key():
    from equislide.models.extract import NORMALISATION
    from equislide.specs import CLUSTER_FORMAT

    before = {  # the key of stores written before precisions existed (all fp32)
        "format": CLUSTER_FORMAT,
        "backbone": "srenet18",
        "weights_sha256": "0" * 64,
        "layer": 4,
        "normalisation": dict(NORMALISATION),
    }
    assert _ref("fp32").key() == params_hash(before)
    keys = {_ref(p).key() for p in ("fp32", "bf16", "fp16")}
    assert len(keys) == 3
