"""The prefetching reader: order, overlap, errors surfacing as themselves, no hang, early exit."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import torch

from equislide.models.prefetch import PREFETCH_ENV, Prefetcher, prefetch_enabled, to_device_async


def test_yields_every_item_in_order_with_and_without_the_thread() -> None:
    items = list(range(7))
    for enabled in (True, False):
        with Prefetcher(lambda i: np.full(3, i), items, enabled=enabled) as pf:
            got = [(i, v.tolist()) for i, v in pf]
        assert got == [(i, [i] * 3) for i in items]


def test_the_next_load_runs_while_the_consumer_works() -> None:
    """Loads of 0.2 s and work of 0.2 s: serial takes ~4 x 0.4 s, prefetched ~0.2 + 4 x 0.2 s."""

    def load(i: int) -> int:
        time.sleep(0.2)
        return i

    def run(enabled: bool) -> float:
        t0 = time.perf_counter()
        with Prefetcher(load, range(4), enabled=enabled) as pf:
            for _ in pf:
                time.sleep(0.2)
        return time.perf_counter() - t0

    serial, overlapped = run(False), run(True)
    assert serial > 1.5 and overlapped < 0.8 * serial, (serial, overlapped)


def test_loads_run_on_one_background_thread_at_most_depth_ahead() -> None:
    started: list[int] = []
    threads = set()

    def load(i: int) -> int:
        started.append(i)
        threads.add(threading.current_thread().name)
        return i

    with Prefetcher(load, range(10), depth=2) as pf:
        it = iter(pf)
        assert next(it)[0] == 0
        time.sleep(0.3)  # the worker fills the queue (2) and holds one more load waiting to be put
        assert len(started) <= 4
        rest = [i for i, _ in it]
    assert rest == list(range(1, 10)) and threads == {"equislide-prefetch"}


class BadShard(ValueError):
    pass


def test_an_error_in_the_reader_is_raised_as_itself_after_the_items_before_it() -> None:
    def load(i: int) -> int:
        if i == 3:
            raise BadShard("store.zarr: tiles shard 3 cannot be decoded")
        return i

    for enabled in (True, False):
        seen = []
        pf = Prefetcher(load, range(6), enabled=enabled)
        with pytest.raises(BadShard, match="tiles shard 3 cannot be decoded") as info, pf:
            for i, _ in pf:
                seen.append(i)
        assert seen == [0, 1, 2]
        assert str(info.value) == "store.zarr: tiles shard 3 cannot be decoded"


def test_a_consumer_leaving_early_stops_the_worker_without_a_hang() -> None:
    loads = []

    def load(i: int) -> int:
        loads.append(i)
        return i

    pf = Prefetcher(load, range(1000))
    t0 = time.perf_counter()
    with pf:
        for i, _ in pf:
            if i == 2:
                break
    assert time.perf_counter() - t0 < 2.0
    assert pf._thread is not None and not pf._thread.is_alive()
    assert len(loads) < 10


def test_a_consumer_error_stops_the_worker() -> None:
    pf = Prefetcher(lambda i: i, range(1000))
    with pytest.raises(KeyError), pf:
        for i, _ in pf:
            if i == 1:
                raise KeyError("consumer")
    assert pf._thread is not None and not pf._thread.is_alive()


def test_bad_depth_and_env_switch(monkeypatch) -> None:
    with pytest.raises(ValueError, match="depth=0"):
        Prefetcher(lambda i: i, [1], depth=0)
    monkeypatch.delenv(PREFETCH_ENV, raising=False)
    assert prefetch_enabled()
    for off in ("0", "false", "OFF", "no"):
        monkeypatch.setenv(PREFETCH_ENV, off)
        assert not prefetch_enabled()
    monkeypatch.setenv(PREFETCH_ENV, "1")
    assert prefetch_enabled()


def test_to_device_async_on_cpu_shares_the_array() -> None:
    arr = np.arange(24, dtype=np.uint8).reshape(2, 2, 2, 3)
    t, ready = to_device_async(arr, "cpu")
    assert ready is None and t.data_ptr() == arr.ctypes.data and t.dtype == torch.uint8


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (pinned memory, side stream)")
def test_cuda_prefetch_yields_device_tensors_equal_to_the_host_arrays() -> None:
    arrays = [np.random.default_rng(i).integers(0, 255, (4, 64, 64, 3), dtype=np.uint8) for i in range(3)]
    with Prefetcher(lambda i: arrays[i], range(3), device="cuda") as pf:
        for i, t in pf:
            assert t.device.type == "cuda"
            assert np.array_equal(t.cpu().numpy(), arrays[i])
