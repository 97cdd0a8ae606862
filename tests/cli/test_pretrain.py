"""``equislide pretrain`` on the command line: a one-line error and exit status 2 for every bad input,
weights that drive ``segment --weights`` for real, and the Prefect flow around the stage."""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import pytest

from equislide.cli import main

TINY = ["--width", "4", "--input-size", "32", "--batch-size", "4", "--epochs", "1"]


@pytest.fixture(scope="module")
def folder(shared_data: Path, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("imagefolder")
    src = shared_data / "tiles" / "histolab"
    for cls, pattern in (("tissue", "tissue-*"), ("background", "no-tissue*")):
        (root / cls).mkdir()
        for f in sorted(src.glob(pattern)):
            shutil.copy(f, root / cls / f.name)
    return root


def _error(capsys, code: int, *words: str) -> str:
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    lines = [ln for ln in err.splitlines() if ln.startswith("equislide pretrain: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    for w in words:
        assert w in lines[0], lines[0]
    return lines[0]


def test_help_names_the_modes_and_options(capsys) -> None:
    with pytest.raises(SystemExit):
        main(["pretrain", "--help"])
    out = capsys.readouterr().out
    for word in ("--self-supervised", "--resume", "--val", "--rotation-augment", "ImageFolder", "BYOL"):
        assert word in out


def test_bad_options_and_paths(capsys, tmp_path: Path, folder: Path) -> None:
    _error(
        capsys, main(["pretrain", str(folder), "--out", str(tmp_path / "w.pt")]), "must end in .safetensors"
    )
    _error(
        capsys,
        main(["pretrain", str(tmp_path / "nope"), "--out", str(tmp_path / "w.safetensors")]),
        "no such",
    )
    code = main(["pretrain", str(folder), "--out", str(tmp_path / "w.safetensors"), "--batch-size", "1"])
    _error(capsys, code, "batch_size=1")


def test_empty_folder_and_one_class(capsys, tmp_path: Path, folder: Path) -> None:
    (tmp_path / "empty").mkdir()
    out = str(tmp_path / "w.safetensors")
    _error(capsys, main(["pretrain", str(tmp_path / "empty"), "--out", out, *TINY]), "no class folder")
    one = tmp_path / "one"
    shutil.copytree(folder / "tissue", one / "tissue")
    _error(capsys, main(["pretrain", str(one), "--out", out, *TINY]), "only one class")
    ssl_empty = main(["pretrain", str(tmp_path / "empty"), "--self-supervised", "--out", out, *TINY])
    _error(capsys, ssl_empty, "no tissue tile")


@pytest.mark.parametrize("damage", ["pickle", "truncated", "other-arch"])
def test_resume_refuses_bad_state(capsys, tmp_path: Path, folder: Path, damage: str) -> None:
    import torch

    from equislide.models.train_state import write_training_state
    from equislide.models.training import Recipe

    out = tmp_path / "w.safetensors"
    state = tmp_path / "w.train" / "epoch-0001.safetensors"
    state.parent.mkdir()
    if damage == "pickle":
        state.write_bytes(pickle.dumps({"state": 1}, protocol=4))
        words = ("pickle", "never unpickles")
    else:
        recipe = Recipe(arch="resnet18", model_kwargs={"width": 4}, epochs=1, batch_size=4, input_size=32)
        doc = {"recipe": recipe.to_dict(), "epoch": 1, "step": 2, "data": {}}
        write_training_state(state, {"model/x": torch.zeros(3)}, doc)
        if damage == "truncated":
            state.with_suffix(".json").unlink()
            state.write_bytes(state.read_bytes()[:-5])
            words = ("truncated",)
        else:
            words = ("a training state of 'resnet18', not 'srenet18'",)
    _error(capsys, main(["pretrain", str(folder), "--out", str(out), "--resume", *TINY]), *words)
    # Without --resume an existing state is never overwritten silently.
    _error(capsys, main(["pretrain", str(folder), "--out", str(out), *TINY]), "pass --resume")


@pytest.mark.slow
def test_trained_weights_drive_segment(
    capsys, tmp_path: Path, folder: Path, prefect_harness, dask_cluster
) -> None:
    out = tmp_path / "w.safetensors"
    assert main(["pretrain", str(folder), "--out", str(out), *TINY, "--weights-dtype", "float16"]) == 0
    assert "wrote" in capsys.readouterr().out
    config = json.loads(out.with_suffix(".json").read_text())
    assert config["provenance"]["command"][:3] == ["equislide", "pretrain", str(folder)]
    image = folder / "tissue" / "tissue-level0-4302-10273-4814-10785.png"
    run = tmp_path / "run"
    code = main(
        [
            "segment",
            str(image),
            "--out",
            str(run),
            "--weights",
            str(out),
            "--native-pixels",
            "--tma",
            "no",
            "--tile",
            "128",
            "--halo",
            "0",
            "--layer",
            "2",
            "--clusters",
            "2",
            "--fit",
            "per-sample",
            "--scheduler",
            dask_cluster.scheduler_address,
        ]  # fmt: skip
    )
    assert code == 0, capsys.readouterr().err
    manifest = json.loads((run / "run.json").read_text())
    assert [s["status"] for s in manifest["samples"].values()] == ["done"]
    text = json.dumps(manifest["parameters"])
    assert config["sha256"] in text  # the backbone the features came from is the trained file


@pytest.mark.slow
def test_flow_trains_and_publishes_artifacts(tmp_path: Path, folder: Path, prefect_harness) -> None:
    from prefect.artifacts import Artifact

    from equislide.flows.pretrain import pretrain_flow

    out = tmp_path / "flow.safetensors"
    options = {"model_kwargs": {"width": 4}, "input_size": 32, "batch_size": 4, "epochs": 2}
    result = pretrain_flow([str(folder)], str(out), options)
    assert Path(result["weights"]).is_file() and len(result["history"]) == 2
    progress = Artifact.get("equislide-pretrain-progress")
    table = Artifact.get("equislide-pretrain-metrics")
    assert progress is not None and float(progress.data) == 100.0
    assert table is not None and "loss" in str(table.data)
