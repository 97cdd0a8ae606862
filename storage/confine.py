"""Outputs stay inside the run folder: no symlink, sample ID or name leads a write outside it.

Sample IDs cannot traverse folders (:mod:`equislide.storage.ids` rejects ``..``, absolute names and
``/`` beyond ``<slide>/<core>``), but the folders a run writes into may already exist: a symlink
``OUT/samples -> /elsewhere`` planted (or left) there would send every overlay elsewhere, and the
clean-up of a killed run's partial stores would delete files there. So a run first checks the tree
it will write into (:func:`check_output_tree`), and each writer checks its own target against the
folder it was given (:func:`confined`), resolving symlinks, since a symlink can appear between the two.
The run folder itself may sit behind a symlink (``--out`` is the user's choice); only what lies
under it is held to it.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["OutsideOutputError", "check_output_tree", "confined"]


class OutsideOutputError(OSError):
    """A write would land outside the run's output folder (through a symlink or an unsafe name)."""


def _real(path: Path) -> Path:
    return Path(os.path.realpath(path))


def confined(root: str | Path, path: str | Path) -> Path:
    """``path`` (absolute, or relative to ``root``) once checked to resolve inside ``root``.

    Raises:
        OutsideOutputError: It resolves outside ``root``; the message names both.
    """
    root = Path(root)
    path = Path(path) if Path(path).is_absolute() else root / path
    real_root, real = _real(root), _real(path)
    if real != real_root and real_root not in real.parents:
        shown = "" if real == path else f" (it resolves to {real})"
        raise OutsideOutputError(
            f"refusing to write {path}{shown}: outside the output folder {root}; "
            "outputs are only written inside --out"
        )
    return path


def check_output_tree(root: str | Path) -> None:
    """Check every symlink under ``root`` (folders not followed) leads inside it.

    A run calls this before it writes or deletes anything below ``root``. Symlinks inside zarr stores
    count too: features are written into existing tile stores.

    Raises:
        OutsideOutputError: The first symlink leading outside (dangling ones by where they point),
            named with its target.
    """
    root = Path(root)
    real_root = _real(root)
    for folder, dirs, files in os.walk(root, followlinks=False):
        for name in sorted(dirs) + sorted(files):
            path = Path(folder) / name
            if not path.is_symlink():
                continue
            real = _real(path)
            if real != real_root and real_root not in real.parents:
                raise OutsideOutputError(
                    f"{path} is a symlink to {os.readlink(path)}, outside the output folder {root}: "
                    "outputs are only written inside --out; replace it with a folder or remove it"
                )
