"""Outputs are never written outside ``--out``: unsafe sample IDs, symlinked inputs, symlinked output
subfolders (planted before the run, or inside a store), for the library, the stages and the CLI."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from equislide.storage import SampleIdError, open_sample_for_write, sample_store_path, split_sample_id
from equislide.storage.confine import OutsideOutputError, check_output_tree, confined

FAST_SEGMENT = [
    "--mpp",
    "5",
    "--tile",
    "128",
    "--halo",
    "16",
    "--layer",
    "3",
    "--width",
    "8",
    "--workers",
    "1",
]
ENV = {**os.environ, "PYTHONUNBUFFERED": "1"}


@pytest.fixture()
def out_and_elsewhere(tmp_path: Path) -> tuple[Path, Path]:
    out, elsewhere = tmp_path / "out", tmp_path / "elsewhere"
    out.mkdir()
    elsewhere.mkdir()
    return out, elsewhere


def _tree(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


# --- the library --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "sample_id", ["..", "../x", "a/../../b", "/etc/passwd", "tma/../..", "a/b/c", ".hidden"]
)
def test_unsafe_sample_ids_are_refused(tmp_path: Path, sample_id: str) -> None:
    with pytest.raises(SampleIdError, match="safe parts"):
        split_sample_id(sample_id)
    with pytest.raises(SampleIdError):
        sample_store_path(tmp_path, sample_id)
    with pytest.raises(SampleIdError):
        open_sample_for_write(tmp_path, sample_id, n_tiles=1, tile=8)
    assert list(tmp_path.iterdir()) == []


def test_confined_accepts_inside_and_refuses_every_way_out(out_and_elsewhere) -> None:
    out, elsewhere = out_and_elsewhere
    assert confined(out, out / "samples" / "a.png") == out / "samples" / "a.png"
    assert confined(out, "samples/a.png") == out / "samples" / "a.png"
    (out / "inner").mkdir()
    (out / "alias").symlink_to(out / "inner")  # a symlink that stays inside is fine
    assert confined(out, out / "alias" / "x") == out / "alias" / "x"
    for escape in (out / ".." / "elsewhere" / "x", elsewhere / "x", Path("/x")):
        with pytest.raises(OutsideOutputError, match="outside the output folder"):
            confined(out, escape)
    (out / "samples").symlink_to(elsewhere)
    with pytest.raises(OutsideOutputError, match=f"resolves to {elsewhere}"):
        confined(out, out / "samples" / "a.png")


def test_run_folder_may_itself_sit_behind_a_symlink(out_and_elsewhere, tmp_path: Path) -> None:
    out, _ = out_and_elsewhere
    link = tmp_path / "link-to-out"
    link.symlink_to(out)
    assert confined(link, link / "samples" / "a.png") == link / "samples" / "a.png"
    check_output_tree(link)


@pytest.mark.parametrize(
    "planted", ["samples", "tiles", "models", "models/draws", "tiles/tma.zarr/features", "run.json"]
)
def test_tree_check_names_a_planted_symlink(out_and_elsewhere, planted: str) -> None:
    out, elsewhere = out_and_elsewhere
    link = out / planted
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(elsewhere / "target")  # dangling: its target could be made anywhere
    with pytest.raises(OutsideOutputError) as err:
        check_output_tree(out)
    message = str(err.value)
    assert str(link) in message and str(elsewhere / "target") in message and "\n" not in message


def test_features_are_not_written_through_a_symlink_inside_a_store(tmp_path: Path) -> None:
    """Features go into the existing tile store; a store whose ``features`` is a symlink out is refused
    before anything is cleaned or written there."""
    import numpy as np

    from equislide.storage import open_features_for_write

    root, elsewhere = tmp_path / "tiles", tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "layer3.partial-0123456789ab").mkdir()  # what the stale clean-up would delete
    n, tile = 2, 16
    with open_sample_for_write(
        root, "s1", n_tiles=n, tile=tile, attrs={"mpp": 1.0, "source_mpp": 0.5, "grid_shape": [1, n]},
        params={"tile": tile}, input_sha256="cd" * 32,
    ) as w:  # fmt: skip
        w.write_tiles(0, np.full((n, tile, tile, 3), 200, np.uint8), np.array([[0, 0], [tile, 0]]))
        w.write_tissue_mask(np.ones((1, 2)), downsample=16)
    store = sample_store_path(root, "s1")
    (store / "features").symlink_to(elsewhere, target_is_directory=True)
    before = _tree(elsewhere)
    attrs = {"backbone": "srenet18", "stride": 4, "halo_cropped": 0, "normalisation": {}, "weights": "x"}
    with pytest.raises(OutsideOutputError, match="features"):
        open_features_for_write(store, 3, channels=6, f_tile=4, attrs=attrs, params={"layer": 3})
    assert _tree(elsewhere) == before


# --- the CLI and the service --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def phantom(tmp_path_factory) -> Path:
    from equislide.tiling import write_phantom

    folder = tmp_path_factory.mktemp("phantom")
    return write_phantom(folder / "tma.tiff", cores=6, core_diameter_um=800.0, seed=3).image_path


@pytest.mark.parametrize("command", ["segment", "tile", "consistency"])
def test_cli_refuses_a_symlinked_output_subfolder_before_any_work(
    phantom, out_and_elsewhere, command
) -> None:
    out, elsewhere = out_and_elsewhere
    (out / "samples").symlink_to(elsewhere, target_is_directory=True)
    proc = subprocess.run(
        [sys.executable, "-m", "equislide", command, str(phantom), "--out", str(out)],
        env=ENV, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and str(out / "samples") in lines[0] and "outside the output folder" in lines[0], (
        lines
    )
    assert _tree(elsewhere) == []
    assert _tree(out) == ["samples"]


@pytest.mark.slow
def test_symlinked_input_writes_only_under_out(phantom, tmp_path: Path) -> None:
    """An input reached through a symlink: its outputs are named after the link and land under OUT;
    nothing is written beside the link or its target."""
    inbox, out = tmp_path / "inbox", tmp_path / "out"
    inbox.mkdir()
    link = inbox / "linked.tiff"
    link.symlink_to(phantom)
    before = {folder: _tree(folder) for folder in (inbox, phantom.parent)}
    proc = subprocess.run(
        [sys.executable, "-m", "equislide", "segment", str(link), "--out", str(out), *FAST_SEGMENT],
        env=ENV, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert {folder: _tree(folder) for folder in before} == before
    assert (out / "samples" / "linked").is_dir(), _tree(out)
    for written in out.rglob("*"):
        assert Path(os.path.realpath(written)).is_relative_to(os.path.realpath(out)), written
