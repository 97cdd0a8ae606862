"""equislide.flows: Prefect flows and tasks (orchestration only; the numerical work is in the libraries).

- :func:`equislide.flows.cohort.cohort_flow`: tile -> features -> K-means -> label maps -> outputs -> run
  report, for a cohort of slides, on a Dask cluster (:func:`equislide.flows.cohort.make_task_runner`).
- :func:`equislide.flows.cohort.run_cohort`: the same with the task runner chosen from options.
- :func:`equislide.flows.consistency.consistency_flow` / ``run_study``: the rotation study over
  backbones and layers (``equislide consistency``).
- :mod:`equislide.flows._common`: what both share (group tasks, run state, tile and backbone stages).

Every task body is a call of :mod:`equislide.stages`; the flows hold no numerical code.

Import the submodule (``from equislide.flows.cohort import run_cohort``): importing this package does not
import Prefect.
"""

from __future__ import annotations

__all__: list[str] = []
