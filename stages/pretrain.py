"""The pretrain stage: train a backbone on an ImageFolder or on the user's own tissue, resumably.

:func:`pretrain` takes a :class:`~equislide.specs.PretrainSpec` and writes

- ``OUT.safetensors`` + ``OUT.json``: the trained backbone (no BYOL head), rebuilt from its config
  as ``segment --weights`` builds it; the JSON's provenance holds the full recipe, the exact command
  line, the data summary (class counts or tiles per input, SHA-256 of the sorted file list) and the
  metrics of every epoch;
- ``OUT.train/epoch-NNNN.safetensors`` + ``.json``: the training state after each epoch (the last two
  are kept), which ``resume`` continues from exactly.

Self-supervised data are cut here (the libraries stay free of each other's I/O): every slide or
image goes through :func:`equislide.tiling.plan_samples` at ``spec.mpp`` (inputs without a usable
resolution at native pixels, or at ``input_mpp``), tile stores are cropped to the input size, and
tiles mostly of glass (the tissue mask) are dropped.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from equislide.specs import PretrainSpec

__all__ = ["PretrainResult", "collect_tiles", "pretrain", "state_folder", "tissue_fraction"]

#: File suffixes taken as slides inside a self-supervised DATA folder (images: IMAGE_SUFFIXES).
SLIDE_SUFFIXES = (".svs", ".ndpi", ".mrxs", ".scn", ".svslide", ".bif", ".vms", ".vmu", ".tif", ".tiff")
_KEEP_STATES = 2


@dataclass
class PretrainResult:
    """What a pretrain run produced.

    Attributes:
        weights: The saved backbone (``.safetensors``; its ``.json`` beside it).
        state_dir: Folder of the per-epoch training states.
        history: Metrics of every epoch (resumed runs include the earlier epochs).
        data: The training data's summary.
        resumed_from: Epoch the run continued after (0: started fresh).
        warnings: One-line notes (skipped images or inputs, native pixels).
    """

    weights: str
    state_dir: str
    history: list[dict[str, Any]]
    data: dict[str, Any]
    resumed_from: int = 0
    warnings: list[str] = field(default_factory=list)


def state_folder(out: str | os.PathLike[str]) -> Path:
    """``W.safetensors`` -> ``W.train/``."""
    return Path(out).with_suffix(".train")


def tissue_fraction(tile: np.ndarray, mpp: float | None) -> float:
    """Fraction of a tile's pixels the tissue mask calls tissue."""
    from equislide.tiling import tissue_mask

    return float(tissue_mask(tile, mpp=mpp).mean())


def _inputs(data: tuple[str, ...]) -> tuple[list[Path], list[Path], list[str]]:
    """(image and slide files, tile stores, problems) of the DATA arguments."""
    from equislide.models.train_data import IMAGE_SUFFIXES
    from equislide.storage import DONE_MARKER
    from equislide.text import path_text

    files: list[Path] = []
    stores: list[Path] = []
    problems: list[str] = []
    wanted = tuple(set(IMAGE_SUFFIXES) | set(SLIDE_SUFFIXES))
    for arg in data:
        p = Path(arg)
        if (p / DONE_MARKER).is_file():
            stores.append(p)
        elif p.is_dir():
            found_stores = sorted(d.parent for d in p.rglob(DONE_MARKER) if d.parent.suffix == ".zarr")
            stores += found_stores
            inside = tuple(found_stores)
            files += sorted(
                f
                for f in p.rglob("*")
                if f.is_file()
                and f.suffix.lower() in wanted
                and not f.name.startswith(".")
                and not any(s in f.parents for s in inside)
            )
        elif p.is_file():
            files.append(p)
        else:
            problems.append(f"{path_text(p)}: no such file or folder")
    return files, stores, problems


