"""Checkpoints: exact round trips, and a one-line CheckpointError for every bad or foreign file."""

from __future__ import annotations

import json
import pickle
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from equislide._version import __version__
from equislide.models import CheckpointError, load_checkpoint, resnet18, save_checkpoint, srenet18
from equislide.models.checkpoint import FORMAT_NAME, FORMAT_VERSION, METADATA_KEY


def _small_srenet():
    return srenet18(width=8, kernel_sizes=(5, 5, 3, 3), stem_kernel=3)


def _perturb_batchnorm(model: torch.nn.Module) -> None:
    # Running statistics are part of the round trip; defaults (0, 1) would hide a dropped buffer.
    for mod in model.modules():
        if isinstance(mod, torch.nn.BatchNorm2d):
            mod.running_mean.uniform_(-0.5, 0.5)
            mod.running_var.uniform_(0.5, 2.0)
            mod.num_batches_tracked.fill_(7)


@pytest.fixture
def saved(tmp_path: Path) -> tuple[torch.nn.Module, Path]:
    model = resnet18(width=8)
    return model, save_checkpoint(model, tmp_path / "ckpt" / "resnet.safetensors", provenance={"seed": 0})


def _raises(path: Path, *words: str) -> str:
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    message = str(info.value)
    assert "\n" not in message
    assert str(path.parent / path.stem) in message  # names the file (.safetensors or .json)
    for word in words:
        assert word in message, message
    return message


@pytest.mark.parametrize("builder", [_small_srenet, lambda: resnet18(width=8)], ids=["srenet18", "resnet18"])
def test_round_trip_is_bit_exact(builder, tmp_path: Path) -> None:
    model = builder()
    with torch.no_grad():
        _perturb_batchnorm(model)
    model.eval()
    path = save_checkpoint(model, tmp_path / "m.safetensors", provenance={"trained_on": "phantom", "seed": 3})
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = model.features(x, 4)
    for source in (path, path.with_suffix(".json")):
        loaded = load_checkpoint(source)
        assert not loaded.training
        assert loaded.config == json.loads(json.dumps(model.config))
        for name, tensor in model.state_dict().items():
            assert torch.equal(loaded.state_dict()[name], tensor), name
        with torch.no_grad():
            assert torch.equal(loaded.features(x, 4), expected)


def test_sidecar_records_config_versions_and_provenance(saved) -> None:
    model, path = saved
    doc = json.loads(path.with_suffix(".json").read_text())
    assert (doc["format"], doc["format_version"]) == (FORMAT_NAME, FORMAT_VERSION)
    assert doc["model"] == model.config
    assert doc["num_parameters"] == sum(p.numel() for p in model.parameters())
    assert sorted(doc["tensors"]) == sorted(model.state_dict())
    assert doc["versions"]["equislide"] == __version__
    assert doc["versions"]["torch"] == torch.__version__
    assert doc["provenance"] == {"seed": 0}
    assert doc["weights"] == path.name and len(doc["sha256"]) == 64


def test_lone_safetensors_file_is_self_describing(saved) -> None:
    model, path = saved
    path.with_suffix(".json").unlink()
    loaded = load_checkpoint(path)
    assert loaded.config == model.config


def test_save_refuses_other_suffixes_and_models_without_config(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="must end in"):
        save_checkpoint(resnet18(width=8), tmp_path / "m.pt")
    with pytest.raises(CheckpointError, match="no config"):
        save_checkpoint(torch.nn.Linear(2, 2), tmp_path / "m.safetensors")
    with pytest.raises(CheckpointError, match="JSON"):
        save_checkpoint(resnet18(width=8), tmp_path / "m.safetensors", provenance={"x": object()})


def test_missing_file(tmp_path: Path) -> None:
    _raises(tmp_path / "absent.safetensors", "no such file")


def test_json_without_weights(saved) -> None:
    _, path = saved
    path.unlink()
    _raises(path.with_suffix(".json"), "no such file")


def test_directory(tmp_path: Path) -> None:
    folder = tmp_path / "folder.safetensors"
    folder.mkdir()
    _raises(folder, "directory")


def test_wrong_suffix(tmp_path: Path) -> None:
    path = tmp_path / "weights.bin"
    path.write_bytes(b"x")
    _raises(path, "expected")


def test_zero_byte_file(tmp_path: Path) -> None:
    path = tmp_path / "empty.safetensors"
    path.touch()
    _raises(path, "empty")


@pytest.mark.parametrize("keep", [5, 40, -100], ids=["in-length", "in-header", "in-data"])
def test_truncated_file(saved, keep: int) -> None:
    _, path = saved
    path.with_suffix(".json").unlink()  # let the framing check, not the checksum, catch it
    path.write_bytes(path.read_bytes()[:keep])
    _raises(path, "truncated")


def test_truncated_file_with_sidecar(saved) -> None:
    _, path = saved
    path.write_bytes(path.read_bytes()[:-100])
    _raises(path, "truncated")


