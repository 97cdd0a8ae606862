"""A group task's samples in one budgeted child: each fails alone (overrun, crash, its own error), the
child is reused between healthy samples, and a transient error is raised for Prefect to retry."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import pytest
from prefect import flow

from equislide.flows._common import each_sample

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _budget_jobs import work  # noqa: E402


@flow
def _group(items: list[tuple[str, tuple[str, str]]], budget: float) -> list[dict]:
    return each_sample(items, "testing", work, budget=budget)


def test_each_failure_is_its_samples_alone(prefect_harness, tmp_path):
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    items = [
        ("s1", ("ok", "s1")),
        ("s2", ("ok", "s2")),
        ("s3", ("hang", str(fifo))),
        ("s4", ("ok", "s4")),
        ("s5", ("bad", "s5")),
        ("s6", ("crash", "s6")),
        ("s7", ("ok", "s7")),
    ]
    t0 = time.monotonic()
    out = _group(items, 3.0)
    assert time.monotonic() - t0 < 60
    assert [o["sample_id"] for o in out] == [sid for sid, _ in items]  # each once, in order
    by = {o["sample_id"]: o for o in out}
    assert by["s3"]["reason"] == "testing s3 stopped after its time budget of 3 s"
    assert by["s5"]["reason"].endswith("s5: not a slide")
    assert by["s6"]["reason"] == "testing s6 crashed (signal 6)"
    pids = {sid: by[sid]["result"]["pid"] for sid in ("s1", "s2", "s4", "s7")}
    assert pids["s1"] == pids["s2"] != os.getpid()  # one child for the healthy run
    assert by["s2"]["result"]["seen"] == 2
    assert pids["s4"] != pids["s2"]  # the hung child was killed; s4 ran in a fresh one
    assert by["s4"]["result"]["seen"] == 1
    assert pids["s7"] not in (pids["s4"], pids["s2"])  # and again after the crash


def test_transient_error_is_raised_for_a_retry(prefect_harness):
    with pytest.raises(OSError, match="Input/output error"):
        _group([("s1", ("ok", "s1")), ("s2", ("io", "s2")), ("s3", ("ok", "s3"))], 30.0)
