"""The SRE-Conv strip path's pooled output buffers: reused, never while a caller holds them."""

from __future__ import annotations

import pytest
import torch

from equislide.models import _buffers, srenet18

CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def empty_pool(monkeypatch):
    monkeypatch.delenv("EQUISLIDE_BUFFER_POOL_MB", raising=False)
    _buffers.release()
    yield
    _buffers.release()


def test_a_buffer_is_lent_until_every_view_of_it_is_gone():
    a = _buffers.empty((2, 4, 6, 5), torch.float32, CPU)
    assert a.is_contiguous(memory_format=torch.channels_last)
    ptr, view = a.data_ptr(), a[1].permute(1, 2, 0)
    del a
    b = _buffers.empty((2, 4, 6, 5), torch.float32, CPU)
    assert b.data_ptr() != ptr  # the view still holds the first
    del view
    c = _buffers.empty((2, 4, 6, 5), torch.float32, CPU)
    assert c.data_ptr() == ptr
    assert _buffers.held_bytes() == 2 * 2 * 4 * 6 * 5 * 4
    d = _buffers.empty((2, 4, 6, 5), torch.bfloat16, CPU)  # another dtype: another buffer
    assert d.data_ptr() not in (b.data_ptr(), c.data_ptr())
    del b, c, d
    _buffers.release()
    assert _buffers.held_bytes() == 0


def test_features_kept_by_the_caller_are_not_overwritten_by_the_next_call():
    model = srenet18(width=8, impl="ring").eval()
    x1, x2 = torch.rand(2, 3, 48, 48), torch.rand(2, 3, 48, 48)
    with torch.no_grad():
        first = model.features(x1, 4)
        kept = first.clone()
        second = model.features(x2, 4)
        assert first.data_ptr() != second.data_ptr()
        torch.testing.assert_close(first, kept, rtol=0, atol=0)
        held = _buffers.held_bytes()
        del first, second
        for _ in range(3):  # dropped outputs are taken again: the pool does not grow
            model.features(x1, 4)
        assert _buffers.held_bytes() == held
        again = model.features(x1, 4)
    torch.testing.assert_close(again, kept, rtol=0, atol=0)


def test_inference_mode_and_no_grad_calls_each_get_buffers_they_can_write():
    model = srenet18(width=8, impl="ring").eval()
    x = torch.rand(1, 3, 40, 40)
    with torch.inference_mode():
        a = model.features(x, 4).clone()
    with torch.no_grad():
        b = model.features(x, 4)
    with torch.inference_mode():
        c = model.features(x, 4)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    torch.testing.assert_close(c, b, rtol=0, atol=0)


def test_the_pool_stays_within_its_limit_and_zero_switches_it_off(monkeypatch):
    shape = (1, 16, 64, 64)  # 256 KiB of float32
    monkeypatch.setenv("EQUISLIDE_BUFFER_POOL_MB", "1")
    held = [_buffers.empty(shape, torch.float32, CPU) for _ in range(6)]
    assert _buffers.held_bytes() == 4 * (256 << 10)  # the last two are plain allocations
    assert all(t.is_contiguous(memory_format=torch.channels_last) for t in held)
    del held[:4]
    more = _buffers.empty((1, 32, 64, 64), torch.float32, CPU)  # makes room by dropping free ones
    assert _buffers.held_bytes() == 512 << 10
    monkeypatch.setenv("EQUISLIDE_BUFFER_POOL_MB", "0")
    del more
    _buffers.release()
    plain = _buffers.empty(shape, torch.float32, CPU)
    assert _buffers.held_bytes() == 0 and plain.shape == shape
