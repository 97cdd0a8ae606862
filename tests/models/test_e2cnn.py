"""The E2CNN ResNet-18 baseline: shapes, exact equivariance, parameter parity, numpy-2 shim."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from equislide.models import (
    D4_ELEMENTS,
    ModelConfigError,
    OptionalDependencyError,
    check_equivariance,
    e2cnn_resnet18,
    load_checkpoint,
    resnet18,
    save_checkpoint,
)

GROUPS = ("C8", "D4")
# Rotations by 90 degrees for both groups; D4 adds the flips. (C8's 45 degrees cannot be tested
# exactly on a pixel grid.)
ELEMENTS = {"C8": ("rot90", "rot180", "rot270"), "D4": tuple(D4_ELEMENTS)}
# float32 through up to 18 layers: observed errors are below 2e-6 of the map's maximum; a broken
# sampling grid is off by order 1 (test_stride_layout_is_not_exact_on_even_sides).
ATOL, RTOL = 1e-6, 1e-5


@pytest.fixture(scope="module")
def e2cnn():
    return pytest.importorskip("e2cnn")


@pytest.fixture(scope="module")
def small(e2cnn) -> dict[str, torch.nn.Module]:
    """Width-2 models in eval mode (BatchNorm running statistics), built once per module."""
    torch.manual_seed(0)
    return {group: e2cnn_resnet18(group, width=2).eval() for group in GROUPS}


@pytest.fixture(scope="module")
def blurred(e2cnn) -> dict[str, torch.nn.Module]:
    """As ``small``, with ``downsample="blurpool"``."""
    torch.manual_seed(0)
    return {group: e2cnn_resnet18(group, width=2, downsample="blurpool").eval() for group in GROUPS}


@pytest.fixture(scope="module")
def strided(e2cnn) -> torch.nn.Module:
    """The original stride-2 layout (``downsample="stride"``), D4, width 2."""
    torch.manual_seed(0)
    return e2cnn_resnet18("D4", width=2, downsample="stride").eval()


def _num_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_missing_extra_raises_optional_dependency_error(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "e2cnn", None)  # makes `import e2cnn` raise ImportError
    with pytest.raises(OptionalDependencyError, match=r"equislide\[baselines\]"):
        e2cnn_resnet18("D4", width=1)


@pytest.mark.parametrize("group", GROUPS)
def test_features_shapes_and_finite(small, group: str) -> None:
    model = small[group]
    assert model.feature_channels == (2, 4, 8, 16)
    assert model.feature_strides == (2, 4, 8, 16)
    assert model.config == {
        "arch": "e2cnn_resnet18",
        "group": group,
        "num_classes": 9,
        "width": 2,
        "in_chans": 3,
        "downsample": "pool",
    }
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        for layer in (1, 2, 3, 4):
            out = model.features(x, layer)
            s = model.feature_strides[layer - 1]
            assert type(out) is torch.Tensor
            assert out.shape == (2, model.feature_channels[layer - 1], 64 // s, 64 // s)
            assert torch.isfinite(out).all()
        assert model(x).shape == (2, 9)
        for out, layer in zip(model.forward_intermediates(x, (2, 4)), (2, 4), strict=True):
            assert torch.equal(out, model.features(x, layer))
    with pytest.raises(ModelConfigError, match="layer=5"):
        model.features(x, 5)
    with pytest.raises(ModelConfigError, match="expected"):
        model.features(torch.randn(1, 1, 64, 64), 1)


def test_defaults_are_d4_and_pool(e2cnn) -> None:
    # D4: SRENet's exact symmetry group (see the module docstring for the measured comparison).
    config = e2cnn_resnet18(width=1).config
    assert (config["group"], config["downsample"]) == ("D4", "pool")


def test_unknown_group_bad_width_and_bad_downsample(e2cnn) -> None:
    with pytest.raises(ModelConfigError, match="C4"):
        e2cnn_resnet18("C4")
    with pytest.raises(ModelConfigError, match="width"):
        e2cnn_resnet18("D4", width=0)
    with pytest.raises(ModelConfigError, match="downsample='maxpool'"):
        e2cnn_resnet18("D4", width=1, downsample="maxpool")


@pytest.mark.parametrize("side", [64, 256])
def test_blurpool_and_stride_layouts_keep_the_shapes(blurred, strided, side: int) -> None:
    x = torch.randn(1, 3, side, side)
    with torch.no_grad():
        for model in (blurred["C8"], blurred["D4"], strided):
            for layer, s in zip((1, 2, 3, 4), (2, 4, 8, 16), strict=True):
                assert model.features(x, layer).shape[-2:] == (side // s, side // s)


@pytest.mark.parametrize("side", [64, 256])
@pytest.mark.parametrize("group", GROUPS)
@pytest.mark.parametrize("layer", [1, 2, 3, 4])
def test_group_pooled_features_are_exactly_equivariant_on_even_sides(
    small, blurred, group: str, layer: int, side: int
) -> None:
    # Stride-1 convs and 2 x 2 means on even sides: D4 at all 7 non-trivial elements, C8 at its
    # 90-degree rotations. With features of side / s pixels, exact flips also pin the grid: feature
    # pixel j is centred on input pixel j * s + (s - 1) / 2, SRENet's grid.
    torch.manual_seed(side + layer)
    x = torch.randn(1, 3, side, side)
    for model in (small[group], blurred[group]):
        check_equivariance(
            lambda t, m=model: m.features(t, layer), x, atol=ATOL, rtol=RTOL, elements=ELEMENTS[group]
        )


@pytest.mark.parametrize("group", GROUPS)
def test_sides_that_are_multiples_of_8_only_are_exact_up_to_layer_3(small, group: str) -> None:
    # Whole-slide regions are read at sides 8k (856 for 512 px regions): every 2 x 2 mean up to
    # stride 8 still sees an even side, so layers 1-3 stay exact.
    x = torch.randn(1, 3, 88, 88)
    for layer in (1, 2, 3):
        check_equivariance(
            lambda t, layer=layer: small[group].features(t, layer),
            x,
            atol=ATOL,
            rtol=RTOL,
            elements=ELEMENTS[group],
        )


@pytest.mark.parametrize("layer", [1, 4])
def test_stride_layout_is_exact_on_sides_16k_plus_1(strided, layer: int) -> None:
    # Stride-2 convs sample pixels 0, 2, 4, ...: the grid maps onto itself under rot90 and flips
    # only when (side - 1) is a multiple of the total stride, 16 at layer 4; 65 is.
    x = torch.randn(1, 3, 65, 65)
    check_equivariance(lambda t: strided.features(t, layer), x, atol=ATOL, rtol=RTOL)


def test_stride_layout_is_not_exact_on_even_sides(strided) -> None:
    # The reason "pool" is the default: at 64 x 64 the stride-2 grid shifts by a pixel under rot90.
    with pytest.raises(AssertionError, match="not equivariant"):
        check_equivariance(lambda t: strided.features(t, 2), torch.randn(1, 3, 64, 64), atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("group", GROUPS)
def test_default_width_matches_resnet18_parameters(e2cnn, group: str) -> None:
    # Building the default (about 11 M parameters) takes e2cnn tens of seconds, so use that the count
    # is exactly quadratic in the width (convs ~ w^2; stem, BatchNorm and head ~ w): fit it on
    # widths 1-3, check the fit on width 4, then evaluate it at the default width.
    from equislide.models.e2cnn_resnet import DEFAULT_WIDTHS

    counts = [_num_parameters(e2cnn_resnet18(group, width=w)) for w in (1, 2, 3, 4)]
    second = counts[2] - 2 * counts[1] + counts[0]
    assert counts[3] - 3 * counts[2] + 3 * counts[1] - counts[0] == 0  # third difference of a quadratic
    a = second // 2
    b = counts[1] - counts[0] - 3 * a
    c = counts[0] - a - b
    w = DEFAULT_WIDTHS[group]
    predicted = a * w * w + b * w + c
    reference = _num_parameters(resnet18())
    assert abs(predicted - reference) <= 0.25 * reference, (predicted, reference)
    # The docstring's figures, so that they stay true.
    assert predicted == {"C8": 10_629_529, "D4": 11_485_497}[group]


def test_init_matches_e2cnn_generalized_he_init(e2cnn) -> None:
    from e2cnn import gspaces
    from e2cnn import nn as enn
    from e2cnn.nn.init import _generalized_he_init_variances

    from equislide.models._e2cnn_compat import ensure_e2cnn_numpy2_compat
    from equislide.models.e2cnn_resnet import _generalized_he_std

    ensure_e2cnn_numpy2_compat()
    for gspace in (gspaces.Rot2dOnR2(8), gspaces.FlipRot2dOnR2(4)):
        for in_repr, kernel in ((gspace.trivial_repr, 7), (gspace.regular_repr, 3)):
            conv = enn.R2Conv(
                enn.FieldType(gspace, 3 * [in_repr]),
                enn.FieldType(gspace, 2 * [gspace.regular_repr]),
                kernel,
                initialize=False,
            )
            assert torch.equal(_generalized_he_std(conv), _generalized_he_init_variances(conv.basisexpansion))


@pytest.mark.parametrize("downsample", ["pool", "blurpool"])
def test_state_dict_independent_of_mode_and_reload_refreshes_eval_cache(e2cnn, downsample: str) -> None:
    torch.manual_seed(1)
    source = e2cnn_resnet18("D4", width=1, downsample=downsample)
    target = e2cnn_resnet18("D4", width=1, downsample=downsample)
    keys = set(source.state_dict())
    assert not any(k.endswith((".filter", ".expanded_bias")) for k in keys)
    source.eval()
    assert set(source.state_dict()) == keys
    source.train()
    assert set(source.state_dict()) == keys
    source.eval()
    target.eval()  # caches target's own (different) filters ...
    target.load_state_dict(source.state_dict())  # ... which loading must replace
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(target.features(x, 4), source.features(x, 4))


def test_checkpoint_round_trip(e2cnn, tmp_path: Path) -> None:
    model = e2cnn_resnet18("C8", width=1, downsample="blurpool").eval()
    path = save_checkpoint(model, tmp_path / "e2.safetensors")
    loaded = load_checkpoint(path)
    assert loaded.config["downsample"] == "blurpool"
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded.features(x, 4), model.features(x, 4))


def test_numpy2_shim_builds_d4_convolutions(e2cnn) -> None:
    from e2cnn import gspaces
    from e2cnn import nn as enn
    from e2cnn.group import o2_group
    from e2cnn.kernels.utils import psi

    from equislide.models._e2cnn_compat import ensure_e2cnn_numpy2_compat

    ensure_e2cnn_numpy2_compat()
    ensure_e2cnn_numpy2_compat()  # idempotent
    gspace = gspaces.FlipRot2dOnR2(4)
    conv = enn.R2Conv(
        enn.FieldType(gspace, [gspace.trivial_repr]), enn.FieldType(gspace, [gspace.regular_repr]), 3
    )
    assert conv.basisexpansion.dimension() > 0
    assert psi(0.5, k=2).shape == (2, 2, 1, 1)  # np.array(copy=False) on a Python number
    o2 = o2_group(3)
    so2 = o2.subgroup((None, -1))[0]
    assert o2.induced_representation((None, -1), so2.irrep(1)).size == 4  # np.float
