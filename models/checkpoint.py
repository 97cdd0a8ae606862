"""Checkpoints: weights as safetensors plus a JSON config that rebuilds the model.

A checkpoint ``model.safetensors`` has a sidecar ``model.json`` beside it::

    {
      "format": "equislide-checkpoint", "format_version": 1,
      "model": {"arch": "srenet18", "width": 64, ...},   # create_model(arch, **rest)
      "num_parameters": 4012345,
      "tensors": {"stem.0.weight": {"dtype": "float32", "shape": [64, 3, 4]}, ...},
      "versions": {"equislide": "0.1.0", "torch": "2.13.0", "safetensors": "0.8.0"},
      "provenance": {...},                                 # whatever the caller passed
      "weights": "model.safetensors", "sha256": "..."      # the sidecar only
    }

The same document, less ``weights`` and ``sha256`` (a file cannot hold its own hash), is stored in
the safetensors metadata under ``equislide_config``, so a lone ``.safetensors`` file still loads.
Nothing is ever unpickled: files are checked to be safetensors before a byte of them is parsed as
anything else, and pickles renamed ``.safetensors`` are named as such and refused.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import safetensors
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from equislide._version import __version__
from equislide.files import atomic_path, atomic_write_json, sha256_file
from equislide.models._errors import CheckpointError, ModelConfigError
from equislide.models._registry import create_model, list_models
from equislide.text import one_line

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "METADATA_KEY",
    "load_checkpoint",
    "load_tensors",
    "read_checkpoint_document",
    "read_document",
    "save_checkpoint",
    "write_document",
]

FORMAT_NAME = "equislide-checkpoint"
FORMAT_VERSION = 1
#: Key of the config document in the safetensors header's ``__metadata__``.
METADATA_KEY = "equislide_config"

_WEIGHTS_SUFFIX = ".safetensors"
_CONFIG_SUFFIX = ".json"
# safetensors caps its JSON header at 100 MB; anything claiming more is not a safetensors file.
_MAX_HEADER_BYTES = 100_000_000
_NAMES_SHOWN = 5


def save_checkpoint(
    model: nn.Module,
    path: str | os.PathLike[str],
    *,
    provenance: dict | None = None,
    dtype: torch.dtype | None = None,
) -> Path:
    """Write ``model``'s weights to ``path`` (safetensors) and its config beside it (``.json``).

    Args:
        model: A registered backbone: it must have a ``config`` dict whose ``"arch"`` names a
            builder in the registry and whose other entries are that builder's keyword arguments.
        path: Weights file; its suffix must be ``.safetensors``. The config goes to the same path
            with the suffix ``.json``. Parent folders are created; existing files are replaced.
        provenance: JSON-serialisable facts about the weights (data trained on, seed, date, ...);
            dates and paths are written as ISO strings and plain strings.
        dtype: Store floating tensors in this dtype (``torch.float16`` halves a shipped file);
            None keeps each tensor's own. Integer tensors (BatchNorm counters) are never cast. The
            config's ``tensors`` entries and ``stored_dtype`` record what the file holds;
            :func:`load_checkpoint` casts back to the model's dtype.

    Returns:
        The weights path.

    Raises:
        CheckpointError: ``path`` has the wrong suffix, the model has no usable ``config``, or the
            config or provenance cannot be written as JSON.
    """
    path = Path(path)
    if path.suffix != _WEIGHTS_SUFFIX:
        raise CheckpointError(f"{path}: a checkpoint path must end in {_WEIGHTS_SUFFIX!r}")
    config = getattr(model, "config", None)
    if not isinstance(config, dict) or not isinstance(config.get("arch"), str):
        raise CheckpointError(
            f"{path}: {type(model).__name__} has no config dict with an 'arch'; only models built by "
            "equislide.models.create_model can be saved"
        )
    if config["arch"] not in list_models():
        raise CheckpointError(
            f"{path}: model arch {config['arch']!r} is not registered, so it could not be rebuilt"
        )

    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise CheckpointError(f"{path}: dtype={dtype!r} is not a floating torch dtype (e.g. torch.float16)")
    # Own, contiguous CPU copies: safetensors refuses views and tensors sharing storage.
    tensors = {name: t.detach().to("cpu", copy=True).contiguous() for name, t in model.state_dict().items()}
    if dtype is not None:
        tensors = {n: t.to(dtype) if t.is_floating_point() else t for n, t in tensors.items()}
    document: dict[str, Any] = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "model": dict(config),
        "num_parameters": sum(p.numel() for p in model.parameters()),
        "tensors": {
            name: {"dtype": str(t.dtype).removeprefix("torch."), "shape": list(t.shape)}
            for name, t in tensors.items()
        },
        "versions": {
            "equislide": __version__,
            "torch": torch.__version__,
            "safetensors": safetensors.__version__,
        },
        "provenance": dict(provenance or {}),
    }
    if dtype is not None:
        document["stored_dtype"] = str(dtype).removeprefix("torch.")
    return write_document(path, tensors, key=METADATA_KEY, document=document, what="config or provenance")


def load_checkpoint(path: str | os.PathLike[str], *, map_location: str | torch.device = "cpu") -> nn.Module:
    """Rebuild a model saved by :func:`save_checkpoint` and load its weights.

    Args:
        path: The ``.safetensors`` weights or the ``.json`` config beside them. Without the JSON
            the config embedded in the weights' metadata is used (and no checksum is checked).
        map_location: Device the returned model lives on.

    Returns:
        The model, in eval mode, with every tensor loaded exactly (strict: no missing, unexpected
        or reshaped tensors).

    Raises:
        CheckpointError: the file is missing, a folder, empty, truncated, not safetensors (a
            pickle, say), foreign (no equislide config), of an unknown arch or format version,
            fails its checksum, or does not match the rebuilt model's tensors.
        OptionalDependencyError: the arch needs an extra that is not installed.
    """
    document, weights_path = read_document(
        path, key=METADATA_KEY, check=_check_document, kind="equislide config", writer="save_checkpoint"
    )
    model = _build(document, Path(path))
    tensors = load_tensors(weights_path)
    _check_tensors(model, tensors, weights_path)
    # A file stored in float16 (shipped weights) is cast back to the dtype the model computes in.
    expected = model.state_dict()
    tensors = {
        k: t.to(expected[k].dtype) if t.is_floating_point() and expected[k].is_floating_point() else t
        for k, t in tensors.items()
    }
    model.load_state_dict(tensors, strict=True)
    return model.to(map_location).eval()


def read_checkpoint_document(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The config document of a checkpoint, checked as :func:`load_checkpoint` checks it (header,
    format, arch, checksum against the sidecar) but without parsing or loading its tensors: cheap
    enough to vet a ``--weights`` option before any work starts.

    Raises:
        CheckpointError: as :func:`load_checkpoint`, except for tensors that do not match the model.
    """
    document, _ = read_document(
        path, key=METADATA_KEY, check=_check_document, kind="equislide config", writer="save_checkpoint"
    )
    return document


