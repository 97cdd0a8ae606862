"""Batch size from device memory, torch.compile with its eager fallback, channels_last."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from equislide.models import srenet18
from equislide.models.accel import (
    COMPILE_ENV,
    AcceleratedBackbone,
    accelerate,
    activation_bytes_per_tile,
    batch_for_memory,
    choose_batch_tiles,
    compile_enabled,
)

GIB, MIB = 1 << 30, 1 << 20


class Toy(nn.Module):
    """One 3x3 convolution, 3 -> 8 channels at full resolution: its input + output is 11 x side^2."""

    feature_strides = (1, 1, 1, 1)
    feature_channels = (8, 8, 8, 8)

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)

    def features(self, x: torch.Tensor, layer: int) -> torch.Tensor:
        return torch.relu(self.conv(x))


def test_batch_for_memory_with_given_numbers() -> None:
    # 80 GiB free, 100 MiB a tile: 0.6 * 80 GiB / (3 * 100 MiB) = 163.84 -> 163
    assert batch_for_memory(80 * GIB, 100 * MIB) == 163
    assert batch_for_memory(80 * GIB, 100 * MIB, safety=0.5, overhead=2.0) == 204
    assert batch_for_memory(80 * GIB, 10 * MIB) == 256  # capped at MAX_BATCH
    assert batch_for_memory(80 * GIB, 10 * MIB, maximum=32) == 32  # the shard bound
    assert batch_for_memory(1 * GIB, 1 * GIB) == 1  # too little for one: still one (OOM then says so)
    assert batch_for_memory(0, 1) == 1
    for bad in (
        dict(free_bytes=GIB, per_tile_bytes=0),
        dict(free_bytes=-1, per_tile_bytes=1),
        dict(free_bytes=GIB, per_tile_bytes=1, safety=0.0),
        dict(free_bytes=GIB, per_tile_bytes=1, safety=1.5),
        dict(free_bytes=GIB, per_tile_bytes=1, overhead=0.5),
        dict(free_bytes=GIB, per_tile_bytes=1, minimum=5, maximum=4),
    ):
        with pytest.raises(ValueError):
            batch_for_memory(**bad)


def test_activation_estimate_counts_the_largest_layer_and_scales_with_area() -> None:
    toy = Toy().eval()
    # the only leaf layer, the convolution: input (3 x 32 x 32) + output (8 x 32 x 32), float32
    assert activation_bytes_per_tile(toy, side=32, layer=1, probe_side=32) == 11 * 32 * 32 * 4
    assert activation_bytes_per_tile(toy, side=64, layer=1, probe_side=32) == 4 * 11 * 32 * 32 * 4
    half = activation_bytes_per_tile(toy, side=64, layer=1, probe_side=32, dtype_bytes=2)
    assert half == 2 * 11 * 32 * 32 * 4
    net = srenet18(width=8).eval()
    small = activation_bytes_per_tile(net, side=256, layer=2)
    big = activation_bytes_per_tile(net, side=512, layer=2)
    assert small > 8 * 256 * 256 * 4 and big == pytest.approx(4 * small, rel=1e-6)


def test_cpu_keeps_the_configured_batch() -> None:
    assert choose_batch_tiles(Toy(), "cpu", side=512, layer=1, default=4) == 4


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (torch.cuda.mem_get_info)")
def test_cuda_batch_comes_from_free_memory() -> None:
    net = srenet18(width=8).eval().cuda()
    free, _ = torch.cuda.mem_get_info()
    want = batch_for_memory(free, activation_bytes_per_tile(net, side=512, layer=4), maximum=32)
    assert choose_batch_tiles(net, "cuda", side=512, layer=4, default=4, maximum=32) == want


def test_channels_last_wrapper_gives_the_eager_features_and_delegates() -> None:
    net = srenet18(width=8).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.inference_mode():
        ref = net.features(x, 2)
        wrapped = AcceleratedBackbone(net, channels_last=True)
        got = wrapped.features(x, 2)
    assert wrapped.feature_strides == net.feature_strides and wrapped.feature_channels == net.feature_channels
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4 * float(ref.abs().max()))


def test_accelerate_is_the_network_itself_on_cpu_by_default_and_one_wrapper_per_options(monkeypatch) -> None:
    monkeypatch.delenv(COMPILE_ENV, raising=False)
    assert not compile_enabled()
    net = Toy()
    assert accelerate(net, "cpu") is net
    a = accelerate(net, "cpu", channels_last=True)
    assert isinstance(a, AcceleratedBackbone) and accelerate(net, "cpu", channels_last=True) is a
    assert set(net.state_dict()) == {"conv.weight", "conv.bias"}  # the cache is no submodule
    monkeypatch.setenv(COMPILE_ENV, "1")
    assert compile_enabled()


def test_compile_runs_and_equals_eager() -> None:
    torch._dynamo.reset()
    toy = Toy().eval()
    x = torch.randn(2, 3, 32, 32)
    wrapped = AcceleratedBackbone(toy, compile=True, backend="eager")  # dynamo only: fast
    with torch.inference_mode():
        got, ref = wrapped.features(x, 1), toy.features(x, 1)
    assert wrapped.compiled and wrapped.compile_failed is None
    torch.testing.assert_close(got, ref)


def test_a_failing_compiler_falls_back_to_eager_with_one_warning(monkeypatch) -> None:
    """A real failure: inductor pointed at a C++ compiler that does not exist."""
    import torch._inductor.config as inductor_config

    torch._dynamo.reset()
    monkeypatch.setattr(inductor_config.cpp, "cxx", ("/nonexistent/c++",))
    toy = Toy().eval()
    x = torch.randn(2, 3, 32, 32)
    wrapped = AcceleratedBackbone(toy, compile=True)
    with warnings.catch_warnings(record=True) as caught, torch.inference_mode():
        warnings.simplefilter("always")
        first, second, ref = wrapped.features(x, 1), wrapped.features(x, 1), toy.features(x, 1)
    ours = [w for w in caught if "torch.compile of Toy.features failed" in str(w.message)]
    assert len(ours) == 1 and ours[0].category is RuntimeWarning
    assert "running eager" in str(ours[0].message) and "\n" not in str(ours[0].message)
    assert not wrapped.compiled and "C++ compiler" in (wrapped.compile_failed or "")
    assert torch.equal(first, ref) and torch.equal(second, ref)
    torch._dynamo.reset()
