"""SRE-Conv: reference ring binning, impulse response, dense == ring, exact D4 equivariance."""

from __future__ import annotations

import ctypes
import platform

import numpy as np
import pytest
import torch

from equislide.models import (
    D4_ELEMENTS,
    ModelConfigError,
    SREConv2d,
    _ring_kernel,
    check_equivariance,
    num_rings,
    recalibrate_batchnorm,
    ring_basis,
    ring_index,
    sre_conv,
    srenet18,
)
from equislide.models.extract import bf16_native

# (in, out, kernel, stride, padding, dilation, groups, bias)
CONFIGS = [
    (3, 8, 7, 1, None, 1, 1, False),
    (8, 16, 9, 1, None, 1, 1, True),
    (8, 16, 5, 2, None, 1, 2, True),
    (6, 6, 7, 1, 1, 2, 3, False),
    (4, 8, 3, 3, 0, 1, 1, True),
    (16, 16, 1, 1, None, 1, 1, False),
]


@pytest.mark.parametrize(
    ("k", "sizes"), [(9, [1, 8, 12, 16, 32]), (5, [1, 8, 12]), (7, [1, 8, 12, 16]), (3, [1, 8])]
)
def test_hard_rings_match_reference_binning(k, sizes):
    idx = ring_index(k)
    assert num_rings(k) == len(sizes)
    assert np.bincount(idx[idx >= 0]).tolist() == sizes
    corners = int((idx < 0).sum())
    assert corners == k * k - sum(sizes)
    # Rings depend on distance only: the index map is invariant under the square's symmetries.
    for g in (np.rot90, np.flipud, np.transpose):
        assert np.array_equal(g(idx), idx)


def test_k9_corners_are_outside_every_ring():
    idx = ring_index(9)
    assert idx[0, 0] == idx[0, 8] == idx[8, 0] == idx[8, 8] == -1
    assert idx[4, 4] == 0 and idx[4, 0] == 4 and idx[0, 4] == 4


def test_soft_basis_interpolates_between_ring_radii():
    k = 9
    basis = ring_basis(k, "soft")
    yy, xx = np.mgrid[-4:5, -4:5]
    d = np.hypot(yy, xx)
    inside = d <= 4
    # Partition of unity inside the outer radius, taper to zero by radius 5.
    np.testing.assert_allclose(basis.sum(0)[inside], 1.0, atol=1e-12)
    assert np.all(basis.sum(0)[d >= 5] == 0)
    # Each pixel touches at most its two neighbouring rings, with weights from the distance.
    assert ((basis > 0).sum(0) <= 2).all()
    r = 2
    np.testing.assert_allclose(basis[r][inside], np.clip(1 - np.abs(d[inside] - r), 0, None))


def test_bad_arguments_raise_clear_errors():
    with pytest.raises(ModelConfigError, match="odd"):
        SREConv2d(3, 8, 4)
    with pytest.raises(ModelConfigError, match="impl"):
        SREConv2d(3, 8, 5, impl="fft")
    with pytest.raises(ModelConfigError, match="rings"):
        SREConv2d(3, 8, 5, rings="fuzzy")
    with pytest.raises(ModelConfigError, match="groups"):
        SREConv2d(3, 8, 5, groups=2)


@pytest.mark.parametrize("impl", ["dense", "ring"])
def test_impulse_response_is_constant_on_each_ring(impl):
    conv = SREConv2d(1, 1, 9, impl=impl).eval()
    ring_values = torch.tensor([1.0, 2.0, 3.0, 5.0, 7.0])
    with torch.no_grad():
        conv.weight.copy_(ring_values.view(1, 1, 5))
        x = torch.zeros(1, 1, 21, 21)
        x[0, 0, 10, 10] = 1.0
        y = conv(x)[0, 0, 6:15, 6:15].numpy()
    idx = ring_index(9)
    for r in range(5):
        np.testing.assert_allclose(y[idx == r], ring_values[r].item(), rtol=1e-6)
    assert np.all(y[idx == -1] == 0.0)
    assert np.count_nonzero(conv(x).detach().numpy()) == 69


