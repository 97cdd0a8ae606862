"""Helpers shared by the subcommands: the progress bar and checks of common options."""

from __future__ import annotations

import sys
from pathlib import Path

__all__ = ["add_mpp_arguments", "check_mpp_arguments", "check_out_dir", "progress_bar", "usage_error"]

#: Default of ``--max-tiles`` (:data:`equislide.tiling.MAX_TILES`, not imported: the CLI starts fast).
_MAX_TILES = 100_000


def usage_error(prefix: str, message: str) -> int:
    """Print ``<prefix>: error: <message>`` on stderr; returns exit status 2."""
    print(f"{prefix}: error: {message}", file=sys.stderr)
    return 2


def check_out_dir(out: Path) -> str | None:
    """Create the output folder; the problem in words, or None when it is usable."""
    if out.exists() and not out.is_dir():
        return f"--out {out} exists and is not a folder"
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        return f"--out {out}: cannot create the folder ({err.strerror})"
    return None


def progress_bar():
    """A rich progress display on stderr (description, bar, done/total, elapsed)."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=Console(stderr=True),
        transient=False,
    )


def add_mpp_arguments(p, *, cohort: bool = False) -> None:
    """``--input-mpp``, ``--force-mpp``, ``--native-pixels`` and ``--max-tiles`` (``tile``,
    ``segment``); with ``cohort``, ``--fit-native`` too. The rules: README, "Inputs and resolution"."""
    group = p.add_mutually_exclusive_group()
    group.add_argument(
        "--input-mpp",
        type=float,
        default=None,
        metavar="X",
        help="µm per level-0 pixel for inputs whose metadata has no usable resolution; usable "
        "metadata wins (a warning says when X contradicts it)",
    )
    group.add_argument(
        "--force-mpp",
        type=float,
        default=None,
        metavar="X",
        help="µm per level-0 pixel of every input, replacing its metadata (warned where they disagree)",
    )
    p.add_argument(
        "--native-pixels",
        action="store_true",
        help="process inputs without a usable resolution at native level-0 pixels instead of refusing "
        "them (the analysis --mpp is not applied to them"
        + ("; a cohort K-means fit leaves them out unless --fit-native)" if cohort else ")"),
    )
    if cohort:
        p.add_argument(
            "--fit-native",
            action="store_true",
            help="with --native-pixels and --fit cohort: pool native-pixel samples into the cohort "
            "K-means fit too (default: they are labelled by the model of the others)",
        )
    p.add_argument(
        "--max-tiles",
        type=int,
        default=_MAX_TILES,
        metavar="N",
        help=f"refuse a slide planned to more than N tiles (default {_MAX_TILES})",
    )


def check_mpp_arguments(args) -> str | None:
    """The first problem with the options of :func:`add_mpp_arguments`, in words; None when usable."""
    from equislide.tiling._mpp import check_user_mpp

    for flag, value in (("--input-mpp", args.input_mpp), ("--force-mpp", args.force_mpp)):
        if value is not None:
            problem = check_user_mpp(value, flag)
            if problem:
                return problem
    if args.max_tiles < 1:
        return f"--max-tiles {args.max_tiles} must be >= 1"
    if getattr(args, "fit_native", False) and not args.native_pixels:
        return "--fit-native needs --native-pixels (without it no sample is at native pixels)"
    return None