@pytest.mark.parametrize("zipped", [True, False], ids=["torch.save", "legacy-pickle"])
def test_pickle_renamed_safetensors_is_not_unpickled(tmp_path: Path, monkeypatch, zipped: bool) -> None:
    path = tmp_path / "model.safetensors"
    torch.save(resnet18(width=8).state_dict(), path, _use_new_zipfile_serialization=zipped)

    def _no_unpickling(*args, **kwargs):
        raise AssertionError("load_checkpoint tried to unpickle")

    monkeypatch.setattr(torch, "load", _no_unpickling)
    monkeypatch.setattr(pickle, "load", _no_unpickling)
    monkeypatch.setattr(pickle, "loads", _no_unpickling)
    monkeypatch.setattr(pickle, "Unpickler", _no_unpickling)
    _raises(path, "not a safetensors file", "zip archive" if zipped else "pickle")


def test_foreign_safetensors_without_config(tmp_path: Path) -> None:
    path = tmp_path / "foreign.safetensors"
    save_file({"weight": torch.zeros(2, 2)}, path, metadata={"format": "pt"})
    _raises(path, "without an equislide config")


def test_foreign_json_beside_weights(saved) -> None:
    _, path = saved
    path.with_suffix(".json").write_text(json.dumps({"model_type": "bert"}))
    _raises(path, FORMAT_NAME)


def test_unknown_arch(saved) -> None:
    _, path = saved
    sidecar = path.with_suffix(".json")
    doc = json.loads(sidecar.read_text())
    doc["model"]["arch"] = "vit_huge"
    sidecar.write_text(json.dumps(doc))
    _raises(sidecar, "unknown arch", "vit_huge")


def test_newer_format_version(saved) -> None:
    _, path = saved
    sidecar = path.with_suffix(".json")
    doc = json.loads(sidecar.read_text())
    doc["format_version"] = FORMAT_VERSION + 1
    sidecar.write_text(json.dumps(doc))
    _raises(path, "format_version")


def test_sha256_mismatch(saved, tmp_path: Path) -> None:
    _, path = saved
    other = save_checkpoint(resnet18(width=8), tmp_path / "other.safetensors")
    path.write_bytes(other.read_bytes())  # valid weights, but not the ones the JSON describes
    _raises(path, "sha256")


def _resave_without_sidecar(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    # Keeps the embedded config, so only the tensors are wrong.
    header_len = struct.unpack("<Q", path.read_bytes()[:8])[0]
    metadata = json.loads(path.read_bytes()[8 : 8 + header_len])["__metadata__"]
    path.with_suffix(".json").unlink()
    save_file(tensors, path, metadata={METADATA_KEY: metadata[METADATA_KEY]})


def test_missing_tensor(saved) -> None:
    model, path = saved
    tensors = {k: v.clone() for k, v in model.state_dict().items() if k != "head.bias"}
    _resave_without_sidecar(path, tensors)
    _raises(path, "missing head.bias")


def test_unexpected_tensor(saved) -> None:
    model, path = saved
    tensors = {k: v.clone() for k, v in model.state_dict().items()}
    tensors["extra.weight"] = torch.zeros(3)
    _resave_without_sidecar(path, tensors)
    _raises(path, "unexpected extra.weight")


def test_shape_mismatch(saved) -> None:
    model, path = saved
    tensors = {k: v.clone() for k, v in model.state_dict().items()}
    tensors["head.weight"] = torch.zeros(5, 64)
    _resave_without_sidecar(path, tensors)
    _raises(path, "shape mismatch head.weight [5, 64]")


def test_map_location(saved) -> None:
    _, path = saved
    loaded = load_checkpoint(path, map_location=torch.device("cpu"))
    assert next(loaded.parameters()).device == torch.device("cpu")


def test_float16_storage_halves_the_file_and_loads_back_as_float32(tmp_path: Path) -> None:
    model = _small_srenet()
    with torch.no_grad():
        _perturb_batchnorm(model)
    full = save_checkpoint(model, tmp_path / "full.safetensors")
    half = save_checkpoint(model, tmp_path / "half.safetensors", dtype=torch.float16)
    assert half.stat().st_size < 0.6 * full.stat().st_size
    doc = json.loads(half.with_suffix(".json").read_text())
    assert doc["stored_dtype"] == "float16"
    assert doc["tensors"]["stem.0.weight"]["dtype"] == "float16"
    assert doc["tensors"]["stem.1.num_batches_tracked"]["dtype"] == "int64"  # counters are not cast
    loaded = load_checkpoint(half)
    for name, tensor in model.state_dict().items():
        got = loaded.state_dict()[name]
        assert got.dtype == tensor.dtype, name
        if tensor.is_floating_point():
            assert torch.equal(got, tensor.half().to(tensor.dtype)), name  # float16-rounded, nothing else
        else:
            assert torch.equal(got, tensor), name
    with pytest.raises(CheckpointError, match="not a floating torch dtype"):
        save_checkpoint(model, tmp_path / "bad.safetensors", dtype=torch.int8)