@pytest.mark.parametrize("rings", ["hard", "soft"])
@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: "x".join(map(str, c)))
def test_ring_equals_dense_forward_and_gradients(rings, cfg):
    cin, cout, k, stride, padding, dilation, groups, bias = cfg
    kwargs = dict(stride=stride, padding=padding, dilation=dilation, groups=groups, bias=bias, rings=rings)
    dense = SREConv2d(cin, cout, k, impl="dense", **kwargs)
    ring = SREConv2d(cin, cout, k, impl="ring", **kwargs)
    ring.load_state_dict(dense.state_dict())
    if bias:
        with torch.no_grad():
            dense.bias.normal_()
            ring.bias.copy_(dense.bias)
    x = torch.randn(2, cin, 29, 34, dtype=torch.float64, requires_grad=True)
    dense.double()
    ring.double()
    y_dense = dense(x)
    gy = torch.randn_like(y_dense)
    gx_dense, gw_dense = torch.autograd.grad(y_dense, (x, dense.weight), gy)
    y_ring = ring(x)
    gx_ring, gw_ring = torch.autograd.grad(y_ring, (x, ring.weight), gy)
    torch.testing.assert_close(y_ring, y_dense, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(gx_ring, gx_dense, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(gw_ring, gw_dense, rtol=1e-10, atol=1e-10)
    # Without autograd the ring path works in row strips; force many small ones.
    ring._strip_rows = lambda w_out: 4  # type: ignore[method-assign]
    with torch.no_grad():
        torch.testing.assert_close(ring(x), y_dense, rtol=1e-10, atol=1e-10)


def test_float32_agreement_on_a_large_map():
    dense = SREConv2d(32, 32, 9, impl="dense").eval()
    ring = SREConv2d(32, 32, 9, impl="ring").eval()
    ring.load_state_dict(dense.state_dict())
    x = torch.randn(1, 32, 96, 96)
    with torch.no_grad():
        a, b = dense(x), ring(x)
    assert float((a - b).abs().max() / a.abs().max()) < 1e-5


def _dense_ring_pair(c_in: int, c_out: int, k: int) -> tuple[SREConv2d, SREConv2d]:
    """A dense and a ring layer in eval mode with the same ring weights and the same nonzero bias."""
    dense = SREConv2d(c_in, c_out, k, impl="dense", bias=True).eval()
    ring = SREConv2d(c_in, c_out, k, impl="ring", bias=True).eval()
    ring.load_state_dict(dense.state_dict())
    with torch.no_grad():
        dense.bias.normal_()
        ring.bias.copy_(dense.bias)
    return dense, ring


@pytest.mark.parametrize("grad", [False, True])
def test_ring_path_runs_under_bf16_autocast_like_dense(grad):
    dense, ring = _dense_ring_pair(16, 24, 9)
    x = torch.randn(2, 16, 40, 40)
    with torch.set_grad_enabled(grad), torch.autocast("cpu", dtype=torch.bfloat16):
        a, b = dense(x), ring(x)
    assert a.dtype == b.dtype == torch.bfloat16
    with torch.no_grad():
        ref = dense(x)
    for out in (a, b):
        assert float((out.float() - ref).norm() / ref.norm()) < 2e-2


def test_dense_kernel_cache_follows_weight_updates():
    conv = SREConv2d(4, 4, 5, impl="dense").eval()
    with torch.no_grad():
        k1 = conv.dense_kernel()
        assert conv.dense_kernel() is k1  # cached in eval mode
        conv.weight.mul_(2.0)  # in-place update bumps the tensor version
        k2 = conv.dense_kernel()
    assert k2 is not k1
    torch.testing.assert_close(k2, 2 * k1)
    conv.train()
    assert conv.dense_kernel().requires_grad


def test_auto_picks_ring_for_wide_layers_and_for_the_rgb_stem_only_at_inference():
    assert SREConv2d(3, 64, 7).resolved_impl == "dense"
    assert SREConv2d(64, 64, 9).resolved_impl == "ring"
    assert SREConv2d(64, 64, 9, impl="dense").resolved_impl == "dense"
    with torch.no_grad():  # inference: the stem's rings are mixed in one GEMM, faster than dense
        assert SREConv2d(3, 64, 7).resolved_impl == "ring"
        assert SREConv2d(4, 8, 5, groups=2).resolved_impl == "dense"
        assert SREConv2d(64, 64, 9, impl="dense").resolved_impl == "dense"


@pytest.mark.skipif(not bf16_native("cpu"), reason="needs a CPU with bf16 units (AVX-512 BF16 or AMX)")
@pytest.mark.parametrize("width", [8, 64])
def test_auto_features_under_bf16_autocast_are_bit_identical_under_rot90(width):
    # The property `auto` keeps ring for under bf16 (models/sre_conv.py): oneDNN's dense stem on AMX
    # tiles broke it (up to 42% of layer-4 features off by up to 1e-2 relative).
    torch.manual_seed(0)
    model = srenet18(width=width).eval()
    x = torch.rand(1, 3, 128, 128)
    recalibrate_batchnorm(model, [x])
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert {m.resolved_impl for m in model.modules() if isinstance(m, SREConv2d)} == {"ring"}
        for layer in (2, 4):
            f = model.features(x, layer)
            for k in (1, 2, 3):
                g = torch.rot90(model.features(torch.rot90(x, k, (2, 3)), layer), -k, (2, 3))
                assert torch.equal(g, f), (layer, k, float((g - f).abs().max() / f.abs().max()))


@pytest.mark.parametrize("rings", ["hard", "soft"])
@pytest.mark.parametrize("impl", ["dense", "ring"])
@pytest.mark.parametrize("k", [3, 5, 7, 9])
def test_layer_is_d4_equivariant(k, impl, rings):
    conv = SREConv2d(5, 7, k, rings=rings, impl=impl, bias=True).eval()
    x = torch.randn(2, 5, 24, 24)
    errors = check_equivariance(conv, x, atol=1e-5, rtol=1e-6)
    assert set(errors) == set(D4_ELEMENTS)


def test_strided_layer_is_equivariant_on_aligned_inputs():
    # Stride 2 with padding k//2 samples a grid symmetric under the square's symmetries only when
    # (side - 1) is a multiple of the stride.
    conv = SREConv2d(4, 4, 5, stride=2).eval()
    check_equivariance(conv, torch.randn(1, 4, 33, 33), atol=1e-5, rtol=1e-6)


def test_plain_conv_is_not_equivariant():
    conv = torch.nn.Conv2d(5, 7, 5, padding=2).eval()
    with pytest.raises(AssertionError, match="not equivariant"):
        check_equivariance(conv, torch.randn(2, 5, 24, 24), atol=1e-3, rtol=1e-4)


# The inference path mixes rings in one GEMM for narrow layers and one GEMM per ring for wide ones;
# both are forced here on the same shapes. (in, out, kernel, stride, padding, dilation, bias, side)
INFERENCE_CONFIGS = [
    (8, 16, 9, 1, None, 1, True, (29, 34)),
    (8, 8, 5, 2, None, 1, True, (33, 33)),
    (6, 10, 7, 1, None, 2, False, (23, 19)),
    (4, 6, 5, 2, 1, 1, True, (17, 12)),
    (5, 7, 9, 1, None, 1, True, (3, 2)),  # a map smaller than the kernel (all padding)
    (3, 4, 1, 1, None, 1, False, (5, 5)),
]


# The strip path's ways to take and mix the ring sums: the C kernel's sums into one GEMM (float32
# and bf16 on CPU, where it builds); one grouped convolution for every ring into one GEMM (layers
# of at most _GROUPED_MAX_CHANNELS inputs), per-ring sums copied side by side into one GEMM (at
# most _FUSED_MAX_CHANNELS), one accumulating GEMM per ring (wider layers). Float64 runs the torch
# paths only.
PATHS = ["grouped", "one-gemm", "gemm-per-ring"]
KERNEL = _ring_kernel.load() is not None
needs_kernel = pytest.mark.skipif(not KERNEL, reason="the C ring-sum kernel did not build here (no cc?)")


def _force_path(conv: SREConv2d, path: str, monkeypatch) -> None:
    monkeypatch.setattr(sre_conv, "_FUSED_MAX_CHANNELS", 0 if path == "gemm-per-ring" else 1 << 30)
    conv._grouped_sums = path == "grouped"
    conv._use_kernel = path == "kernel"


# The kernel sums channels in blocks of 64 with masked tails: wider layers take several blocks.
KERNEL_CONFIGS = [
    *INFERENCE_CONFIGS,
    (64, 8, 9, 1, None, 1, True, (12, 13)),
    (80, 24, 9, 1, None, 1, True, (13, 11)),
    (130, 8, 5, 2, None, 1, False, (9, 10)),
]


@needs_kernel
@pytest.mark.parametrize("rows", [1, 3, 1000])
@pytest.mark.parametrize("cfg", KERNEL_CONFIGS, ids=lambda c: "x".join(map(str, c[:7])))
def test_kernel_path_equals_dense_in_float32(cfg, rows, monkeypatch):
    cin, cout, k, stride, padding, dilation, bias, (h, w) = cfg
    kwargs = dict(stride=stride, padding=padding, dilation=dilation, bias=bias)
    dense = SREConv2d(cin, cout, k, impl="dense", **kwargs).eval().double()
    ring = SREConv2d(cin, cout, k, impl="ring", **kwargs).eval()
    if bias:
        with torch.no_grad():
            dense.bias.normal_()
    ring.load_state_dict(dense.float().state_dict())
    dense.double()
    _force_path(ring, "kernel", monkeypatch)
    ring._strip_rows = lambda w_out: rows  # type: ignore[method-assign]
    calls = []
    real = _ring_kernel.ring_sums
    monkeypatch.setattr(_ring_kernel, "ring_sums", lambda *a: calls.append(1) or real(*a))
    x = torch.randn(2, cin, h, w)
    with torch.no_grad():
        ref = dense(x.double())
        out = ring(x)
        strips = ring._strip_path()  # not where the padding is narrower than the widest ring
    assert bool(calls) == strips
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))


