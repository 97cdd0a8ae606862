"""What a run shows in the Prefect UI while it goes: progress, the per-sample table, the summary.

Progress is a weighted sum over the stages (:func:`stage_weights`), each stage counting the fraction
of its task groups finished, so the bar moves with the work rather than with the number of stages:
the weights are the stage shares measured by ``bench/pipeline.py`` (README "Measured"), where the
features are two thirds to three quarters of a run. It never goes back, and shows 100 only once the
report is written (:meth:`Monitor.finish`).

The table and the summary are published once and then updated in place after every stage (Prefect's
``PATCH /artifacts/{id}`` also updates the key's latest version), so a run has one table and one
summary under their keys, always current, instead of a new version per stage in the artifacts tab.
"""

from __future__ import annotations

import json
import math
from typing import Any
from uuid import UUID

from prefect.artifacts import (
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)

__all__ = ["Monitor", "stage_weights"]

#: Stage shares of a cohort run, in per cent, measured (bench/pipeline.py, 64-core phantom TMA, 2 workers;
#: the cluster's start-up left out: it comes before the first artifact). Given weights / random weights
#: (BatchNorm calibration is a serial stage of its own).
_SHARES_GIVEN = {"tile": 6.0, "backbone": 1.0, "features": 75.0, "kmeans": 3.0, "segment": 10.0}
_SHARES_RANDOM = {"tile": 5.0, "backbone": 22.0, "features": 59.0, "kmeans": 2.0, "segment": 8.0}
#: ``segment --consistency``: the consistency stage took 0.44x the features' time (README, measured).
_CONSISTENCY_PER_FEATURES = 0.44
#: What the report and the final artifacts take (a share of the bar kept for them, so 100 means written).
_REPORT_SHARE = 1.0


def stage_weights(*, random_weights: bool, consistency: bool) -> dict[str, float]:
    """Each stage's fraction of the whole run (they sum to 1), from the measured shares."""
    shares = dict(_SHARES_RANDOM if random_weights else _SHARES_GIVEN)
    if consistency:
        shares["consistency"] = _CONSISTENCY_PER_FEATURES * shares["features"]
    shares["report"] = _REPORT_SHARE
    total = sum(shares.values())
    return {stage: share / total for stage, share in shares.items()}


def _finite(value: Any) -> Any:
    """JSON without NaN or infinity (the UI's table parser refuses them): such numbers become None."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


class Monitor:
    """A run's progress artifact and its keyed table and markdown artifacts, kept current.

    Args:
        weights: Fraction of the run per stage (:func:`stage_weights`); stages not named count nothing.
        key: Progress artifact key (lowercase letters, digits and dashes).
        description: Shown beside the progress bar.
    """

    def __init__(self, weights: dict[str, float], *, key: str, description: str) -> None:
        self.weights = dict(weights)
        self.done: dict[str, float] = {}
        self.shown = 0.0
        self._ids: dict[str, UUID] = {}
        self.progress_id = create_progress_artifact(0.0, key=key, description=description)

    @property
    def percent(self) -> float:
        return 100.0 * sum(w * self.done.get(stage, 0.0) for stage, w in self.weights.items())

    def advance(self, stage: str, fraction: float) -> None:
        """``stage`` is ``fraction`` (0..1) done; the bar moves only forward, and stops short of 100."""
        self.done[stage] = max(self.done.get(stage, 0.0), min(max(float(fraction), 0.0), 1.0))
        value = min(round(self.percent, 1), 99.9)
        if value > self.shown:
            self.shown = value
            update_progress_artifact(self.progress_id, value)

    def finish(self) -> None:
        """Everything is written: the bar shows 100."""
        self.done = dict.fromkeys(self.weights, 1.0)
        self.shown = 100.0
        update_progress_artifact(self.progress_id, 100.0)

    def table(self, key: str, rows: list[dict[str, Any]], description: str) -> None:
        """Publish ``rows`` under ``key`` (the first time), or replace the published rows."""
        rows = _finite(rows)
        if key not in self._ids:
            self._ids[key] = create_table_artifact(rows, key=key, description=description)
        else:
            self._update(key, json.dumps(rows), description)

    def markdown(self, key: str, text: str, description: str) -> None:
        """Publish ``text`` under ``key`` (the first time), or replace the published text."""
        if key not in self._ids:
            self._ids[key] = create_markdown_artifact(text, key=key, description=description)
        else:
            self._update(key, text, description)

    def _update(self, key: str, data: str, description: str) -> None:
        from prefect.client.orchestration import get_client
        from prefect.client.schemas.actions import ArtifactUpdate

        with get_client(sync_client=True) as client:
            client.update_artifact(self._ids[key], ArtifactUpdate(data=data, description=description))
