"""The backbone stage with packaged default weights: used as trained, recalibrated when the registry
asks, skipped for ``"random"`` and for builder arguments the packaged network does not have."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from equislide import stages
from equislide.files import sha256_file
from equislide.models.defaults import WEIGHTS_DIR_ENV
from equislide.specs import RANDOM_WEIGHTS, FeatureSpec

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _weights import standin_weights  # noqa: E402


@pytest.fixture(scope="module")
def stores(tmp_path_factory) -> list[Path]:
    from equislide.tiling import write_phantom

    root = tmp_path_factory.mktemp("cohort")
    info = write_phantom(root / "tma.tiff", cores=2, mpp=4.0, core_diameter_um=600.0, missing=0, seed=2)
    return [r.store for r in stages.tile_slide(info.image_path, root / "tiles", mpp=5.0, tile=128, halo=16)]


@pytest.fixture()
def registry(stores, tmp_path, monkeypatch) -> Path:
    folder = tmp_path / "weights"
    folder.mkdir()
    from equislide.stages.backbone import read_tiles

    tiles = read_tiles(stores[0], 0, 2)
    path = standin_weights(folder, tiles)
    monkeypatch.setenv(WEIGHTS_DIR_ENV, str(folder))
    return path


SPEC = {"layer": 3, "calibration_tiles": 2, "device": "cpu"}


def test_packaged_default_is_used_as_trained(stores, registry, tmp_path):
    ref = stages.calibrated_backbone(stores, tmp_path / "models", FeatureSpec(**SPEC))
    assert ref.source() == "packaged" and ref.status == "given" and not ref.weights_random
    assert Path(ref.path) == registry and ref.sha256 == sha256_file(registry)
    assert ref.provenance["name"] == "srenet18.safetensors" and ref.provenance["why"] == "a test"
    assert ref.provenance["batchnorm"] == "as trained (not recalibrated)"
    assert not (tmp_path / "models").exists()  # nothing was calibrated or written
    # Features of the packaged default are those of the same file given as --weights.
    given = stages.calibrated_backbone(stores, tmp_path / "m2", FeatureSpec(**SPEC, weights=str(registry)))
    assert given.source() == "file" and given.key() == ref.key()


def test_random_and_other_widths_skip_the_packaged_default(stores, registry, tmp_path):
    rand = stages.calibrated_backbone(
        stores, tmp_path / "models", FeatureSpec(**SPEC, weights=RANDOM_WEIGHTS, model_kwargs={"width": 8})
    )
    assert rand.source() == "random" and rand.status == "written"
    assert rand.provenance["init"] == "random(seed=0)" and rand.sha256 != sha256_file(registry)
    # The same network without the packaged registry: "random" is today's behaviour, byte for byte.
    other = stages.calibrated_backbone(
        stores, tmp_path / "models", FeatureSpec(**SPEC, model_kwargs={"width": 16})
    )
    assert other.source() == "random" and other.provenance["model_kwargs"] == {"width": 16}
    width8 = FeatureSpec(**SPEC, model_kwargs={"width": 8})
    same = stages.calibrated_backbone(stores, tmp_path / "models", width8)
    assert same.source() == "packaged"  # the width it was trained at: still the default


def test_random_is_bit_identical_to_a_run_without_defaults(stores, registry, tmp_path, monkeypatch):
    spec = FeatureSpec(**SPEC, weights=RANDOM_WEIGHTS, model_kwargs={"width": 8})
    with_defaults = stages.calibrated_backbone(stores, tmp_path / "a", spec)
    monkeypatch.delenv(WEIGHTS_DIR_ENV)
    width8 = FeatureSpec(**SPEC, model_kwargs={"width": 8})
    without = stages.calibrated_backbone(stores, tmp_path / "b", width8)
    assert without.source() == "random" and without.sha256 == with_defaults.sha256


def test_registry_may_ask_for_recalibration(stores, tmp_path, monkeypatch):
    folder = tmp_path / "weights"
    folder.mkdir()
    path = standin_weights(folder, np.full((1, 64, 64, 3), 255, np.uint8), batchnorm="recalibrate")
    monkeypatch.setenv(WEIGHTS_DIR_ENV, str(folder))
    ref = stages.calibrated_backbone(stores, tmp_path / "models", FeatureSpec(**SPEC))
    assert ref.source() == "packaged" and ref.status == "written" and not ref.weights_random
    assert Path(ref.path).parent == tmp_path / "models" and ref.sha256 != sha256_file(path)
    assert ref.provenance["init"].startswith("packaged:srenet18.safetensors")
    assert len(ref.provenance["calibration"]) == 2
    again = stages.calibrated_backbone(stores, tmp_path / "models", FeatureSpec(**SPEC))
    assert again.status == "skipped" and again.sha256 == ref.sha256