@needs_kernel
@pytest.mark.parametrize("channels", [24, 80, 37])
@pytest.mark.parametrize("rings", ["hard", "soft"])
def test_kernel_bf16_sums_are_the_depthwise_sums_bit_for_bit(rings, channels, monkeypatch):
    # bf16 taps summed in float32 and rounded once, as oneDNN's depthwise kernels do: the same bits,
    # so the kernel keeps the torch path's exact rot90 behaviour.
    conv = SREConv2d(channels, 16, 9, rings=rings, impl="ring").eval()
    x = torch.randn(1, channels, 21, 19)
    outs = []
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        for path in ("kernel", "one-gemm"):
            _force_path(conv, path, monkeypatch)
            outs.append(conv(x))
    assert outs[0].dtype == torch.bfloat16
    if rings == "hard":
        assert torch.equal(outs[0], outs[1])
    else:
        torch.testing.assert_close(outs[0].float(), outs[1].float(), rtol=2e-2, atol=2e-2)


@needs_kernel
@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="AVX-512 is an x86 path")
@pytest.mark.parametrize("channels", [80, 37])  # 37: an odd tail in the bf16 blocks' channel pairs
def test_kernel_without_avx512_gives_the_same_sums(channels, tmp_path, monkeypatch):
    # Where the compiler targets no AVX-512 the kernel takes its plain C loops: the same sums
    # (bf16 hard-ring sums bit for bit: exact in float32 whatever the order of the taps).
    portable = tmp_path / "ring_sums-portable.so"
    _ring_kernel._build(portable, [*_ring_kernel._FLAGS, "-mno-avx512f"])
    libs = {"native": _ring_kernel.load(), "portable": _ring_kernel._bind(ctypes.CDLL(str(portable)))}
    image = torch.randn(17, 15, channels)
    for rings, dtype in (("soft", torch.float32), ("hard", torch.bfloat16), ("soft", torch.bfloat16)):
        conv = SREConv2d(channels, 8, 9, rings=rings, padding=3).eval()
        table = _ring_kernel.taps(conv.basis, conv.dilation)
        sums = {}
        for name, lib in libs.items():
            monkeypatch.setattr(_ring_kernel, "load", lambda lib=lib: lib)
            out = torch.full((5 * 13, conv.num_rings * channels), float("nan"), dtype=dtype)
            _ring_kernel.ring_sums(image.to(dtype), out, 2, 7, 13, 1, 3, table)
            sums[name] = out
        assert not sums["native"].isnan().any()
        if rings == "hard":
            assert torch.equal(sums["portable"], sums["native"])
        else:  # soft rings: float32 sums in another tap order, so bf16 may round one ulp apart
            tol = 1e-5 if dtype == torch.float32 else 1e-2
            torch.testing.assert_close(sums["portable"].float(), sums["native"].float(), rtol=tol, atol=tol)


