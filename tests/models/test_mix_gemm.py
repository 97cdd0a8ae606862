"""The strip path's float32 mixing GEMM through oneDNN: the same outputs as torch.mm, and the fallbacks."""

from __future__ import annotations

import pytest
import torch

from equislide.models import SREConv2d, _mix_gemm, _ring_kernel, sre_conv, srenet18

needs_onednn = pytest.mark.skipif(_mix_gemm._op() is None, reason="torch was built without oneDNN (mkldnn)")


def _random_bn(channels: int) -> torch.nn.BatchNorm2d:
    bn = torch.nn.BatchNorm2d(channels).eval()
    with torch.no_grad():
        bn.running_mean.uniform_(-1.0, 1.0)
        bn.running_var.uniform_(0.25, 4.0)
        bn.weight.uniform_(-1.5, 1.5)
        bn.bias.uniform_(-0.5, 0.5)
    return bn


def _count_mix(monkeypatch) -> list[torch.dtype]:
    """The dtype of the sums of every call of the oneDNN GEMM from here on."""
    calls: list[torch.dtype] = []
    real = _mix_gemm.mix

    def mix(sums, *args):
        calls.append(sums.dtype)
        return real(sums, *args)

    monkeypatch.setattr(_mix_gemm, "mix", mix)
    return calls


# (in, out, kernel, side, path): the C kernel's sums, per-ring sums side by side, the grouped stem.
SHAPES = [
    (40, 24, 9, 19, "kernel"),
    (24, 16, 5, 17, "one-gemm"),
    (3, 16, 7, 21, "grouped"),
]


@needs_onednn
@pytest.mark.parametrize(("cin", "cout", "k", "side", "path"), SHAPES, ids=lambda v: str(v))
@pytest.mark.parametrize(("residual", "relu"), [(False, False), (False, True), (True, True), (True, False)])
def test_onednn_mixing_equals_torch_mm(cin, cout, k, side, path, residual, relu, monkeypatch):
    if path == "kernel" and _ring_kernel.load() is None:
        pytest.skip("the C ring-sum kernel did not build here (no cc?)")
    monkeypatch.setattr(_mix_gemm, "_MIN_MACS", 0)  # these small GEMMs would stay on torch.mm
    monkeypatch.setattr(sre_conv, "_FUSED_MAX_CHANNELS", 1 << 30)
    conv = SREConv2d(cin, cout, k, impl="ring", bias=True).eval()
    conv._use_kernel = path == "kernel"
    assert conv._grouped_sums == (path == "grouped")
    conv._strip_rows = lambda w_out: 4  # type: ignore[method-assign]
    with torch.no_grad():
        conv.bias.normal_()
    bn = _random_bn(cout)
    x = torch.randn(2, cin, side, side + 3)
    res = torch.randn(2, cout, side, side + 3) if residual else None
    calls = _count_mix(monkeypatch)
    with torch.no_grad():
        out = conv.forward_bn(x, bn, residual=res, relu=relu)
        plain = conv(x)
        assert calls, "the oneDNN GEMM was not called"
        conv._use_onednn = False
        before = len(calls)
        ref = conv.forward_bn(x, bn, residual=res, relu=relu)
        ref_plain = conv(x)
        assert len(calls) == before
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))
    torch.testing.assert_close(plain, ref_plain, rtol=1e-5, atol=1e-5 * float(ref_plain.abs().max()))


@needs_onednn
def test_srenet18_takes_onednn_for_float32_and_torch_mm_for_bf16(monkeypatch):
    model = srenet18(width=16, impl="ring").eval()
    x = torch.rand(1, 3, 64, 64)
    calls = _count_mix(monkeypatch)
    with torch.no_grad():
        onednn = model.features(x, 4)
        used = len(calls)
        for conv in model.modules():
            if isinstance(conv, SREConv2d):
                conv._use_onednn = False
        mm = model.features(x, 4)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            model.features(x, 4)
            for conv in model.modules():
                if isinstance(conv, SREConv2d):
                    conv._use_onednn = True
            model.features(x, 4)
    assert used > 0
    assert torch.bfloat16 not in calls  # bf16 mm is oneDNN's already: not routed (the stem stays float32)
    torch.testing.assert_close(onednn, mm, rtol=1e-4, atol=1e-5 * float(mm.abs().max()))


def test_switched_off_by_environment_or_torch_flag(monkeypatch):
    a, w = torch.randn(2048, 64), torch.randn(64, 16)
    monkeypatch.setenv("EQUISLIDE_ONEDNN_MIX", "0")
    _mix_gemm._op.cache_clear()
    try:
        assert _mix_gemm._op() is None and not _mix_gemm.usable(a, w)
    finally:
        monkeypatch.delenv("EQUISLIDE_ONEDNN_MIX")
        _mix_gemm._op.cache_clear()
    if _mix_gemm._op() is None:
        pytest.skip("torch was built without oneDNN (mkldnn)")
    assert _mix_gemm.usable(a, w)
    assert not _mix_gemm.usable(a.double(), w.double())  # float32 only
    assert not _mix_gemm.usable(a[:4], w)  # too small to pay oneDNN's call
    monkeypatch.setattr(torch.backends.mkldnn, "enabled", False)
    assert not _mix_gemm.usable(a, w)


@needs_onednn
def test_a_refused_call_falls_back_to_torch_mm_and_warns_once(monkeypatch, caplog):
    def refuse(*_args):
        raise RuntimeError("could not create a primitive")

    refuse.binary = refuse  # type: ignore[attr-defined]
    monkeypatch.setattr(_mix_gemm, "_op", lambda: refuse)
    monkeypatch.setattr(_mix_gemm, "_broken", [])
    monkeypatch.setattr(_mix_gemm, "_MIN_MACS", 0)
    conv = SREConv2d(24, 16, 5, impl="ring", bias=True).eval()
    dense = SREConv2d(24, 16, 5, impl="dense", bias=True).eval()
    dense.load_state_dict(conv.state_dict())
    x = torch.randn(1, 24, 15, 15)
    with torch.no_grad(), caplog.at_level("WARNING", logger=_mix_gemm.__name__):
        out = conv(x)
        again = conv(x)
    torch.testing.assert_close(out, dense(x), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(again, out)
    assert [r.getMessage() for r in caplog.records] == [
        "oneDNN matmul unavailable for the SRE-Conv mixing (could not create a primitive); using torch.mm"
    ]
