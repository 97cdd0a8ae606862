"""The console script: help, version, and the equivariance self-check."""

from __future__ import annotations

import subprocess
import sys

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