def test_kernel_switched_off_falls_back_to_torch(monkeypatch):
    monkeypatch.setenv("EQUISLIDE_RING_KERNEL", "0")
    _ring_kernel.load.cache_clear()
    try:
        assert _ring_kernel.load() is None
        dense, ring = _dense_ring_pair(40, 8, 5)
        x = torch.randn(1, 40, 12, 12)
        with torch.no_grad():
            torch.testing.assert_close(ring(x), dense(x), rtol=1e-4, atol=1e-4)
    finally:
        monkeypatch.delenv("EQUISLIDE_RING_KERNEL")
        _ring_kernel.load.cache_clear()


@needs_kernel
def test_kernel_threads_are_torchs_openmp_runtime():
    # A second OpenMP runtime would fight torch's spinning workers for the cores. The kernel's
    # runtime sees torch.set_num_threads only if it is torch's own (another starts at the CPU count).
    lib = _ring_kernel.load()
    before = torch.get_num_threads()
    try:
        for n in (1, 3, 2):
            torch.set_num_threads(n)
            assert lib.omp_get_max_threads() == n
    finally:
        torch.set_num_threads(before)


def test_kernel_that_cannot_build_warns_once_and_falls_back(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setenv("CC", "false")  # a compiler that fails
    _ring_kernel.load.cache_clear()
    try:
        with caplog.at_level("WARNING", logger=_ring_kernel.__name__):
            assert _ring_kernel.load() is None
            assert _ring_kernel.load() is None
        assert [r.getMessage() for r in caplog.records] == [
            "SRE-Conv ring-sum kernel unavailable (false exited with 1); using torch's depthwise convolutions"
        ]
        assert not list(tmp_path.rglob("*.so"))  # nothing half-built left behind
        dense, ring = _dense_ring_pair(40, 8, 5)
        x = torch.randn(1, 40, 12, 12)
        with torch.no_grad():
            torch.testing.assert_close(ring(x), dense(x), rtol=1e-4, atol=1e-4)
    finally:
        _ring_kernel.load.cache_clear()


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("rows", [1, 3, 1000])
@pytest.mark.parametrize("cfg", INFERENCE_CONFIGS, ids=lambda c: "x".join(map(str, c[:7])))
def test_inference_paths_equal_dense_in_float64(cfg, rows, path, monkeypatch):
    cin, cout, k, stride, padding, dilation, bias, (h, w) = cfg
    kwargs = dict(stride=stride, padding=padding, dilation=dilation, bias=bias)
    dense = SREConv2d(cin, cout, k, impl="dense", **kwargs).eval().double()
    ring = SREConv2d(cin, cout, k, impl="ring", **kwargs).eval().double()
    ring.load_state_dict(dense.state_dict())
    _force_path(ring, path, monkeypatch)
    if bias:
        with torch.no_grad():
            dense.bias.normal_()
            ring.bias.copy_(dense.bias)
    ring._strip_rows = lambda w_out: rows  # type: ignore[method-assign]
    x = torch.randn(2, cin, h, w, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(ring(x), dense(x), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("path", [*PATHS, pytest.param("kernel", marks=needs_kernel)])
def test_inference_paths_under_bf16_autocast(path, monkeypatch):
    dense, ring = _dense_ring_pair(12, 20, 7)
    _force_path(ring, path, monkeypatch)
    with torch.no_grad():
        x = torch.randn(1, 12, 31, 26)
        ref = dense(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = ring(x)
        again = ring(x)  # a float32 call after the bf16 one: no bf16 weight may leak through the cache
    assert out.dtype == torch.bfloat16 and again.dtype == torch.float32
    assert float((out.float() - ref).norm() / ref.norm()) < 2e-2
    torch.testing.assert_close(again, ref, rtol=1e-4, atol=1e-4 * float(ref.abs().max()))


@pytest.mark.parametrize("cin", [8, 48])  # below and above _FUSED_MAX_CHANNELS
def test_mixing_weight_cache_follows_weight_updates(cin):
    dense = SREConv2d(cin, 8, 5, impl="dense").eval()
    ring = SREConv2d(cin, 8, 5, impl="ring").eval()
    ring.load_state_dict(dense.state_dict())
    x = torch.randn(1, cin, 16, 16)
    with torch.no_grad():
        ring(x)
        for conv in (dense, ring):
            conv.weight[:, :, 1].mul_(-3.0)  # in place: only the version counter changes
        a, b = dense(x), ring(x)
    assert float((a - b).abs().max() / a.abs().max()) < 1e-5


def test_srenet18_ring_features_match_dense_to_float32_rounding():
    dense = srenet18(impl="dense").eval()
    ring = srenet18(impl="ring").eval()
    ring.load_state_dict(dense.state_dict())
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        a, b = dense.features(x, 4), ring.features(x, 4)
    assert float((a - b).abs().max() / a.abs().max()) < 1e-5


def _random_bn(channels: int, affine: bool = True) -> torch.nn.BatchNorm2d:
    bn = torch.nn.BatchNorm2d(channels, affine=affine).eval()
    with torch.no_grad():
        bn.running_mean.uniform_(-1.0, 1.0)
        bn.running_var.uniform_(0.25, 4.0)
        if affine:
            bn.weight.uniform_(-1.5, 1.5)
            bn.bias.uniform_(-0.5, 0.5)
    return bn


def _composed(conv, bn, x, residual, relu):
    out = bn(conv(x))
    if residual is not None:
        out = out + residual
    return torch.relu(out) if relu else out


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("rows", [1, 4, 1000])
@pytest.mark.parametrize(
    ("bias", "affine", "residual", "relu"),
    [
        (False, True, False, True),
        (True, True, True, True),
        (False, False, True, False),
        (True, False, False, False),
    ],
)
def test_forward_bn_folds_batchnorm_residual_and_relu_exactly(
    path, rows, bias, affine, residual, relu, monkeypatch
):
    conv = SREConv2d(6, 10, 7, bias=bias, impl="ring").eval().double()
    _force_path(conv, path, monkeypatch)
    bn = _random_bn(10, affine).double()
    if bias:
        with torch.no_grad():
            conv.bias.normal_()
    conv._strip_rows = lambda w_out: rows  # type: ignore[method-assign]
    x = torch.randn(2, 6, 23, 18, dtype=torch.float64)
    res = torch.randn(2, 10, 23, 18, dtype=torch.float64) if residual else None
    with torch.no_grad():
        ref = _composed(conv, bn, x, res, relu)
        assert conv._can_fold(bn)
        out = conv.forward_bn(x, bn, residual=res, relu=relu)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)


def test_forward_bn_under_bf16_autocast_and_after_statistics_change():
    conv, bn = SREConv2d(12, 20, 5, impl="ring").eval(), _random_bn(20)
    x, res = torch.randn(1, 12, 31, 26), torch.randn(1, 20, 31, 26)
    with torch.no_grad():
        ref = _composed(conv, bn, x, res, True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = conv.forward_bn(x, bn, residual=res, relu=True)
        assert out.dtype == torch.bfloat16
        assert float((out.float() - ref).norm() / ref.norm()) < 2e-2
        bn.running_var.mul_(9.0)  # in place: the folded weight must follow
        bn.running_mean.add_(0.5)
        again = conv.forward_bn(x, bn, residual=res, relu=True)
        torch.testing.assert_close(again, _composed(conv, bn, x, res, True), rtol=1e-4, atol=1e-5)


def test_forward_bn_calls_the_modules_in_training_with_autograd_or_hooks():
    conv, bn = SREConv2d(8, 8, 5, impl="ring"), torch.nn.BatchNorm2d(8)
    x = torch.randn(2, 8, 12, 12)
    bn.train()
    conv.forward_bn(x, bn, relu=True).sum().backward()  # training: batch statistics, gradients
    assert int(bn.num_batches_tracked) == 1 and conv.weight.grad is not None
    bn.eval()
    assert not conv._can_fold(bn)  # autograd on
    with torch.no_grad():
        assert conv._can_fold(bn)
        seen = []
        handle = bn.register_forward_hook(lambda *_: seen.append(1))
        assert not conv._can_fold(bn)
        conv.forward_bn(x, bn)
        handle.remove()
        assert seen == [1]
        assert not SREConv2d(8, 8, 5, impl="dense").eval()._can_fold(bn)


def test_srenet18_folded_features_equal_the_module_by_module_pass():
    from torch.nn.modules import module as torch_module

    model = srenet18(impl="ring").eval().double()
    for bn in model.modules():
        if isinstance(bn, torch.nn.BatchNorm2d):
            bn.load_state_dict(_random_bn(bn.num_features).double().state_dict())
    assert "stem.0.weight" in model.state_dict() and "stem.1.running_var" in model.state_dict()
    x = torch.rand(1, 3, 48, 40, dtype=torch.float64)
    with torch.no_grad():
        folded = model.features(x, 4)
        handle = torch_module.register_module_forward_hook(lambda *_: None)  # any hook: no fold
        try:
            plain = model.features(x, 4)
        finally:
            handle.remove()
    torch.testing.assert_close(folded, plain, rtol=1e-9, atol=1e-9 * float(plain.abs().max()))


@pytest.mark.parametrize("rings", ["hard", "soft"])
def test_grouped_ring_sums_equal_dense_in_float64(rings):
    dense = SREConv2d(3, 16, 7, rings=rings, impl="dense", bias=True).eval().double()
    ring = SREConv2d(3, 16, 7, rings=rings, impl="ring", bias=True).eval().double()
    with torch.no_grad():
        dense.bias.normal_()
    ring.load_state_dict(dense.state_dict())
    assert ring._grouped_sums  # the RGB stem's shape takes its ring sums in one grouped convolution
    ring._strip_rows = lambda w_out: 5  # type: ignore[method-assign]
    x = torch.randn(2, 3, 21, 17, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(ring(x), dense(x), rtol=1e-10, atol=1e-10)


def test_ring_sums_on_the_exact_sum_grid_are_exact_in_float32():
    conv = SREConv2d(3, 4, 7)
    torch.manual_seed(0)
    # Values over 30 binary orders of magnitude, one image 1e6 times the other's scale.
    x = torch.randn(2, 3, 40, 40) * torch.exp2(torch.randint(-20, 10, (2, 3, 40, 40)).float())
    x[1] *= 1e6
    snapped = conv.on_exact_sum_grid(x)
    scale = x.abs().amax(dim=(1, 2, 3), keepdim=True)
    assert float(((snapped - x).abs() / scale).max()) <= 16 * 2**-23  # the outer ring's 16 taps
    for plane, _, identity in conv._ring_plan:
        if identity:
            continue
        w = plane.expand(3, 1, -1, -1).contiguous()
        p = plane.shape[-1] // 2
        ref = torch.nn.functional.conv2d(snapped.double(), w.double(), padding=p, groups=3)
        got = torch.nn.functional.conv2d(snapped, w, padding=p, groups=3)
        assert torch.equal(got.double(), ref)  # exact, whatever order the taps are summed in
        # Off the grid the same sums round along the way: not the exact sum, rounded once.
        raw = torch.nn.functional.conv2d(x, w, padding=p, groups=3)
        exact = torch.nn.functional.conv2d(x.double(), w.double(), padding=p, groups=3)
        assert not torch.equal(raw, exact.float())
    assert SREConv2d(3, 4, 7, rings="soft").on_exact_sum_grid(x) is x
    leaf = x.clone().requires_grad_()
    conv.on_exact_sum_grid(leaf).sum().backward()
    assert torch.equal(leaf.grad, torch.ones_like(x))  # straight through, not rounding's zero


def test_srenet_stem_computes_in_float32_under_autocast():
    torch.manual_seed(0)
    model = srenet18(width=8).eval()
    for bn in model.modules():
        if isinstance(bn, torch.nn.BatchNorm2d):
            bn.load_state_dict(_random_bn(bn.num_features).state_dict())
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        ref = model.stem(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model.stem(x)
            inner = model.stem[0](x)  # the conv alone computes in bf16
    assert out.dtype == torch.bfloat16 and ref.dtype == torch.float32 and inner.dtype == torch.bfloat16
    # Float32 results rounded once to bf16 (8 mantissa bits): within half a bf16 ulp of float32.
    assert float(((out.float() - ref).abs() / ref.abs().clamp_min(1e-3)).max()) <= 2**-8
    with torch.no_grad():
        model.double()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert model.stem(x.double()).dtype == torch.float64  # autocast leaves float64 alone
