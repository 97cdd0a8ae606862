"""``equislide pretrain DATA --out WEIGHTS.safetensors``: train a backbone for ``segment --weights``.

Runs :func:`equislide.stages.pretrain.pretrain`: supervised on an ImageFolder, or self-supervised
(BYOL) on tissue tiles cut from slides, images or tile stores. Exit status 0 when the weights were
written, 1 when training stopped on a fault (the states written so far are kept: rerun with
``--resume``), 2 on a usage error or unusable data (one line on stderr).
"""

from __future__ import annotations

import argparse
import sys

from equislide.specs import PRETRAIN_ARCHS, PretrainSpec

_PREFIX = "equislide pretrain"
_D = PretrainSpec(data=("-",), out="-.safetensors")


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``pretrain`` on the CLI's subparsers."""
    p = subparsers.add_parser(
        "pretrain",
        help="train a backbone (supervised on class folders, or self-supervised on your tissue)",
        description=(
            "Train a backbone whose weights `segment --weights` uses. Supervised (default): DATA is an "
            "ImageFolder (one sub-folder per class, e.g. NCT-CRC-HE-100K), trained with cross-entropy; "
            "--val scores accuracy with the validation images rotated by 0, 90 and 30 degrees. "
            "Self-supervised (--self-supervised, BYOL): DATA is slides, images, folders of them or tile "
            "stores of an earlier run; tissue tiles are cut at --mpp (mostly-glass tiles dropped) and "
            "--val, when labelled, scores k-NN accuracy. Writes WEIGHTS.safetensors and WEIGHTS.json "
            "(recipe, command, data summary, metrics) and a training state after every epoch in "
            "WEIGHTS.train/ that --resume continues exactly. Uses CUDA when present (bf16 autocast), else "
            "every CPU core; under torchrun, one DDP process per GPU. Exit status 0 when the weights "
            "were written, 1 on a fault during training (rerun with --resume), 2 on a usage error or "
            "unusable data."
        ),
    )
    p.add_argument(
        "data", nargs="+", metavar="DATA", help="ImageFolder; or slides, images, folders, tile stores"
    )
    p.add_argument("--out", required=True, metavar="WEIGHTS.safetensors", help="weights file to write")
    p.add_argument(
        "--arch", choices=sorted(PRETRAIN_ARCHS), default="srenet18", help="backbone (default srenet18)"
    )
    p.add_argument("--rings", choices=("hard", "soft"), default=None, help="SRENet rings (default hard)")
    p.add_argument("--width", type=int, default=None, help="stage-1 channels (default 64)")
    p.add_argument("--self-supervised", action="store_true", help="BYOL on unlabelled tissue tiles")
    p.add_argument("--epochs", type=int, default=_D.epochs, help=f"epochs (default {_D.epochs})")
    p.add_argument(
        "--batch-size", type=int, default=_D.batch_size, help=f"images per step (default {_D.batch_size})"
    )
    p.add_argument(
        "--lr", type=float, default=_D.lr, help=f"peak learning rate, cosine to 0 (default {_D.lr:g})"
    )
    p.add_argument(
        "--weight-decay",
        type=float,
        default=_D.weight_decay,
        help=f"SGD weight decay (default {_D.weight_decay:g})",
    )
    p.add_argument(
        "--input-size", type=int, default=_D.input_size, help=f"image side, px (default {_D.input_size})"
    )
    p.add_argument(
        "--rotation-augment", action="store_true", help="add rotations by any angle to the augmentations"
    )
    p.add_argument("--val", default=None, metavar="DIR", help="labelled ImageFolder scored after every epoch")
    p.add_argument("--resume", action="store_true", help="continue from the latest state in WEIGHTS.train/")
    p.add_argument(
        "--device", default="auto", help="auto (CUDA when present), cpu, cuda:0 ... (default auto)"
    )
    p.add_argument(
        "--precision",
        choices=("auto", "fp32", "bf16", "fp16"),
        default="auto",
        help="autocast: auto = bf16 on CUDA, fp32 on CPU",
    )
    p.add_argument("--seed", type=int, default=0, help="seeds initialisation, data order and augmentations")
    p.add_argument(
        "--mpp",
        type=float,
        default=_D.mpp,
        help=f"µm/px tissue tiles are cut at (default {_D.mpp:g}, NCT-CRC's)",
    )
    p.add_argument(
        "--input-mpp",
        type=float,
        default=None,
        metavar="X",
        help="µm per level-0 px of inputs without a usable resolution (default: use them at native pixels)",
    )
    p.add_argument(
        "--max-tiles",
        type=int,
        default=_D.max_tiles,
        help=f"most self-supervised tiles, spread over the inputs (default {_D.max_tiles})",
    )
    p.add_argument(
        "--weights-dtype",
        choices=("float32", "float16"),
        default="float32",
        help="dtype of the saved weights (float16: half the size, for shipping)",
    )
    return p


