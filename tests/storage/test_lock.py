"""The output-folder lock with real processes: a live holder refuses, a killed one leaves a stale lock."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from equislide.storage import LOCK_NAME, OutputLocked, acquire_output_lock, output_lock, release_output_lock

_HOLD = """
import sys, time
from equislide.storage import acquire_output_lock
acquire_output_lock(sys.argv[1], ["holder", "test"])
print("locked", flush=True)
time.sleep(600)
"""


def _holder(out: Path) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", _HOLD, str(out)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_a_live_holder_refuses_and_is_named(tmp_path):
    proc = _holder(tmp_path)
    try:
        with pytest.raises(OutputLocked) as info:
            acquire_output_lock(tmp_path, ["second"])
        message = str(info.value)
        assert f"pid {proc.pid} on {socket.gethostname()}" in message and "holder test" in message
        assert "\n" not in message
    finally:
        proc.kill()
        proc.wait()


def test_a_killed_holder_leaves_a_stale_lock_that_is_taken_over(tmp_path, caplog):
    proc = _holder(tmp_path)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    lock = tmp_path / LOCK_NAME
    assert json.loads(lock.read_text())["pid"] == proc.pid  # left behind by kill -9
    with caplog.at_level("WARNING", logger="equislide"), output_lock(tmp_path, ["mine"]):
        assert json.loads(lock.read_text())["pid"] == os.getpid()
    assert f"stale lock of a run that is gone: pid {proc.pid}" in caplog.text
    assert not lock.exists()  # released and removed


def test_reentrant_in_one_process_and_released_on_keyboard_interrupt(tmp_path):
    lock = tmp_path / LOCK_NAME
    with pytest.raises(KeyboardInterrupt), output_lock(tmp_path):
        acquire_output_lock(tmp_path)  # the flow inside the CLI
        release_output_lock(tmp_path)
        assert lock.exists()
        raise KeyboardInterrupt
    assert not lock.exists()
    # Free again for another process.
    done = subprocess.run(
        [sys.executable, "-c", "import sys; from equislide.storage import output_lock\n"
         "with output_lock(sys.argv[1]): pass", str(tmp_path)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr


def test_refusal_is_fast(tmp_path):
    proc = _holder(tmp_path)
    try:
        t0 = time.perf_counter()
        with pytest.raises(OutputLocked):
            acquire_output_lock(tmp_path)
        assert time.perf_counter() - t0 < 0.5
    finally:
        proc.kill()
        proc.wait()
