"""The run manifest ``run.json``: what went in, with which parameters and versions, and what came out.

Schema (``schema`` = :data:`MANIFEST_SCHEMA`, ``schema_version`` = :data:`MANIFEST_SCHEMA_VERSION`)::

    {
      "schema": "equislide-run", "schema_version": 1,
      "run_id": "...", "created": "2026-01-01T00:00:00+00:00", "updated": "...",
      "command": ["equislide", "segment", ...],
      "inputs": [{"path": "...", "sha256": "...", "size": 123}],
      "parameters": {...},
      "versions": {"python": "3.12.3", "equislide": "...", "torch": "...", "zarr": "...", "dask": "...",
                   "prefect": "..."},                       # packages not installed are left out
      "device": {...},                                      # whatever the caller describes
      "samples": {"tma01/B3": {"status": "done", "error": null, "timings": {"features_s": 1.2},
                               "outputs": {...}}},
      "timings": {"total_s": 12.3},
      "stages": {"features": {"workers": {"tcp://...": {"tiles": 96, "seconds": 40.1,
                                                         "tiles_per_s": 2.39}}}},   # per-stage figures
      "error": "disk full ...", "error_detail": "Traceback ..."   # only when the run stopped on a fault
    }

Versions are read from the installed distributions' metadata (``importlib.metadata``): nothing is
imported, so asking for Prefect's version does not import Prefect. Writes are atomic (temporary file
in the same folder + ``os.replace``).
"""

from __future__ import annotations

import datetime as _dt
import json
import platform
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from equislide.files import atomic_write_json
from equislide.storage.hashing import canonical_json, sha256_file

__all__ = [
    "MANIFEST_NAME",
    "MANIFEST_SCHEMA",
    "MANIFEST_SCHEMA_VERSION",
    "SAMPLE_STATUSES",
    "RunManifest",
    "collect_versions",
    "describe_inputs",
    "read_manifest",
    "write_manifest",
]

MANIFEST_NAME = "run.json"
MANIFEST_SCHEMA = "equislide-run"
MANIFEST_SCHEMA_VERSION = 1
#: Allowed per-sample statuses.
SAMPLE_STATUSES = ("pending", "running", "done", "skipped", "failed")
_PACKAGES = ("equislide", "torch", "numpy", "zarr", "dask", "distributed", "prefect", "scikit-image")


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()


def collect_versions(packages: Iterable[str] = _PACKAGES) -> dict[str, str]:
    """Python's and the installed ``packages``' versions (missing ones left out); imports nothing."""
    out = {"python": platform.python_version()}
    for name in packages:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return out


def describe_inputs(paths: Iterable[str | Path]) -> list[dict[str, Any]]:
    """``[{"path", "sha256", "size"}]`` of input files, sorted by path."""
    out = []
    for p in sorted({Path(p) for p in paths}, key=str):
        out.append({"path": str(p), "sha256": sha256_file(p), "size": p.stat().st_size})
    return out


