"""equislide.flows: Prefect flows and tasks (orchestration only; the numerical work is in the libraries).

- :func:`equislide.flows.cohort.cohort_flow`: tile -> features -> K-means -> label maps -> outputs -> run
  report, for a cohort of slides, on a Dask cluster (:func:`equislide.flows.cohort.make_task_runner`).
- :func:`equislide.flows.cohort.run_cohort`: the same with the task runner chosen from options.

Import the submodule (``from equislide.flows.cohort import run_cohort``): importing this package does not
import Prefect.
"""

from __future__ import annotations

__all__: list[str] = []
