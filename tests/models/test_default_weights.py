"""The registry of packaged default weights and its resolver (``equislide.models.defaults``)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from equislide.files import sha256_file
from equislide.models import create_model, save_checkpoint
from equislide.models._errors import DefaultWeightsError
from equislide.models.defaults import (
    REGISTRY_FORMAT,
    WEIGHTS_DIR_ENV,
    default_weights,
    packaged_weights,
    read_registry,
    weights_dir,
)
from equislide.specs import BACKBONES


def make_registry(folder: Path, *, default: bool = True, width: int = 8, **entry) -> Path:
    """A registry folder holding one seeded srenet18 checkpoint; returns the checkpoint's path."""
    torch.manual_seed(0)
    path = save_checkpoint(create_model("srenet18", width=width), folder / "srenet18.safetensors")
    record = {"file": path.name, "sha256": sha256_file(path), "default": default, "why": "test"} | entry
    doc = {"format": REGISTRY_FORMAT, "format_version": 1, "backbones": {"srenet18": record}}
    (folder / "defaults.json").write_text(json.dumps(doc), encoding="utf-8")
    return path


def test_the_package_ships_a_registry_that_makes_nothing_the_default(monkeypatch):
    """Until trained weights beat random, every backbone resolves to None: runs stay as they were."""
    monkeypatch.delenv(WEIGHTS_DIR_ENV, raising=False)
    folder = weights_dir()
    assert folder.name == "weights" and (folder / "defaults.json").is_file()
    assert isinstance(read_registry(), dict)
    for name in BACKBONES:
        assert default_weights(name) is None


def test_a_default_entry_resolves_to_its_verified_file(tmp_path, monkeypatch):
    path = make_registry(tmp_path)
    found = packaged_weights("srenet18", directory=tmp_path)
    assert found.path == path and found.sha256 == sha256_file(path) and not found.recalibrate
    assert found.label() == f"packaged:srenet18.safetensors (sha256 {found.sha256[:12]})"
    assert default_weights("resnet18", directory=tmp_path) is None  # not listed
    monkeypatch.setenv(WEIGHTS_DIR_ENV, str(tmp_path))
    assert default_weights("srenet18") == path  # the environment variable replaces the package folder


def test_an_entry_that_is_not_the_default_resolves_to_none(tmp_path):
    make_registry(tmp_path, default=False)
    assert default_weights("srenet18", directory=tmp_path) is None


def test_recalibrate_entry_is_read(tmp_path):
    make_registry(tmp_path, batchnorm="recalibrate")
    assert packaged_weights("srenet18", directory=tmp_path).recalibrate


def _one_line_error(directory: Path) -> str:
    with pytest.raises(DefaultWeightsError) as info:
        default_weights("srenet18", directory=directory)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_missing_registry_is_one_line_naming_the_file(tmp_path):
    message = _one_line_error(tmp_path)
    assert str(tmp_path / "defaults.json") in message and "no default-weights registry" in message


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("", "is empty"),
        ("  \n", "is empty"),
        ("{not json", "is not JSON"),
        ('{"format": "other", "backbones": {}}', "not an equislide-default-weights registry"),
        ('{"format": "equislide-default-weights", "format_version": 99, "backbones": {}}', "upgrade"),
        ('{"format": "equislide-default-weights", "format_version": 1, "backbones": []}', "'backbones'"),
    ],
)
def test_unusable_registry_is_one_line(tmp_path, text, reason):
    (tmp_path / "defaults.json").write_text(text, encoding="utf-8")
    message = _one_line_error(tmp_path)
    assert message.startswith(f"{tmp_path / 'defaults.json'}: ") and reason in message


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"sha256": "abc"}, "'sha256' must be 64"),
        ({"file": "../elsewhere.safetensors"}, "'file' must be"),
        ({"file": "weights.pt"}, "'file' must be"),
        ({"default": "yes"}, "'default' must be"),
        ({"batchnorm": "frozen"}, "'batchnorm' must be"),
    ],
)
def test_bad_entry_is_one_line(tmp_path, change, reason):
    make_registry(tmp_path, **change)
    message = _one_line_error(tmp_path)
    assert "entry 'srenet18'" in message and reason in message


def test_altered_weights_fail_their_sha256(tmp_path):
    path = make_registry(tmp_path)
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF  # one bit of one weight
    path.write_bytes(bytes(data))
    message = _one_line_error(tmp_path)
    assert message.startswith(f"{path}: sha256 ") and "altered or replaced" in message


def test_missing_weights_file_is_one_line(tmp_path):
    path = make_registry(tmp_path)
    path.unlink()
    message = _one_line_error(tmp_path)
    assert message.startswith(f"{path}: ") and "missing" in message
