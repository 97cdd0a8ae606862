"""Default weights shipped inside the package, and the registry that says which backbone uses them.

The package folder ``equislide/weights/`` (carried by the wheel) holds ``defaults.json``::

    {
      "format": "equislide-default-weights", "format_version": 1,
      "backbones": {
        "srenet18": {"file": "srenet18.safetensors", "sha256": "<hex>", "default": true,
                     "batchnorm": "trained", "why": "demo ARI 0.81 vs 0.71 random, ..."}
      }
    }

and each listed checkpoint (``save_checkpoint``'s ``.safetensors`` with its ``.json`` beside it). A
backbone is resolved to packaged weights only when its entry says ``"default": true``: weights that did
not beat the seeded random initialisation may ship for comparison without being used. ``batchnorm``
is ``"trained"`` (the statistics are used as trained; the default) or ``"recalibrate"`` (recalibrated
on each cohort like random weights, for weights where that was measured to help).

The folder is the package's unless ``EQUISLIDE_WEIGHTS_DIR`` (or the ``directory`` argument) names
another, so tests and deployments can supply their own registry without touching the installation.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from equislide.files import sha256_file
from equislide.models._errors import DefaultWeightsError

__all__ = [
    "REGISTRY_FORMAT",
    "REGISTRY_NAME",
    "WEIGHTS_DIR_ENV",
    "PackagedWeights",
    "default_weights",
    "packaged_weights",
    "read_registry",
    "weights_dir",
]

REGISTRY_FORMAT = "equislide-default-weights"
REGISTRY_VERSION = 1
REGISTRY_NAME = "defaults.json"
#: Environment variable naming a folder that replaces the package's ``equislide/weights``.
WEIGHTS_DIR_ENV = "EQUISLIDE_WEIGHTS_DIR"
_BATCHNORM = ("trained", "recalibrate")


@dataclass(frozen=True)
class PackagedWeights:
    """One registry entry that is the default of its backbone, its file verified.

    Attributes:
        backbone: Registered model name.
        path: The ``.safetensors`` checkpoint (its ``.json`` config beside it).
        name: The file name, as the registry gives it (what provenance records).
        sha256: Its SHA-256, checked against the registry.
        recalibrate: BatchNorm is recalibrated on the cohort (``"batchnorm": "recalibrate"``).
        why: The registry's reason for making it the default.
    """

    backbone: str
    path: Path
    name: str
    sha256: str
    recalibrate: bool
    why: str

    def label(self) -> str:
        """``packaged:<name> (sha256 <first 12 hex>)``, how notes and summaries name these weights."""
        return f"packaged:{self.name} (sha256 {self.sha256[:12]})"


def weights_dir(directory: str | os.PathLike[str] | None = None) -> Path:
    """The folder holding ``defaults.json``: ``directory``, else ``$EQUISLIDE_WEIGHTS_DIR``, else the
    package's ``equislide/weights``."""
    if directory is not None:
        return Path(directory)
    env = os.environ.get(WEIGHTS_DIR_ENV)
    if env:
        return Path(env)
    # The wheel installs package data as plain files; a zipped install is not supported.
    return Path(str(resources.files("equislide").joinpath("weights")))


def read_registry(directory: str | os.PathLike[str] | None = None) -> dict[str, dict[str, Any]]:
    """The registry's ``backbones`` mapping, every entry checked for its fields (files are not read).

    Raises:
        DefaultWeightsError: no registry, an empty or non-JSON file, a wrong format, or a bad entry.
    """
    folder = weights_dir(directory)
    path = folder / REGISTRY_NAME
    if not path.is_file():
        where = f" (${WEIGHTS_DIR_ENV})" if directory is None and os.environ.get(WEIGHTS_DIR_ENV) else ""
        raise DefaultWeightsError(f"{path}: no default-weights registry in {folder}{where}")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise DefaultWeightsError(f"{path}: cannot read the default-weights registry ({err})") from None
    if not text.strip():
        raise DefaultWeightsError(f"{path}: the default-weights registry is empty")
    try:
        doc = json.loads(text)
    except ValueError as err:
        raise DefaultWeightsError(f"{path}: the default-weights registry is not JSON ({err})") from None
    if not isinstance(doc, dict) or doc.get("format") != REGISTRY_FORMAT:
        raise DefaultWeightsError(
            f"{path}: not an {REGISTRY_FORMAT} registry (no 'format': {REGISTRY_FORMAT!r})"
        )
    version = doc.get("format_version")
    if not isinstance(version, int) or version > REGISTRY_VERSION:
        raise DefaultWeightsError(
            f"{path}: format_version {version!r} is not supported (this equislide reads up to "
            f"{REGISTRY_VERSION}); upgrade equislide"
        )
    backbones = doc.get("backbones")
    if not isinstance(backbones, dict):
        raise DefaultWeightsError(f"{path}: 'backbones' must be an object of backbone -> entry")
    for name, entry in backbones.items():
        problem = _entry_problem(entry)
        if problem:
            raise DefaultWeightsError(f"{path}: entry {name!r}: {problem}")
    return backbones


def _entry_problem(entry: Any) -> str | None:
    if not isinstance(entry, dict):
        return "must be an object"
    file = entry.get("file")
    if not isinstance(file, str) or not file.endswith(".safetensors") or Path(file).name != file:
        return "'file' must be a .safetensors file name in the registry's folder"
    sha = entry.get("sha256")
    if not isinstance(sha, str) or len(sha) != 64 or any(c not in "0123456789abcdef" for c in sha):
        return "'sha256' must be 64 lowercase hex digits"
    if not isinstance(entry.get("default"), bool):
        return "'default' must be true or false"
    if entry.get("batchnorm", "trained") not in _BATCHNORM:
        return f"'batchnorm' must be one of {', '.join(_BATCHNORM)}"
    return None


def packaged_weights(
    backbone: str, *, directory: str | os.PathLike[str] | None = None
) -> PackagedWeights | None:
    """The packaged default weights of ``backbone``, their file and checksum verified; None when the
    registry makes none the default (today's case for every backbone).

    Raises:
        DefaultWeightsError: the registry is unusable (:func:`read_registry`), or the default's file is
            missing or its SHA-256 is not the registry's.
    """
    entry = read_registry(directory).get(backbone)
    if entry is None or not entry["default"]:
        return None
    path = weights_dir(directory) / entry["file"]
    if not path.is_file():
        raise DefaultWeightsError(
            f"{path}: default weights of {backbone} listed in {REGISTRY_NAME} are missing"
        )
    digest = sha256_file(path)
    if digest != entry["sha256"]:
        raise DefaultWeightsError(
            f"{path}: sha256 {digest} is not {entry['sha256']} as {REGISTRY_NAME} records; the packaged "
            "default weights were altered or replaced"
        )
    return PackagedWeights(
        backbone=backbone,
        path=path,
        name=entry["file"],
        sha256=digest,
        recalibrate=entry.get("batchnorm", "trained") == "recalibrate",
        why=str(entry.get("why", "")),
    )


def default_weights(backbone: str, *, directory: str | os.PathLike[str] | None = None) -> Path | None:
    """Path of ``backbone``'s packaged default checkpoint (verified), or None when there is none.

    Raises:
        DefaultWeightsError: as :func:`packaged_weights`.
    """
    found = packaged_weights(backbone, directory=directory)
    return None if found is None else found.path