def collect_tiles(
    data: tuple[str, ...],
    *,
    size: int,
    mpp: float = 0.5,
    input_mpp: float | None = None,
    max_tiles: int = 20000,
    min_tissue: float = 0.5,
):
    """Unlabelled tissue tiles of ``size`` px from slides, images and tile stores.

    Tiles are laid out on each input's tissue (its thumbnail mask), at most ``max_tiles`` over all
    inputs, evenly spaced within each and shared out in proportion to their sizes; each is then read and
    kept only when at least ``min_tissue`` of it is tissue. An input that cannot be read is skipped
    with its reason.

    Returns:
        A :class:`~equislide.models.train_data.TileDataset` whose summary lists every input (SHA-256,
        tiles kept, tiles dropped as glass) and every skipped one.

    Raises:
        TrainingDataError: no input gave a tissue tile.
    """
    from equislide.models._errors import TrainingDataError
    from equislide.models.train_data import TileDataset, file_list_sha256
    from equislide.storage import open_tiles, read_sample_meta, store_identity
    from equislide.text import one_line, path_text
    from equislide.tiling import SlideError, open_slide, plan_samples

    files, stores, problems = _inputs(data)
    skipped = list(problems)
    # (name, candidate tiles, reader of the picked candidates, mpp of their pixels, identity)
    sources: list[tuple[str, int, Callable[..., Any], float | None, dict[str, Any]]] = []
    for f in files:
        try:
            layout = plan_samples(
                f,
                sample_id="pretrain",
                params={},
                mpp=mpp,
                tile=size,
                halo=0,
                input_mpp=input_mpp,
                native_pixels=True,
                max_tiles=10**9,
                tma="no",
            )
        except (SlideError, ValueError, OSError) as err:
            skipped.append(f"{path_text(f)}: {one_line(err)[:200]}")
            continue
        for sample in layout.todo:
            grid = sample.grid

            def read(picks, _f=f, _xy=grid.l0_read_xy, _mpp=sample.analysis_mpp):
                with open_slide(_f, input_mpp=input_mpp) as slide:  # once per input, not per tile
                    for i in picks:
                        yield slide.read_region_mpp((int(_xy[i, 0]), int(_xy[i, 1])), (size, size), _mpp)

            ident = {
                "path": path_text(f),
                "sha256": layout.input_sha256,
                "mpp": sample.analysis_mpp,
                "native_pixels": sample.analysis_mpp is None,
            }
            sources.append((path_text(f), grid.n_tiles, read, sample.analysis_mpp, ident))
    for s in stores:
        try:
            meta = read_sample_meta(s)
            tiles = open_tiles(s)
        except Exception as err:  # noqa: BLE001 - a broken store is skipped with its reason
            skipped.append(f"{path_text(s)}: {one_line(err)[:200]}")
            continue
        side = int(meta["tile_with_halo"])
        per = side // size
        if per < 1:
            skipped.append(f"{path_text(s)}: its tiles are {side} px, smaller than --input-size {size}")
            continue
        n = int(meta["n_tiles"]) * per * per

        def read_store(picks, _t=tiles, _per=per):
            for i in picks:
                tile, cell = divmod(int(i), _per * _per)
                r, c = divmod(cell, _per)
                block = np.asarray(_t[tile].compute(scheduler="synchronous"))
                yield block[r * size : (r + 1) * size, c * size : (c + 1) * size]

        ident = {"path": path_text(s), **store_identity(s), "mpp": meta.get("mpp"), "store": True}
        sources.append((path_text(s), n, read_store, meta.get("mpp"), ident))
    total = sum(n for _, n, *_ in sources)
    kept: list[np.ndarray] = []
    inputs: list[dict[str, Any]] = []
    for name, n, read, pix_mpp, ident in sources:
        quota = n if total <= max_tiles else max(1, round(max_tiles * n / total))
        picks = np.unique(np.linspace(0, n - 1, num=min(n, quota)).round().astype(np.int64)) if n else []
        n_kept = n_glass = 0
        try:
            for raw in read(picks):
                tile = np.ascontiguousarray(raw, dtype=np.uint8)
                # A tile without a known resolution is judged as if at the analysis mpp: with no scale
                # the mask's smoothing shrinks to 1 px and misses pale stroma (measured: 0.42 vs 1.0).
                if tissue_fraction(tile, pix_mpp if pix_mpp is not None else mpp) < min_tissue:
                    n_glass += 1
                    continue
                kept.append(tile)
                n_kept += 1
        except Exception as err:  # noqa: BLE001 - a read failing midway skips the rest of that input
            skipped.append(f"{name}: {one_line(err)[:200]}")
        inputs.append(
            {**ident, "tiles_planned": int(n), "tiles_read": len(picks), "tiles": n_kept, "glass": n_glass}
        )
    if not kept:
        detail = f"; skipped: {skipped[0]}" if skipped else ""
        raise TrainingDataError(
            f"{', '.join(path_text(d) for d in data)}: no tissue tile of {size} px found in "
            f"{len(sources)} input(s){detail}"
        )
    info = {
        "inputs": inputs,
        "skipped": skipped,
        "mpp": mpp,
        "input_mpp": input_mpp,
        "min_tissue": min_tissue,
        "max_tiles": max_tiles,
        "files_sha256": file_list_sha256([i["path"] for i in inputs]),
        "inputs_sha256": file_list_sha256(
            [f"{i['path']} {i.get('sha256') or i.get('input_sha256')}" for i in inputs]
        ),
    }
    return TileDataset(np.stack(kept), info)


