"""Content hashes: a canonical hash of parameter dictionaries (and :func:`equislide.files.sha256_file`)."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Any

from equislide.files import sha256_file

__all__ = ["canonical_json", "params_hash", "sha256_file"]


def _plain(value: Any, where: str) -> Any:
    """Convert to JSON-able plain types (numpy scalars/arrays, tuples, paths); reject NaN and odd types."""
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise ValueError(f"parameter key {where}{k!r} must be a str")
            out[k] = _plain(v, f"{where}{k}.")
        return out
    if isinstance(value, (list, tuple)):
        return [_plain(v, f"{where}[{i}].") for i, v in enumerate(value)]
    if hasattr(value, "tolist") and not isinstance(value, (str, bytes)):  # numpy scalar or array
        return _plain(value.tolist(), where)
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"parameter {where.rstrip('.') or 'value'}={value} is not finite")
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise ValueError(
        f"parameter {where.rstrip('.') or 'value'} has type {type(value).__name__}; use JSON types"
    )


def canonical_json(value: Any) -> str:
    """Compact, key-sorted, ASCII JSON of ``value``: equal inputs give equal text."""
    return json.dumps(_plain(value, ""), sort_keys=True, separators=(",", ":"), ensure_ascii=True)


def params_hash(params: dict[str, Any]) -> str:
    """Hex SHA-256 of :func:`canonical_json` of a parameter dictionary (order of keys does not matter)."""
    return hashlib.sha256(canonical_json(params).encode("ascii")).hexdigest()
