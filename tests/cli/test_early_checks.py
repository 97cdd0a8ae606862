"""Everything checkable is checked before any work: exit 2 and one line naming the option and the reason."""

from __future__ import annotations

import contextlib
import os
import pickle
import subprocess
import sys
import time
from pathlib import Path

import pytest

from equislide.cli import main


@pytest.fixture(scope="module")
def slide(tmp_path_factory) -> Path:
    """A real input (never read by these runs: they must stop before tiling)."""
    from PIL import Image

    path = tmp_path_factory.mktemp("in") / "slide.png"
    Image.new("RGB", (64, 64), (200, 120, 160)).save(path)
    return path


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    from equislide.models import create_model, save_checkpoint

    return save_checkpoint(create_model("resnet18", width=8), tmp_path_factory.mktemp("ck") / "r.safetensors")


@contextlib.contextmanager
def _read_only(folder: Path):
    """A folder nobody can write to, root included (the tests run as root here: mode bits do not stop
    root, the immutable attribute does)."""
    folder.mkdir()
    if os.geteuid() == 0:
        if subprocess.run(["chattr", "+i", str(folder)], capture_output=True).returncode != 0:
            pytest.skip("running as root and chattr +i is not permitted: no read-only folder to test with")
        try:
            yield folder
        finally:
            subprocess.run(["chattr", "-i", str(folder)], check=True)
    else:
        folder.chmod(0o555)
        try:
            yield folder
        finally:
            folder.chmod(0o755)


def _one_error_line(capsys, command: str) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith(f"equislide {command}: error: "), err
    return err


@pytest.mark.parametrize("command", ["segment", "consistency", "tile"])
def test_empty_out_is_refused(command, slide, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main([command, str(slide), "--out", ""]) == 2
    assert "--out is empty" in _one_error_line(capsys, command)
    assert list(tmp_path.iterdir()) == []  # nothing written into the current folder


@pytest.mark.parametrize("command", ["segment", "consistency", "tile"])
def test_out_under_a_file_and_read_only_out(command, slide, capsys, tmp_path):
    (tmp_path / "file").write_text("x")
    assert main([command, str(slide), "--out", str(tmp_path / "file" / "run")]) == 2
    assert "a part of the path is a file" in _one_error_line(capsys, command)
    with _read_only(tmp_path / "ro") as ro:
        t0 = time.perf_counter()
        assert main([command, str(slide), "--out", str(ro)]) == 2
        assert time.perf_counter() - t0 < 10
        assert "the folder is not writable" in _one_error_line(capsys, command)


def test_bad_weights_found_before_tiling(slide, checkpoint, capsys, tmp_path):
    out = tmp_path / "out"
    pickled = tmp_path / "legacy.safetensors"
    pickled.write_bytes(pickle.dumps({"w": [1, 2, 3]}, protocol=4))
    garbage = tmp_path / "text.safetensors"
    garbage.write_text("not a checkpoint at all")
    cases = {
        str(tmp_path / "missing.safetensors"): "no such file",
        str(pickled): "pickle",
        str(garbage): "not a safetensors file",
        str(tmp_path / "notes.txt"): "expected a .safetensors file",
    }
    for weights, why in cases.items():
        assert main(["segment", str(slide), "--out", str(out), "--weights", weights]) == 2
        line = _one_error_line(capsys, "segment")
        assert f"--weights {weights}: " in line and why in line, line
    assert main(["segment", str(slide), "--out", str(out), "--weights", str(checkpoint)]) == 2
    assert "holds a 'resnet18' network, not 'srenet18'" in _one_error_line(capsys, "segment")
    assert main(["consistency", str(slide), "--out", str(out), "--weights", f"srenet={checkpoint}"]) == 2
    line = _one_error_line(capsys, "consistency")
    assert f"--weights srenet={checkpoint}: holds a 'resnet18'" in line, line
    assert not (out / "tiles").exists()


@pytest.mark.parametrize(
    ("option", "value", "why"),
    [
        ("--seed", "-1", "--seed -1 must be between 0 and 4294967295"),
        ("--clusters", "1", "--clusters 1 must be between 2 and 255"),
        ("--clusters", "1000", "--clusters 1000 must be between 2 and 255"),
    ],
)
@pytest.mark.parametrize("command", ["segment", "consistency"])
def test_seed_and_clusters_ranges(command, option, value, why, slide, capsys, tmp_path):
    assert main([command, str(slide), "--out", str(tmp_path / "out"), option, value]) == 2
    assert why in _one_error_line(capsys, command)
    assert not (tmp_path / "out").exists()


def test_a_bad_option_costs_no_cluster_or_server(slide, tmp_path):
    """As a process: the refusal comes in seconds (imports only), not after starting Prefect and Dask."""
    t0 = time.perf_counter()
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "equislide",
            "segment",
            str(slide),
            "--out",
            str(tmp_path),
            "--clusters",
            "1000",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    seconds = time.perf_counter() - t0
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert seconds < 20, seconds


@pytest.mark.parametrize("command", ["segment", "consistency"])
def test_inputs_are_checked_before_any_work(command, slide, capsys, tmp_path):
    out = tmp_path / "out"
    assert main([command, "--out", str(out)]) == 2
    assert "give SLIDE files, globs or folders, or --manifest FILE.csv" in _one_error_line(capsys, command)
    bad = tmp_path / "cohort.csv"
    bad.write_text("file,mpp\nslide.png,0.5\n")
    assert main([command, "--manifest", str(bad), "--out", str(out)]) == 2
    line = _one_error_line(capsys, command)
    assert f"--manifest: manifest {bad}: no 'path' column" in line, line
    assert main([command, "--manifest", str(tmp_path / "missing.csv"), "--out", str(out)]) == 2
    assert "No such file" in _one_error_line(capsys, command)
    assert main([command, str(slide), "--settle-seconds", "-1", "--out", str(out)]) == 2
    assert "--settle-seconds -1 must be between 0 and 3600" in _one_error_line(capsys, command)
    assert not (out / "run.json").exists()


def test_manifest_mpp_and_force_mpp_exclude_each_other(slide, capsys, tmp_path):
    csv = tmp_path / "cohort.csv"
    csv.write_text(f"path,mpp\n{slide},0.5\n")
    assert main(["segment", "--manifest", str(csv), "--force-mpp", "0.5", "--out", str(tmp_path / "o")]) == 2
    assert "--force-mpp and a manifest mpp column exclude each other" in _one_error_line(capsys, "segment")
