"""Shared fixtures: the real-data folder, seeded torch, and a temporary Prefect home.

Real slides and tiles come from ``../shared/data`` beside the repository (or
``EQUISLIDE_TEST_DATA``); tests that need them skip with a reason when the folder is absent.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

# Prefect reads its settings at import: set them before any test module imports it. One temporary
# PREFECT_HOME per test session keeps the developer's own Prefect database out of the tests.
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")
os.environ.setdefault("PREFECT_HOME", tempfile.mkdtemp(prefix="equislide-prefect-home-"))
os.environ.setdefault("PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW", "ignore")

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("EQUISLIDE_TEST_DATA", REPO_ROOT.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real-data folder (slides/, tiles/, images/); skips when it is absent."""
    if not (SHARED_DATA / "slides").is_dir():
        pytest.skip(f"real test data not found at {SHARED_DATA} (set EQUISLIDE_TEST_DATA to its folder)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def prefect_harness():
    """One real (ephemeral, SQLite) Prefect server for the whole session: starting one takes ~20 s."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=90):
        yield


@pytest.fixture(scope="session")
def dask_cluster():
    """One real ``distributed.LocalCluster`` (2 single-threaded worker processes) per session, with the
    environment and preload local runs get (see ``equislide.flows.cluster``)."""
    from distributed import LocalCluster

    from equislide.flows.cluster import PRELOAD, worker_environment

    with worker_environment():
        cluster = LocalCluster(
            n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None, preload=[PRELOAD]
        )
    with cluster:
        yield cluster


@pytest.fixture(autouse=True)
def _seed_torch():
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    yield