def _check_is_file(path: Path) -> None:
    if not path.exists():
        raise CheckpointError(f"{path}: no such file")
    if path.is_dir():
        raise CheckpointError(f"{path}: is a directory, not a checkpoint file")


def _read_safetensors_header(path: Path) -> dict[str, Any]:
    """Validate the safetensors framing of ``path`` and return its JSON header.

    The layout is an 8-byte little-endian header length ``n``, ``n`` bytes of JSON, then the data
    whose extent the header gives; a file that breaks any of this is refused before safetensors
    (let alone anything else) parses it.
    """
    size = path.stat().st_size
    if size == 0:
        raise CheckpointError(f"{path}: empty file (0 bytes)")
    with path.open("rb") as fh:
        prefix = fh.read(8)
        if len(prefix) < 8:
            raise CheckpointError(f"{path}: truncated: {size} bytes is too short for a safetensors header")
        (n,) = struct.unpack("<Q", prefix)
        first = fh.read(1)
        if n > _MAX_HEADER_BYTES or first != b"{":
            raise CheckpointError(f"{path}: not a safetensors file ({_sniff(prefix)})")
        if 8 + n > size:
            raise CheckpointError(f"{path}: truncated: header claims {n} bytes but the file has {size}")
        raw = first + fh.read(n - 1)
    try:
        header = json.loads(raw)
    except ValueError:
        raise CheckpointError(f"{path}: not a safetensors file (its header is not JSON)") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: not a safetensors file (its header is not a JSON object)")
    try:
        data_end = max(
            (int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0
        )
    except (TypeError, KeyError, IndexError, ValueError):
        raise CheckpointError(f"{path}: not a safetensors file (malformed tensor entries)") from None
    if 8 + n + data_end > size:
        raise CheckpointError(
            f"{path}: truncated: tensors need {8 + n + data_end} bytes but the file has {size}"
        )
    return header


def _sniff(prefix: bytes) -> str:
    if prefix.startswith(b"PK\x03\x04"):
        return "it is a zip archive, as torch.save writes; equislide never unpickles such files"
    if prefix[:1] == b"\x80" and prefix[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
        return "it is a Python pickle (a legacy torch.save .pt?); equislide never unpickles it"
    return f"unrecognised leading bytes {prefix!r}"


def _read_sidecar(config_path: Path) -> dict[str, Any]:
    try:
        document = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise CheckpointError(f"{config_path}: not a readable JSON config: {one_line(err)}") from None
    return document


def _check_document(document: Any, source: Path) -> None:
    if not isinstance(document, dict) or document.get("format") != FORMAT_NAME:
        raise CheckpointError(f"{source}: not an {FORMAT_NAME} config (no 'format': {FORMAT_NAME!r})")
    version = document.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise CheckpointError(
            f"{source}: format_version {version!r} is not supported (this equislide reads up to "
            f"{FORMAT_VERSION}); upgrade equislide"
        )
    model = document.get("model")
    if not isinstance(model, dict) or not isinstance(model.get("arch"), str):
        raise CheckpointError(f"{source}: config has no 'model' entry with an 'arch'")


#: Builder arguments whose default changed, with the value every checkpoint written before it meant.
_LEGACY_DEFAULTS = {"e2cnn_resnet18": {"downsample": "stride", "group": "C8"}}


def _build(document: dict[str, Any], source: Path) -> nn.Module:
    kwargs = dict(document["model"])
    arch = kwargs.pop("arch")
    for key, value in _LEGACY_DEFAULTS.get(arch, {}).items():
        kwargs.setdefault(key, value)  # a config from before the option existed: build what it was
    try:
        return create_model(arch, **kwargs)
    except ModelConfigError as err:
        if arch not in list_models():
            raise CheckpointError(
                f"{source}: unknown arch {arch!r}; known: {', '.join(list_models())}"
            ) from None
        raise CheckpointError(f"{source}: cannot rebuild {arch!r}: {one_line(err)}") from None
    except TypeError as err:
        raise CheckpointError(
            f"{source}: cannot rebuild {arch!r} from its config: {one_line(err)}"
        ) from None


def _check_tensors(model: nn.Module, tensors: dict[str, torch.Tensor], source: Path) -> None:
    expected = model.state_dict()
    problems = []
    missing = sorted(set(expected) - set(tensors))
    if missing:
        problems.append(f"missing {_names(missing)}")
    unexpected = sorted(set(tensors) - set(expected))
    if unexpected:
        problems.append(f"unexpected {_names(unexpected)}")
    reshaped = [
        f"{k} {list(tensors[k].shape)} vs model {list(v.shape)}"
        for k, v in expected.items()
        if k in tensors and tensors[k].shape != v.shape
    ]
    if reshaped:
        problems.append(f"shape mismatch {_names(reshaped)}")
    if problems:
        arch = getattr(model, "config", {}).get("arch", type(model).__name__)
        raise CheckpointError(f"{source}: tensors do not match {arch}: " + "; ".join(problems))


def _names(names: list[str]) -> str:
    shown = ", ".join(names[:_NAMES_SHOWN])
    more = len(names) - _NAMES_SHOWN
    return f"{shown} (and {more} more)" if more > 0 else shown


def write_document(
    path: str | os.PathLike[str], tensors: dict[str, torch.Tensor], *, key: str, document: dict, what: str
) -> Path:
    """Write ``tensors`` as safetensors with ``document`` embedded under metadata ``key``, and a sidecar.

    The sidecar (same path, suffix ``.json``) is the document plus ``weights`` (the file name) and
    ``sha256`` (of the safetensors file). Both files are written atomically, the weights first, so a
    sidecar never names weights that are not there. Networks (:func:`save_checkpoint`) and K-means
    models (:meth:`~equislide.models.KMeansModel.save`) share this one writer.

    Raises:
        CheckpointError: ``document`` cannot be written as JSON (``what`` names the offending part).
    """
    path = Path(path)
    try:
        embedded = json.dumps(document, default=_json_default, sort_keys=True)
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"{path}: {what} is not JSON-serialisable: {err}") from None
    with atomic_path(path) as tmp:
        save_file(tensors, tmp, metadata={key: embedded})
    sidecar = json.loads(embedded)
    sidecar["weights"] = path.name
    sidecar["sha256"] = sha256_file(path)
    atomic_write_json(path.with_suffix(_CONFIG_SUFFIX), sidecar, indent=2)
    return path


def read_document(
    path: str | os.PathLike[str],
    *,
    key: str,
    check: Callable[[Any, Path], None],
    kind: str,
    writer: str,
) -> tuple[dict[str, Any], Path]:
    """The document of a file written by :func:`write_document`, and the weights' path.

    ``path`` is the ``.safetensors`` file or its ``.json`` sidecar. With the sidecar, its checksum of
    the weights is verified; without, the document embedded in the weights' metadata is used (no
    checksum). ``check(document, source)`` validates the document (raising :class:`CheckpointError`).

    Raises:
        CheckpointError: wrong suffix, missing, a folder, empty, truncated, not safetensors (a pickle,
            say), foreign (no ``key`` metadata and no sidecar), unreadable sidecar, or a checksum that
            does not match.
    """
    path = Path(path)
    if path.suffix == _CONFIG_SUFFIX:
        config_path, weights_path = path, path.with_suffix(_WEIGHTS_SUFFIX)
    elif path.suffix == _WEIGHTS_SUFFIX:
        config_path, weights_path = path.with_suffix(_CONFIG_SUFFIX), path
    else:
        raise CheckpointError(
            f"{path}: expected a {_WEIGHTS_SUFFIX} file ({kind}) or its {_CONFIG_SUFFIX} sidecar"
        )
    _check_is_file(path)
    _check_is_file(weights_path)
    header = _read_safetensors_header(weights_path)
    if config_path.is_file():
        document = _read_sidecar(config_path)
        check(document, config_path)
        digest = sha256_file(weights_path)
        if document.get("sha256") != digest:
            raise CheckpointError(
                f"{weights_path}: sha256 {digest} does not match {document.get('sha256')!r} recorded in "
                f"{config_path.name}; the file was changed or belongs to another one"
            )
        return document, weights_path
    embedded = header.get("__metadata__", {}).get(key) if isinstance(header, dict) else None
    if embedded is None:
        raise CheckpointError(
            f"{weights_path}: a safetensors file without an {kind} (no {config_path.name} beside it and "
            f"no {key!r} metadata); it was not written by {writer}"
        )
    try:
        document = json.loads(embedded)
    except ValueError as err:
        raise CheckpointError(f"{weights_path}: embedded {key!r} is not JSON: {err}") from None
    check(document, weights_path)
    return document, weights_path


def load_tensors(weights_path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors file, on the CPU.

    Raises:
        CheckpointError: the data cannot be read (its reason in one line).
    """
    try:
        return load_file(weights_path, device="cpu")
    except Exception as err:  # safetensors raises its own SafetensorError and OSError subclasses
        raise CheckpointError(f"{weights_path}: unreadable safetensors data: {one_line(err)}") from None


def _json_default(value: Any) -> Any:
    if isinstance(value, (_dt.date, _dt.datetime, _dt.time)):
        return value.isoformat()
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, (tuple, set, frozenset)):
        return list(value)
    raise TypeError(f"{type(value).__name__} {value!r} is not JSON-serialisable")