def _distributed(device_arg: str):
    """(rank, world size, device) under ``torchrun`` (WORLD_SIZE/RANK/LOCAL_RANK), else (0, 1, device)."""
    import torch

    from equislide.models.extract import resolve_device

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, resolve_device(device_arg)
    import torch.distributed as dist

    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() and device_arg != "cpu"
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    device = torch.device(f"cuda:{local}") if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    return rank, world, device


def _recipe_differences(saved: dict[str, Any], now: dict[str, Any]) -> list[str]:
    keys = sorted(set(saved) | set(now))
    return [f"{k} {saved.get(k)!r} -> {now.get(k)!r}" for k in keys if saved.get(k) != now.get(k)]


def pretrain(
    spec: PretrainSpec,
    *,
    on_step: Callable[[Any], None] | None = None,
    on_epoch: Callable[[dict[str, Any]], None] | None = None,
    on_data: Callable[[dict[str, Any]], None] | None = None,
) -> PretrainResult:
    """Train the backbone of ``spec``; write its weights and a training state after every epoch.

    Args:
        spec: What to train on, how, and where.
        on_step: Called after every optimiser step with a :class:`~equislide.models.training.StepInfo`.
        on_epoch: Called after every epoch with its metrics (loss, accuracies, images/s), after its
            state was written (an exception raised here stops the run; ``resume`` continues it).
        on_data: Called once with the data summary, before training.

    Returns:
        The :class:`PretrainResult`.

    Raises:
        TrainingDataError: unusable data (empty folder, one class, no tissue), a ``val`` folder whose
            classes the training data lacks, or a state that cannot be resumed (another recipe or
            data, none there) or a state folder that exists without ``resume``.
        CheckpointError: a state file that is a pickle, truncated, foreign or changed.
    """
    import torch

    from equislide.files import sha256_file
    from equislide.models._errors import TrainingDataError
    from equislide.models.checkpoint import save_checkpoint
    from equislide.models.train_data import image_folder
    from equislide.models.train_state import (
        latest_state,
        read_training_state,
        state_path,
        write_training_state,
    )
    from equislide.models.training import Trainer, knn_accuracy, pooled_features, rotated_accuracy
    from equislide.text import path_text

    recipe = spec.recipe()
    rank, world, device = _distributed(spec.device)
    if device.type == "cpu":
        torch.set_num_threads(
            len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        )
    out = Path(spec.out)
    states = state_folder(out)
    latest = latest_state(states)
    if latest is not None and not spec.resume:
        raise TrainingDataError(
            f"{path_text(states)} holds the training state of an earlier run (up to {latest.name}); pass "
            "--resume to continue it, or remove the folder (or choose another --out) to start again"
        )
    if spec.resume and latest is None:
        raise TrainingDataError(
            f"{path_text(states)}: no training state to resume (no epoch-NNNN.safetensors)"
        )
    warnings: list[str] = []
    if spec.self_supervised:
        train = collect_tiles(
            spec.data,
            size=recipe.input_size,
            mpp=spec.mpp,
            input_mpp=spec.input_mpp,
            max_tiles=spec.max_tiles,
            min_tissue=spec.tissue_fraction,
        )
        warnings += [f"skipped {s}" for s in train.info["skipped"]]
        native = [i["path"] for i in train.info["inputs"] if i.get("native_pixels")]
        if native:
            warnings.append(
                f"{len(native)} input(s) without a usable resolution used at native pixels "
                f"(first: {native[0]}); give --input-mpp to cut them at --mpp {spec.mpp:g}"
            )
        num_classes = None
    else:
        if len(spec.data) != 1:
            raise TrainingDataError(
                f"supervised training takes one ImageFolder, got {len(spec.data)} paths "
                "(use --self-supervised for slides, images or tile stores)"
            )
        train = image_folder(spec.data[0], size=recipe.input_size, labelled=True)
        if train.skipped:
            first = train.skipped[0]
            warnings.append(
                f"skipped {len(train.skipped)} unreadable image(s) (first: {first[0]}: {first[1]})"
            )
        num_classes = len(train.classes)
    summary = train.summary()
    val = None
    if spec.val is not None:
        val = image_folder(
            spec.val, size=recipe.input_size, labelled=True, min_classes=1 if num_classes else 2
        )
        if num_classes is not None:
            unknown = [c for c in val.classes if c not in train.classes]
            if unknown:
                raise TrainingDataError(
                    f"{path_text(spec.val)}: class folder(s) {', '.join(unknown)} are not among the training "
                    f"classes ({', '.join(train.classes)})"
                )
            remap = [train.classes.index(c) for c in val.classes]
            val.labels = [remap[y] for y in val.labels or []]
        if val.skipped:
            warnings.append(f"skipped {len(val.skipped)} unreadable validation image(s)")
    if on_data is not None:
        on_data(summary)

    steps = Trainer.steps_for(len(train), recipe.batch_size, world)
    trainer = Trainer(
        recipe, num_classes=num_classes, steps_per_epoch=steps, device=device, rank=rank, world_size=world
    )
    resumed_from = 0
    if spec.resume:
        document, tensors = read_training_state(latest)  # type: ignore[arg-type]
        saved_recipe = dict(document["recipe"])
        if saved_recipe.get("arch") != recipe.arch:
            raise TrainingDataError(
                f"{path_text(latest)}: a training state of {saved_recipe.get('arch')!r}, not "
                f"{recipe.arch!r}; resume with the --arch it was trained with"
            )
        # Compared as JSON holds them (tuples come back as lists).
        diff = _recipe_differences(saved_recipe, json.loads(json.dumps(recipe.to_dict())))
        if diff:
            raise TrainingDataError(
                f"{path_text(latest)}: saved with another recipe ({'; '.join(diff[:4])}); resume with the "
                "options of that run"
            )
        saved_data = document.get("data", {}).get("files_sha256")
        if saved_data != summary.get("files_sha256"):
            raise TrainingDataError(
                f"{path_text(latest)}: trained on other data (file list sha256 {str(saved_data)[:12]}..., "
                f"now {str(summary.get('files_sha256'))[:12]}...); resume on the same DATA"
            )
        try:
            trainer.load_state_tensors(
                tensors, epoch=document["epoch"], step=document["step"], history=document.get("history", [])
            )
        except (KeyError, RuntimeError, ValueError) as err:
            raise TrainingDataError(
                f"{path_text(latest)}: does not fit this network: {str(err)[:200]}"
            ) from None
        resumed_from = trainer.epoch

    for _ in range(trainer.epoch, recipe.epochs):
        metrics = trainer.train_epoch(train, on_step=on_step)
        metrics["batchnorm_images"] = trainer.precise_batchnorm(train)
        if val is not None:
            if num_classes is not None:
                metrics.update(rotated_accuracy(trainer.model, val, device=device))
            else:
                feats, labels = pooled_features(trainer.model, val, device=device)
                metrics["val_knn_accuracy"] = knn_accuracy(feats, labels)
        if rank == 0:
            write_training_state(
                state_path(states, trainer.epoch),
                trainer.state_tensors(),
                {
                    "recipe": recipe.to_dict(),
                    "epoch": trainer.epoch,
                    "step": trainer.step,
                    "history": trainer.history,
                    "data": summary,
                    "model": dict(trainer.model_kwargs, arch=recipe.arch),
                    "world_size": world,
                },
            )
            for old in sorted(states.glob("epoch-*.safetensors"))[:-_KEEP_STATES]:
                old.unlink(missing_ok=True)
                old.with_suffix(".json").unlink(missing_ok=True)
        if on_epoch is not None:
            on_epoch(dict(metrics))

    if rank == 0:
        final = state_path(states, trainer.epoch)
        provenance = {
            "trained_by": "equislide pretrain",
            "command": list(spec.command),
            "recipe": recipe.to_dict(),
            "objective": "BYOL" if recipe.self_supervised else "cross-entropy",
            "batchnorm": "running statistics re-estimated on clean training images after every epoch",
            "data": summary,
            "val": None if val is None else val.summary(),
            "metrics": trainer.history,
            "device": str(device),
            "world_size": world,
            "torch_threads": torch.get_num_threads(),
            "precision": recipe.precision,
            "resumed_from_epoch": resumed_from,
            "training_state": {"path": path_text(final), "sha256": sha256_file(final)},
            "created": _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat(),
        }
        dtype = torch.float16 if spec.weights_dtype == "float16" else None
        save_checkpoint(trainer.backbone_for_saving(), out, provenance=provenance, dtype=dtype)
    return PretrainResult(str(out), str(states), list(trainer.history), summary, resumed_from, warnings)