@dataclass
class RunManifest:
    """In-memory ``run.json``; see the module docstring for the JSON layout."""

    parameters: dict[str, Any] = field(default_factory=dict)
    inputs: list[dict[str, Any]] = field(default_factory=list)
    command: list[str] = field(default_factory=list)
    versions: dict[str, str] = field(default_factory=collect_versions)
    device: dict[str, Any] = field(default_factory=dict)
    samples: dict[str, dict[str, Any]] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    #: Per-stage figures beyond seconds (the feature stage's tiles/s per worker); left out when empty.
    stages: dict[str, Any] = field(default_factory=dict)
    run_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    created: str = field(default_factory=_now)
    updated: str = ""
    #: Why the run stopped before its end (an infrastructure fault), and the traceback behind it.
    error: str | None = None
    error_detail: str | None = None

    def set_sample(
        self,
        sample_id: str,
        status: str,
        *,
        error: str | None = None,
        timings: Mapping[str, float] | None = None,
        outputs: Mapping[str, Any] | None = None,
        consistency: Mapping[str, Any] | None = None,
    ) -> None:
        """Record a sample's status (one of :data:`SAMPLE_STATUSES`), merging timings and outputs.

        ``consistency``: the sample's rotation-consistency figures (kappa, Dice, ICC), when scored.
        """
        if status not in SAMPLE_STATUSES:
            raise ValueError(f"status={status!r} must be one of {SAMPLE_STATUSES}")
        entry = self.samples.setdefault(
            sample_id, {"status": status, "error": None, "timings": {}, "outputs": {}}
        )
        entry["status"] = status
        entry["error"] = error
        entry["timings"].update({k: float(v) for k, v in (timings or {}).items()})
        entry["outputs"].update(dict(outputs or {}))
        if consistency is not None:
            entry["consistency"] = dict(consistency)

    def to_dict(self) -> dict[str, Any]:
        """The JSON document (keys in schema order)."""
        doc = {
            "schema": MANIFEST_SCHEMA,
            "schema_version": MANIFEST_SCHEMA_VERSION,
            "run_id": self.run_id,
            "created": self.created,
            "updated": self.updated or self.created,
            "command": list(self.command),
            "inputs": list(self.inputs),
            "parameters": dict(self.parameters),
            "versions": dict(self.versions),
            "device": dict(self.device),
            "samples": {k: self.samples[k] for k in sorted(self.samples)},
            "timings": dict(self.timings),
        }
        fault = {"error": self.error, "error_detail": self.error_detail} if self.error else {}
        return doc | ({"stages": dict(self.stages)} if self.stages else {}) | fault

    @classmethod
    def from_dict(cls, doc: Mapping[str, Any]) -> RunManifest:
        """Rebuild from a document written by :meth:`to_dict`.

        Raises:
            ValueError: Not an equislide run manifest, or a newer schema version.
        """
        if doc.get("schema") != MANIFEST_SCHEMA:
            raise ValueError(
                f"schema={doc.get('schema')!r} is not {MANIFEST_SCHEMA!r}: not an equislide run.json"
            )
        version = doc.get("schema_version")
        if not isinstance(version, int) or version > MANIFEST_SCHEMA_VERSION:
            raise ValueError(
                f"schema_version={version!r} is not readable by this equislide (up to "
                f"{MANIFEST_SCHEMA_VERSION}); upgrade equislide"
            )
        for key in ("samples", "parameters", "versions"):
            if not isinstance(doc.get(key, {}), Mapping):
                raise ValueError(f"run.json field {key!r} must be an object")
        return cls(
            parameters=dict(doc.get("parameters", {})),
            inputs=list(doc.get("inputs", [])),
            command=list(doc.get("command", [])),
            versions=dict(doc.get("versions", {})),
            device=dict(doc.get("device", {})),
            samples={k: dict(v) for k, v in doc.get("samples", {}).items()},
            timings=dict(doc.get("timings", {})),
            stages=dict(doc.get("stages", {})),
            run_id=str(doc.get("run_id", "")),
            created=str(doc.get("created", "")),
            updated=str(doc.get("updated", "")),
            error=doc.get("error"),
            error_detail=doc.get("error_detail"),
        )


def write_manifest(path: str | Path, manifest: RunManifest | Mapping[str, Any]) -> Path:
    """Write ``run.json`` atomically (temporary file beside it, fsync, ``os.replace``); returns the path.

    ``path`` may be a folder, in which case ``<path>/run.json`` is written. ``updated`` is set to now.

    Raises:
        ValueError: A value is not JSON-able (NaN, an object): the message names it.
    """
    path = Path(path)
    if path.is_dir():
        path = path / MANIFEST_NAME
    man = manifest if isinstance(manifest, RunManifest) else RunManifest.from_dict(manifest)
    man.updated = _now()
    doc = json.loads(canonical_json(man.to_dict()))  # validates: JSON types only, no NaN
    ordered = {k: doc[k] for k in man.to_dict()}
    return atomic_write_json(path, ordered, indent=2, sort_keys=False, fsync=True)


def read_manifest(path: str | Path) -> RunManifest:
    """Read ``run.json`` (or ``<folder>/run.json``).

    Raises:
        FileNotFoundError: No manifest there.
        ValueError: Not JSON, not an equislide manifest, or a newer schema version.
    """
    path = Path(path)
    if path.is_dir():
        path = path / MANIFEST_NAME
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(
            f"{path}: not JSON ({err}); the file is damaged, delete it to start a fresh run"
        ) from None
    if not isinstance(doc, Mapping):
        raise ValueError(f"{path}: not a JSON object")
    return RunManifest.from_dict(doc)
