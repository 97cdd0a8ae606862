"""Per-input time budgets: real hangs (a FIFO nobody writes, a 200000 x 200000 untiled TIFF) are killed."""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

import pytest

from equislide.specs import TilingSpec
from equislide.stages.budget import BudgetExceeded, BudgetSpec, ChildFailed, run_each_within, run_within
from equislide.stages.inputs import reason_of
from equislide.stages.tile import plan_slide

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _budget_jobs import job as _job  # noqa: E402
from _malformed import huge_untiled_tiff, tissue_rgb  # noqa: E402


def test_value_and_exception_come_back():
    assert run_within(30, "adding", divmod, 7, 2) == (3, 1)
    with pytest.raises(ZeroDivisionError):
        run_within(30, "dividing", divmod, 1, 0)


def test_blocking_syscall_is_killed(tmp_path):
    """``open`` on a FIFO with no writer blocks in the kernel: no Python-level timeout can stop it."""
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    t0 = time.monotonic()
    with pytest.raises(BudgetExceeded, match=r"^reading pipe stopped after its time budget of 1 s$") as info:
        run_within(1, "reading pipe", open, str(fifo), "rb")
    assert time.monotonic() - t0 < 10
    assert reason_of(info.value) == "reading pipe stopped after its time budget of 1 s"
    assert not isinstance(info.value, TimeoutError)  # flows retry TimeoutError: a budget must not be


def test_crashed_child_is_one_line():
    with pytest.raises(ChildFailed, match=r"aborting crashed \(signal 6\)"):
        run_within(30, "aborting", os.abort)


def test_huge_untiled_tiff_plan_is_stopped(tmp_path):
    """The issue's file: planning it walks 200000 x 200000 pixels for a thumbnail (minutes)."""
    path = tmp_path / "huge.tif"
    path.write_bytes(huge_untiled_tiff())
    assert path.stat().st_size < 8 << 20
    t0 = time.monotonic()
    with pytest.raises((BudgetExceeded, Exception)) as info:
        run_within(5, "planning huge", plan_slide, path, tmp_path / "tiles", TilingSpec(), sample_id="huge")
    assert time.monotonic() - t0 < 20
    # Either the budget stops it, or (with the readers' size limits) it is refused first: one line.
    assert "\n" not in reason_of(info.value)


def test_good_plan_in_a_child_matches_in_process(tmp_path):
    from PIL import Image

    path = tmp_path / "good.png"
    Image.fromarray(tissue_rgb(256, 256)).save(path)
    spec = TilingSpec(tile=128, input_mpp=1.0)
    a = run_within(60, "planning", plan_slide, path, tmp_path / "t", spec, sample_id="good")
    b = plan_slide(path, tmp_path / "t", spec, sample_id="good")
    assert a.input_sha256 == b.input_sha256 and a.sample_ids == b.sample_ids
    assert [s.grid.n_tiles for s in a.todo] == [s.grid.n_tiles for s in b.todo]


def test_zero_budget_runs_in_process():
    assert run_within(0, "here", os.getpid) == os.getpid()
    assert run_within(30, "there", os.getpid) != os.getpid()


def test_budget_spec_parse(monkeypatch):
    spec = BudgetSpec.parse("plan=5, tile=0")
    assert spec.plan == 5 and spec.tile == 0 and spec.features == BudgetSpec().features
    for bad in ("plan", "nope=3", "plan=abc", "plan=-1", "plan=inf"):
        with pytest.raises(ValueError, match="budget"):
            BudgetSpec.parse(bad)
    monkeypatch.setenv("EQUISLIDE_BUDGET", "segment=7")
    assert BudgetSpec.from_env().segment == 7


def test_unit_runs_its_samples_in_one_child():
    """One child for the unit: its state (a cached network, here a call count) carries to the next job,
    and a job's own exception fails that job alone without a new child."""
    jobs = [("a", ("pid",)), ("b", ("div", 1, 0)), ("c", ("pid",)), ("d", ("calls",))]
    got = list(run_each_within(30, jobs, _job))
    assert [ok for ok, _ in got] == [True, False, True, True]
    assert isinstance(got[1][1], ZeroDivisionError)
    assert got[0][1] == got[2][1] != os.getpid()
    assert got[3][1] == 4  # the fourth job of the same process


def test_overrun_and_crash_fail_alone_and_a_fresh_child_takes_the_rest(tmp_path):
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    jobs = [
        ("one", ("pid",)),
        ("reading pipe", ("open", str(fifo))),
        ("three", ("pid",)),
        ("aborting", ("abort",)),
        ("five", ("calls",)),
    ]
    t0 = time.monotonic()
    got = list(run_each_within(2, jobs, _job))
    assert time.monotonic() - t0 < 20
    assert [ok for ok, _ in got] == [True, False, True, False, True]
    assert isinstance(got[1][1], BudgetExceeded)
    assert reason_of(got[1][1]) == "reading pipe stopped after its time budget of 2 s"
    assert isinstance(got[3][1], ChildFailed) and reason_of(got[3][1]) == "aborting crashed (signal 6)"
    assert got[2][1] != got[0][1]  # the child that hung was killed; a fresh one ran job three
    assert got[4][1] == 1  # and another one after the crash


def test_closing_a_unit_early_kills_its_child(tmp_path):
    answers = run_each_within(30, [("a", ("pid",)), ("b", ("pid",))], _job)
    ok, pid = next(answers)
    assert ok
    answers.close()  # each_sample stops so at a transient error
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.05)
    else:
        os.kill(pid, signal.SIGKILL)
        pytest.fail(f"the unit's child {pid} outlived the closed unit")


def test_unit_without_budget_runs_in_process():
    got = list(run_each_within(0, [("a", ("pid",)), ("b", ("div", 1, 0))], _job))
    assert got[0] == (True, os.getpid())
    assert not got[1][0] and isinstance(got[1][1], ZeroDivisionError)
