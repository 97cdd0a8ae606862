"""``segment``, ``demo`` and ``consistency`` with packaged default weights, ``--weights random`` and a
broken registry; what run.json and the summary say about the weights."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import pytest

from equislide.cli import main
from equislide.models.defaults import WEIGHTS_DIR_ENV

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _weights import standin_weights  # noqa: E402

FAST = ["--mpp", "5", "--tile", "128", "--halo", "16", "--layer", "3"]


@pytest.fixture(scope="module")
def phantom(tmp_path_factory) -> Path:
    from equislide.tiling import write_phantom

    folder = tmp_path_factory.mktemp("inputs")
    return write_phantom(folder / "tma.tiff", cores=3, core_diameter_um=800.0, seed=4, missing=0).image_path


@pytest.fixture()
def registry(tmp_path, monkeypatch) -> Path:
    """A packaged-default registry holding a test-made width-8 SRENet-18, named by EQUISLIDE_WEIGHTS_DIR."""
    folder = tmp_path / "weights"
    folder.mkdir()
    rng = np.random.default_rng(0)
    tiles = np.clip(rng.normal([200, 140, 190], 30, (4, 96, 96, 3)), 0, 255).astype(np.uint8)
    path = standin_weights(folder, tiles)
    monkeypatch.setenv(WEIGHTS_DIR_ENV, str(folder))
    return path


@pytest.fixture()
def broken_registry(tmp_path, monkeypatch) -> Path:
    folder = tmp_path / "broken"
    folder.mkdir()
    (folder / "defaults.json").write_text("", encoding="utf-8")
    monkeypatch.setenv(WEIGHTS_DIR_ENV, str(folder))
    return folder / "defaults.json"


def test_broken_registry_is_a_one_line_usage_error_unless_weights_are_chosen(
    broken_registry, phantom, tmp_path, capsys
):
    assert main(["segment", str(phantom), "--out", str(tmp_path / "a")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and str(broken_registry) in err and "registry is empty" in err
    assert "--weights random" in err
    assert main(["demo", "--out", str(tmp_path / "d")]) == 2
    assert "registry is empty" in capsys.readouterr().err
    from equislide.commands import segment

    parser = argparse.ArgumentParser()
    segment.add_parser(parser.add_subparsers())
    args = parser.parse_args(["segment", str(phantom), "--out", str(tmp_path / "b"), "--weights", "random"])
    assert segment.early_problem(args) is None  # random weights need no registry


def test_consistency_weights_option_takes_random(registry, tmp_path):
    from equislide.commands import consistency

    parser = argparse.ArgumentParser()
    consistency.add_parser(parser.add_subparsers())

    def options(*extra):
        args = parser.parse_args(["consistency", "x.tif", "--out", str(tmp_path), *extra])
        return consistency._options(args)

    assert options("--weights", "random")[0]["weights"] == {
        "srenet18": "random",
        "resnet18": "random",
        "e2cnn_resnet18": "random",
    }
    opts, problem = options("--backbones", "srenet,resnet18", "--weights", "srenet=random")
    assert problem is None and opts["weights"] == {"srenet18": "random"}
    opts, problem = options("--weights", f"srenet={registry}")
    assert problem is None and opts["weights"] == {"srenet18": str(registry)}
    _, problem = options("--weights", "srenet")
    assert "BACKBONE=random" in problem


def test_demo_width_follows_the_weights(registry, monkeypatch):
    from equislide.commands.demo import DEMO_WIDTH, demo_width

    assert demo_width(None) is None  # the packaged default's own width
    assert demo_width("random") == DEMO_WIDTH
    assert demo_width(str(registry)) is None
    monkeypatch.delenv(WEIGHTS_DIR_ENV)
    assert demo_width(None) == DEMO_WIDTH  # the package makes nothing the default today


@pytest.mark.slow
def test_segment_records_packaged_default_and_random(
    registry, phantom, prefect_harness, dask_cluster, tmp_path, capsys
):
    from equislide.files import sha256_file

    sha = sha256_file(registry)
    common = ["--scheduler", dask_cluster.scheduler_address, *FAST]
    assert main(["segment", str(phantom), "--out", str(tmp_path / "packaged"), *common]) == 0
    summary = capsys.readouterr().out
    assert f"backbone: packaged default weights srenet18.safetensors (sha256 {sha})" in summary
    params = json.loads((tmp_path / "packaged" / "run.json").read_text())["parameters"]
    assert params["weights"] is None and params["weights_source"] == "packaged"
    checkpoint = params["backbone_checkpoint"]
    assert checkpoint["sha256"] == sha and checkpoint["weights_random"] is False
    assert checkpoint["provenance"]["name"] == "srenet18.safetensors"
    assert checkpoint["provenance"]["batchnorm"] == "as trained (not recalibrated)"

    out = tmp_path / "random"
    random8 = ["--weights", "random", "--width", "8"]
    assert main(["segment", str(phantom), "--out", str(out), *common, *random8]) == 0
    assert "no trained weights: random(seed=0) with BatchNorm recalibrated" in capsys.readouterr().out
    params = json.loads((out / "run.json").read_text())["parameters"]
    assert params["weights"] == "random" and params["weights_source"] == "random"
    assert params["backbone_checkpoint"]["provenance"]["init"] == "random(seed=0)"
    assert params["backbone_checkpoint"]["sha256"] != sha
