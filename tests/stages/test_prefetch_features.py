"""The feature stage with its prefetching reader against the same stage reading in line: the same
bytes, and a damaged tile shard fails with the same one-line error after the same finished ranges."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest

from equislide.models.prefetch import PREFETCH_ENV
from equislide.specs import FeatureSpec
from equislide.stages import features

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _large import tiled_large_sample  # noqa: E402

SPEC = FeatureSpec(layer=1, model_kwargs={"width": 8}, calibration_tiles=4, device="cpu")


@pytest.fixture(scope="module")
def large(tmp_path_factory) -> dict:
    """One generated sample of ~170 tiles (32 px at 4 µm/px), tiled, and its calibrated backbone."""
    return tiled_large_sample(tmp_path_factory.mktemp("prefetch"), SPEC)


def _copy(large: dict, name: str) -> Path:
    dst = large["root"] / name / large["store"].name
    shutil.copytree(large["store"], dst)
    return dst


def _features(store: Path) -> dict[str, bytes]:
    root = store / "features"
    return {str(f.relative_to(root)): f.read_bytes() for f in sorted(root.rglob("*")) if f.is_file()}


def test_prefetched_features_are_the_bytes_of_in_line_reading(large, monkeypatch) -> None:
    out = {}
    for mode in ("0", "1"):
        monkeypatch.setenv(PREFETCH_ENV, mode)
        store = _copy(large, f"mode{mode}")
        res = features.extract_store_features(store, large["backbone"], SPEC)
        assert res["published"] and res["tiles_done"] == res["n_tiles"] > 100
        assert len(res["ranges"]) > 4 and all(r["status"] == "written" for r in res["ranges"])
        out[mode] = _features(store)
    assert out["0"] == out["1"] and len(out["1"]) > 4


def _damage_a_middle_shard(store: Path) -> None:
    chunks = sorted(p for p in (store / "tiles").rglob("*") if p.is_file() and p.name != "zarr.json")
    assert len(chunks) > 4, chunks
    victim = chunks[len(chunks) // 2]
    victim.write_bytes(b"\x00not a zarr chunk" * 7)


def test_a_damaged_tile_shard_fails_the_same_way_with_and_without_prefetch(large, monkeypatch) -> None:
    seen = {}
    for mode in ("0", "1"):
        monkeypatch.setenv(PREFETCH_ENV, mode)
        store = _copy(large, f"damaged{mode}")
        _damage_a_middle_shard(store)
        with pytest.raises(Exception) as info:
            features.extract_store_features(store, large["backbone"], SPEC)
        done = features.finished_feature_ranges(store, large["backbone"])
        seen[mode] = (type(info.value), str(info.value).replace(str(store.parent), "<run>"), done)
    assert seen["0"] == seen["1"]
    kind, message, done = seen["1"]
    assert done and done[0][0] == 0  # the ranges before the damaged shard keep their results
    assert "\n" not in message.strip()
