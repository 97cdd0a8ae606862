"""Training state on disk: a safetensors file of tensors plus a JSON document, never a pickle.

``<weights>.train/epoch-0003.safetensors`` (+ ``.json``) holds everything :class:`~.training.Trainer`
needs to continue after epoch 3: the tensors of :meth:`~.training.Trainer.state_tensors` and a document
with the recipe, the counters, the metrics so far and the data summary. It is written by the same
atomic writer as the weights (:func:`~.checkpoint.write_document`), so a crash mid-write leaves the
previous epoch's state intact.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import torch

from equislide.models._errors import CheckpointError
from equislide.models.checkpoint import load_tensors, read_document, write_document

__all__ = ["STATE_FORMAT", "latest_state", "read_training_state", "state_path", "write_training_state"]

STATE_FORMAT = "equislide-training-state"
STATE_FORMAT_VERSION = 1
_KEY = "equislide_training_state"
_NAME = re.compile(r"^epoch-(\d{4,})\.safetensors$")


def state_path(folder: str | os.PathLike[str], epoch: int) -> Path:
    """The state file of ``epoch`` in ``folder``."""
    return Path(folder) / f"epoch-{epoch:04d}.safetensors"


def latest_state(folder: str | os.PathLike[str]) -> Path | None:
    """The state file of the highest epoch in ``folder`` (None: no state there)."""
    folder = Path(folder)
    if not folder.is_dir():
        return None
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _NAME.match(p.name))]
    return max(found)[1] if found else None


def write_training_state(
    path: str | os.PathLike[str], tensors: dict[str, torch.Tensor], document: dict
) -> Path:
    """Write a state file and its sidecar (the document gains ``format`` and ``format_version``)."""
    doc = {"format": STATE_FORMAT, "format_version": STATE_FORMAT_VERSION, **document}
    return write_document(path, tensors, key=_KEY, document=doc, what="training state")


def _check(document: Any, source: Path) -> None:
    if not isinstance(document, dict) or document.get("format") != STATE_FORMAT:
        raise CheckpointError(
            f"{source}: not an {STATE_FORMAT} file (model weights are not a training state; resume from "
            "the epoch-NNNN.safetensors files beside them)"
        )
    version = document.get("format_version")
    if not isinstance(version, int) or version > STATE_FORMAT_VERSION:
        raise CheckpointError(
            f"{source}: training-state format_version {version!r} is newer than this equislide"
        )
    for key in ("recipe", "epoch", "step"):
        if key not in document:
            raise CheckpointError(f"{source}: training state has no {key!r}")


def read_training_state(path: str | os.PathLike[str]) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The document and tensors of a state file, checked (header, format, checksum) before use.

    Raises:
        CheckpointError: missing, a folder, empty, truncated, a pickle, foreign, or changed since written.
    """
    document, weights = read_document(
        path, key=_KEY, check=_check, kind="equislide training state", writer="equislide pretrain"
    )
    return document, load_tensors(weights)