def _model_kwargs(args) -> dict:
    kwargs: dict = {}
    if args.rings is not None:
        if args.arch != "srenet18":
            raise ValueError(f"--rings applies to srenet18, not {args.arch}")
        kwargs["rings"] = args.rings
    if args.width is not None:
        if args.width < 1:
            raise ValueError(f"--width {args.width} must be >= 1")
        kwargs["width"] = args.width
    return kwargs


def _check(args) -> str | None:
    from pathlib import Path

    from equislide.commands._common import check_seed
    from equislide.tiling._mpp import check_user_mpp

    if not args.out.endswith(".safetensors"):
        return f"--out {args.out} must end in .safetensors (a .json config is written beside it)"
    parent = Path(args.out).parent
    if parent.exists() and not parent.is_dir():
        return f"--out {args.out}: {parent} is not a folder"
    for d in args.data:
        if not Path(d).exists():
            return f"{d}: no such file or folder"
    if args.val is not None and not Path(args.val).is_dir():
        return f"--val {args.val}: not a folder"
    if args.input_mpp is not None:
        problem = check_user_mpp(args.input_mpp, "--input-mpp")
        if problem:
            return problem
    return check_seed(args.seed)


def run(args) -> int:
    """Validate the options, train, and print where the weights went."""
    from equislide.commands._common import usage_error

    problem = _check(args)
    if problem:
        return usage_error(_PREFIX, problem)
    try:
        spec = PretrainSpec(
            data=tuple(args.data),
            out=args.out,
            arch=PRETRAIN_ARCHS[args.arch],
            model_kwargs=_model_kwargs(args),
            self_supervised=args.self_supervised,
            epochs=args.epochs,
            batch_size=args.batch_size,
            lr=args.lr,
            weight_decay=args.weight_decay,
            input_size=args.input_size,
            rotation_augment=args.rotation_augment,
            seed=args.seed,
            precision=args.precision,
            val=args.val,
            resume=args.resume,
            device=args.device,
            mpp=args.mpp,
            input_mpp=args.input_mpp,
            max_tiles=args.max_tiles,
            weights_dtype=args.weights_dtype,
            command=tuple(getattr(args, "_argv", ["equislide", "pretrain", *args.data])),
        )
        spec.recipe()  # the recipe's own checks (batch size, input size...) before any data is read
    except ValueError as err:
        from equislide.text import one_line

        return usage_error(_PREFIX, one_line(err))
    return _train(spec)


def _train(spec: PretrainSpec) -> int:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from equislide.commands._common import fault_line, one_line_logs, usage_error
    from equislide.models._errors import CheckpointError, ModelConfigError, TrainingDataError
    from equislide.stages.pretrain import pretrain
    from equislide.text import one_line, path_text

    console = Console(stderr=True)
    progress = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]}  {task.fields[rate]} img/s"),
        TimeElapsedColumn(),
        console=console,
        transient=False,
    )
    task = {"id": None}

    def on_data(summary: dict) -> None:
        n = summary.get("n_images", summary.get("n_tiles"))
        counts = summary.get("class_counts")
        what = (
            ", ".join(f"{k} {v}" for k, v in counts.items())
            if counts
            else f"{len(summary.get('inputs', []))} input(s)"
        )
        console.print(f"{_PREFIX}: {n} training images ({what})", markup=False, highlight=False)

    def on_step(info) -> None:
        if task["id"] is None:
            task["id"] = progress.add_task("", total=info.steps, loss="-", rate="-")
        progress.update(
            task["id"],
            description=f"epoch {info.epoch}/{spec.epochs}",
            completed=info.step,
            total=info.steps,
            loss=f"{info.loss:.4f}",
            rate=f"{info.images_per_s:.1f}",
        )

    def on_epoch(m: dict) -> None:
        task["id"] = None
        shown = {
            k: v
            for k, v in m.items()
            if k.startswith("val_") or k in ("loss", "train_accuracy", "images_per_s")
        }
        text = "  ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in shown.items())
        progress.console.print(f"epoch {m['epoch']}: {text}", markup=False, highlight=False)

    try:
        with one_line_logs(), progress:
            result = pretrain(spec, on_step=on_step, on_epoch=on_epoch, on_data=on_data)
    except (TrainingDataError, CheckpointError, ModelConfigError) as err:
        return usage_error(_PREFIX, one_line(err))
    except Exception as err:  # noqa: BLE001 - a fault mid-training: one line; the saved states remain
        print(f"{_PREFIX}: error: {fault_line(err)}; rerun with --resume to continue", file=sys.stderr)
        return 1
    for w in result.warnings:
        print(f"{_PREFIX}: warning: {one_line(w)}", file=sys.stderr)
    last = result.history[-1] if result.history else {}
    print(
        f"wrote {path_text(result.weights)} ({len(result.history)} epochs, final loss "
        f"{last.get('loss', float('nan')):.4f}); training states in {path_text(result.state_dir)}"
    )
    return 0
