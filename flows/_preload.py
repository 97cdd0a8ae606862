"""Dask worker preload (``--preload equislide.flows._preload``): import what every task needs once, at start.

A worker's first task would otherwise import torch, the networks, Prefect's task engine and the flow
module while its task waits (~3-5 s on 2 busy cores); at start-up all workers do it at once, before
the cluster counts as up, so no stage of a run pays it. The same goes for the forkserver every budgeted
stage call forks from (:mod:`equislide.stages.budget`).
"""

from __future__ import annotations

import torch  # noqa: F401

import equislide.flows.cohort  # noqa: F401  (Prefect, prefect-dask, the stages, tiling, storage)
import equislide.models.extract  # noqa: F401
import equislide.models.srenet  # noqa: F401
import equislide.stages  # noqa: F401
from equislide.stages.budget import warm
from equislide.text import one_line_console

warm()  # the forkserver of budgeted stage calls, started beside the worker rather than in its first task
one_line_console()  # a worker's own console logs too: one line a record (tracebacks go to the server)
