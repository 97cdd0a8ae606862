"""BatchNorm recalibration: exact statistics over every calibration image, whatever the micro-batches."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from equislide.models import e2cnn_resnet18, recalibrate_batchnorm, resnet18, srenet18


def _bns(model: nn.Module) -> list[_BatchNorm]:
    return [m for m in model.modules() if isinstance(m, _BatchNorm)]


def _reference(model: nn.Module, x: torch.Tensor, layer: int) -> int:
    """The definition, computed the slow way: one full-batch eval pass per BatchNorm, in float64.

    Returns the number of BatchNorms the features of ``layer`` pass through.
    """
    reached = 0
    for bn in _bns(model):
        bn.reset_running_stats()
    model.eval()
    for bn in _bns(model):
        seen: list[torch.Tensor] = []
        handle = bn.register_forward_pre_hook(lambda _m, args, seen=seen: seen.append(args[0].double()))
        with torch.no_grad():
            model.features(x, layer)
        handle.remove()
        if seen:  # BatchNorms after ``layer`` keep their reset statistics
            reached += 1
            dims = [d for d in range(seen[0].ndim) if d != 1]
            bn.running_mean.copy_(seen[0].mean(dims))
            bn.running_var.copy_(seen[0].var(dims, correction=1))
    return reached


def _pair(make, seed: int = 0) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(seed)
    a = make()
    torch.manual_seed(seed)
    return a, make()


def _images(n: int, side: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(3)
    # Not zero-mean, not unit-scale: the first BatchNorm then has something to correct.
    return torch.rand(n, 3, side, side, generator=g) * 3 - 1


def _assert_same_statistics(ref: nn.Module, got: nn.Module) -> None:
    for i, (a, b) in enumerate(zip(_bns(ref), _bns(got), strict=True)):
        # Means compared in units of the channel's standard deviation (a mean may be ~0).
        mean_err = float(((a.running_mean - b.running_mean).abs() / a.running_var.sqrt()).max())
        assert mean_err < 1e-5, f"BatchNorm {i}: running_mean differs by {mean_err:.2g} sd"
        assert float(((a.running_var - b.running_var).abs() / a.running_var).max()) < 1e-5, (
            f"BatchNorm {i}: running_var differs"
        )


@pytest.mark.parametrize(
    ("make", "layer"),
    [
        (lambda: srenet18(width=4), 4),
        (lambda: resnet18(width=4), 3),
        (lambda: srenet18(width=4, antialias=3), 2),
    ],
    ids=["srenet18-l4", "resnet18-l3", "srenet18-antialias-l2"],
)
def test_micro_batches_give_the_exact_full_batch_statistics(make, layer):
    ref, got = _pair(make)
    x = _images(5, 24)
    reached = _reference(ref, x, layer)
    # Uneven micro-batches, and a budget of 0 bytes so every cached activation goes through disk.
    recalibrate_batchnorm(got, [x[:2], x[2:4], x[4:]], layer=layer, memory_budget=0)
    _assert_same_statistics(ref, got)
    assert not got.training
    later = _bns(got)[reached:]
    assert (layer == 4) == (not later)
    for bn in later:  # after ``layer``: the reset defaults
        assert torch.equal(bn.running_mean, torch.zeros_like(bn.running_mean))
        assert torch.equal(bn.running_var, torch.ones_like(bn.running_var))


def test_generic_path_is_exact_too():
    # The E2CNN backbone is walked as one opaque module: a pass per BatchNorm, each stopped there.
    ref, got = _pair(lambda: e2cnn_resnet18(width=4))
    x = _images(3, 24)
    _reference(ref, x, 2)
    recalibrate_batchnorm(got, [x[:1], x[1:]], layer=2)
    _assert_same_statistics(ref, got)


def test_spilled_and_in_memory_caches_give_identical_bits(tmp_path):
    a, b = _pair(lambda: srenet18(width=4))
    x = _images(4, 24)
    recalibrate_batchnorm(a, [x[:2], x[2:]], layer=3)
    recalibrate_batchnorm(b, [x[:2], x[2:]], layer=3, memory_budget=0, scratch=tmp_path)
    for ba, bb in zip(_bns(a), _bns(b), strict=True):
        assert torch.equal(ba.running_mean, bb.running_mean) and torch.equal(ba.running_var, bb.running_var)
    assert list(tmp_path.iterdir()) == []  # the spill folder is removed


def test_statistics_are_invariant_to_rotating_the_images():
    a, b = _pair(lambda: srenet18(width=4))
    x = _images(4, 24)
    recalibrate_batchnorm(a, [x[:2], x[2:]], layer=4)
    recalibrate_batchnorm(b, [torch.rot90(x[:2], 1, (2, 3)), torch.rot90(x[2:], 1, (2, 3))], layer=4)
    _assert_same_statistics(a, b)


def test_no_images_is_a_clear_error():
    with pytest.raises(ValueError, match="at least one batch"):
        recalibrate_batchnorm(srenet18(width=4), [], layer=1)


def test_bfloat16_activations_spill_and_come_back_unchanged(tmp_path):
    # Pretraining recalibrates under autocast: cached activations may be bfloat16, which numpy lacks.
    a, b = _pair(lambda: resnet18(width=4))
    x = _images(2, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        recalibrate_batchnorm(a, [x[:1], x[1:]], layer=2)
        recalibrate_batchnorm(b, [x[:1], x[1:]], layer=2, memory_budget=0, scratch=tmp_path)
    for ba, bb in zip(_bns(a), _bns(b), strict=True):
        assert torch.equal(ba.running_mean, bb.running_mean) and torch.equal(ba.running_var, bb.running_var)
