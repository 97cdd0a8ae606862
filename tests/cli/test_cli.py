"""The console script: help, version, and the equivariance self-check."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from equislide import __version__
from equislide.cli import main


def test_help_and_version_run_as_a_process():
    out = subprocess.run(
        [sys.executable, "-m", "equislide", "--help"], capture_output=True, text=True, check=True
    ).stdout
    assert "selfcheck" in out and "usage: equislide" in out
    ver = subprocess.run(
        [sys.executable, "-m", "equislide", "--version"], capture_output=True, text=True, check=True
    ).stdout
    assert ver.strip() == f"equislide {__version__}"


def test_no_command_prints_help_and_fails(capsys):
    assert main([]) == 2
    assert "COMMAND" in capsys.readouterr().out


def test_selfcheck_passes_on_generated_image(capsys):
    assert main(["selfcheck", "--size", "32"]) == 0
    out = capsys.readouterr().out
    assert "exactly equivariant" in out and "ResNet-18" in out


def test_selfcheck_on_a_real_tile(shared_data, capsys):
    tile = shared_data / "tiles" / "nct-crc" / "TUM-AEPINLNQ.png"
    assert main(["selfcheck", "--size", "48", "--image", str(tile), "--rings", "soft"]) == 0
    assert "TUM-AEPINLNQ.png" in capsys.readouterr().out


def test_selfcheck_bad_inputs_give_one_line_errors(tmp_path):
    bogus = tmp_path / "not an image.png"
    bogus.write_text("hello")
    with pytest.raises(SystemExit, match=r"not an image\.png: cannot read image"):
        main(["selfcheck", "--image", str(bogus)])
    with pytest.raises(SystemExit, match="multiple of 8"):
        main(["selfcheck", "--size", "30"])


# --- resolution options of tile and segment ---------------------------------------------------------


def _aperio_svs(path, mpp: str):
    """A small Aperio-style SVS (tiled TIFF with the description OpenSlide parses) at AppMag 20."""
    import numpy as np
    import tifffile

    rgb = np.full((512, 512, 3), 235, np.uint8)
    rgb[128:384, 128:384] = (150, 60, 140)
    head = "Aperio Image Library v10.0.50\r\n512x512 [0,0 512x512] (256x256) JPEG/RGB Q=70"
    desc = f"{head}|AppMag = 20|MPP = {mpp}"
    tifffile.imwrite(
        path, rgb, tile=(256, 256), photometric="rgb", compression="jpeg", description=desc, metadata=None
    )
    return path


def _bare_png(path):
    import numpy as np
    from PIL import Image

    rgb = np.full((300, 400, 3), 235, np.uint8)
    rgb[75:225, 100:300] = (150, 60, 140)
    Image.fromarray(rgb).save(path)
    return path


@pytest.mark.parametrize("command", ["tile", "segment"])
def test_mpp_options_in_help(command, capsys):
    with pytest.raises(SystemExit):
        main([command, "--help"])
    out = " ".join(capsys.readouterr().out.split())
    for flag in ("--input-mpp X", "--force-mpp X", "--native-pixels", "--max-tiles N"):
        assert flag in out, flag
    assert "usable metadata wins" in out
    assert ("--fit-native" in out) == (command == "segment")


def test_mpp_option_usage_errors(tmp_path, capsys):
    slide = str(tmp_path / "x.svs")
    for command in ("tile", "segment"):
        with pytest.raises(SystemExit) as info:  # argparse: the two are exclusive
            main([command, slide, "--out", str(tmp_path / "o"), "--input-mpp", "0.5", "--force-mpp", "0.5"])
        assert info.value.code == 2
        assert "not allowed with argument" in capsys.readouterr().err
        for args, message in (
            (["--input-mpp", "0"], "--input-mpp 0.0 must be a positive number of µm per pixel"),
            (["--force-mpp", "40"], "--force-mpp 40 is outside the plausible 0.05-20.0 µm per pixel"),
            (["--max-tiles", "0"], "--max-tiles 0 must be >= 1"),
        ):
            assert main([command, slide, "--out", str(tmp_path / "o"), *args]) == 2
            assert capsys.readouterr().err.strip() == f"equislide {command}: error: {message}"
    assert main(["segment", slide, "--out", str(tmp_path / "o"), "--fit-native"]) == 2
    assert "--fit-native needs --native-pixels" in capsys.readouterr().err


def test_tile_mpp_rules_end_to_end(tmp_path, capsys):
    import json

    import zarr

    png = _bare_png(tmp_path / "bare.png")
    svs = _aperio_svs(tmp_path / "cmu-like.svs", "0.4990")
    m40 = _aperio_svs(tmp_path / "m40.svs", "40")

    def run(name, *args):
        code = main(
            ["tile", str(png), str(svs), str(m40), "--out", str(tmp_path / name), "--tma", "no", *args]
        )
        err = capsys.readouterr().err
        assert "Traceback" not in err
        report = json.loads((tmp_path / name / "tile_report.json").read_text())
        return code, err, {Path(r["path"]).name: r for r in report["inputs"]}

    def source(name, sample):
        return zarr.open_group(str(tmp_path / name / f"{sample}.zarr"), mode="r").attrs["equislide"][
            "mpp_source"
        ]

    code, err, records = run("plain")
    assert (
        code == 1 and records["cmu-like.svs"]["status"] == "ok" and source("plain", "cmu-like") == "metadata"
    )
    assert f"FAILED {png}: no usable resolution: no resolution in the metadata (give --input-mpp" in err
    assert f"FAILED {m40}: no usable resolution: metadata mpp 40 µm/px is outside the plausible" in err
    assert records["bare.png"]["error"] == "NoUsableMppError"

    code, err, records = run("fill", "--input-mpp", "1.25")
    assert code == 0 and "FAILED" not in err
    assert source("fill", "bare") == "input_mpp" and source("fill", "m40") == "input_mpp"
    assert source("fill", "cmu-like") == "metadata"  # the metadata wins over --input-mpp
    assert f"WARNING {svs}: --input-mpp 1.25 contradicts the metadata's 0.499 µm/px" in err
    assert f"WARNING {m40}: metadata mpp 40 µm/px is outside" in err

    code, err, records = run("force", "--force-mpp", "1.25")
    assert code == 0 and all(source("force", s) == "override" for s in ("bare", "cmu-like", "m40"))
    assert f"WARNING {svs}: --force-mpp 1.25 replaces the metadata's 0.499 µm/px" in err

    code, err, records = run("native", "--native-pixels")
    assert code == 0 and source("native", "bare") is None and source("native", "cmu-like") == "metadata"
    assert f"WARNING {png}: no usable resolution: processed at native level-0 pixels" in err


@pytest.mark.parametrize("command", ["segment", "consistency"])
def test_precision_option(command, tmp_path, capsys, monkeypatch):
    import torch

    with pytest.raises(SystemExit):
        main([command, "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "--precision {auto,fp32,bf16,fp16}" in out and "keys the features" in out
    # fp16 on a local cluster without a GPU: one line before any work, nothing written.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.delenv("EQUISLIDE_SCHEDULER", raising=False)
    slide = _bare_png(tmp_path / "x.png")
    assert main([command, str(slide), "--out", str(tmp_path / "o"), "--precision", "fp16"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"equislide {command}: error: --precision fp16 needs a GPU") and "\n" not in err
    assert not (tmp_path / "o").exists()
