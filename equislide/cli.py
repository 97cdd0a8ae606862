"""The ``equislide`` command line.

Each subcommand lives in ``equislide/commands/<name>.py`` with ``add_parser(subparsers)`` and
``run(args) -> int``; heavy imports (torch, zarr, prefect) happen inside ``run`` so ``--help`` is fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from equislide._version import __version__

# Order is the order shown by --help.
COMMANDS = ("demo", "selfcheck", "phantom", "tile", "segment", "consistency", "pretrain")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="equislide",
        description=(
            "Label-free, rotation-consistent tissue segmentation of whole slides and TMA cores with "
            "rotation-equivariant SRENet features."
        ),
    )
    parser.add_argument("--version", action="version", version=f"equislide {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        module = importlib.import_module(f"equislide.commands.{name}")
        cmd = module.add_parser(sub)
        cmd.set_defaults(_run=module.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the console script; returns the process exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    # The exact command line, for provenance (pretrain records it in the weights' config).
    args._argv = ["equislide", *(sys.argv[1:] if argv is None else list(argv))]
    if not getattr(args, "command", None):
        parser.print_help()
        return 2
    try:
        return int(args._run(args))
    except KeyboardInterrupt:
        print("equislide: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
