"""Options for rotation-consistent segmentation stay exactly D4-equivariant (antialias, TTA, smoothing)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from equislide.models import (
    ModelConfigError,
    check_equivariance,
    load_checkpoint,
    recalibrate_batchnorm,
    save_checkpoint,
    srenet18,
)
from equislide.models.equivariance import D4_ELEMENTS
from equislide.models.kmeans import KMeansParams, fit_kmeans
from equislide.models.srenet import BlurPool2d
from equislide.models.tta import gaussian_blur, rotation_averaged_features, smoothed_labels


@pytest.mark.parametrize(("rings", "antialias"), [("hard", 3), ("soft", 3), ("hard", 5)])
def test_antialiased_srenet18_is_d4_equivariant_at_every_tap(rings, antialias):
    model = srenet18(rings=rings, antialias=antialias, width=8).eval()
    x = torch.randn(1, 3, 32, 32)
    recalibrate_batchnorm(model, [x])
    for layer in (1, 2, 3, 4):
        # Same tolerance as the plain network (test_backbones): float rounding only.
        check_equivariance(lambda t, layer=layer: model.features(t, layer), x, atol=1e-5, rtol=1e-3)


def test_antialias_changes_features_but_not_the_weights_layout(tmp_path: Path):
    plain = srenet18(width=8).eval()
    blurred = srenet18(width=8, antialias=True).eval()
    assert blurred.config["antialias"] == 3 and plain.config["antialias"] == 0
    # The blur is a fixed buffer kept out of state_dict: weights of either load into the other.
    assert plain.state_dict().keys() == blurred.state_dict().keys()
    blurred.load_state_dict(plain.state_dict())
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(plain.features(x, 1), blurred.features(x, 1))  # no pool before stage 2
        assert not torch.allclose(plain.features(x, 2), blurred.features(x, 2))
    loaded = load_checkpoint(save_checkpoint(blurred, tmp_path / "aa.safetensors"))
    assert loaded.config["antialias"] == 3
    with torch.no_grad():
        assert torch.equal(loaded.eval().features(x, 4), blurred.features(x, 4))


def test_blurpool_keeps_constants_and_halves_the_side():
    x = torch.full((2, 4, 16, 16), 3.0)
    for taps in (3, 5):
        out = BlurPool2d(taps)(x)
        assert out.shape == (2, 4, 8, 8)
        torch.testing.assert_close(out, torch.full_like(out, 3.0))


@pytest.mark.parametrize("bad", [2, 4, 7, "yes"])
def test_antialias_refuses_other_values(bad):
    with pytest.raises(ModelConfigError, match="antialias="):
        srenet18(width=8, antialias=bad)


def test_rotation_averaged_features_are_d4_equivariant():
    model = srenet18(width=8).eval()
    x = torch.randn(1, 3, 32, 32)
    recalibrate_batchnorm(model, [x])

    def tta(t: torch.Tensor) -> torch.Tensor:
        return rotation_averaged_features(lambda u: model.features(u, 2), t)

    # Bilinear rotations of rotated inputs agree to the rounding of the sampling grid.
    check_equivariance(tta, x, atol=1e-4, rtol=1e-3)
    with torch.no_grad():
        plain = model.features(x, 2)
        averaged = tta(x)
    assert averaged.shape == plain.shape
    assert not torch.allclose(averaged, plain)


def test_rotation_averaged_features_keep_lists_and_need_zero():
    model = srenet18(width=8).eval()
    x = torch.randn(1, 3, 32, 32)
    outs = rotation_averaged_features(lambda t: model.forward_intermediates(t, (1, 4)), x)
    assert [o.shape[-1] for o in outs] == [32, 4]
    with pytest.raises(ValueError, match="must include 0"):
        rotation_averaged_features(lambda t: t, x, angles=(45.0,))


def test_gaussian_blur_is_d4_equivariant_and_keeps_constants():
    x = torch.randn(1, 3, 17, 17)
    check_equivariance(lambda t: gaussian_blur(t, 1.3), x, atol=1e-6)
    c = torch.ones(1, 1, 9, 9)
    torch.testing.assert_close(gaussian_blur(c, 2.0), c)
    assert gaussian_blur(x, 0.0) is x


@pytest.mark.parametrize(("sigma", "out_size"), [(0.0, None), (1.0, None), (1.0, 48)])
def test_smoothed_labels_are_d4_equivariant(sigma, out_size):
    rng = np.random.default_rng(0)
    # Smooth features with three blobs, so label boundaries are not ties.
    f = gaussian_blur(torch.from_numpy(rng.standard_normal((1, 8, 16, 16), dtype=np.float32)), 2.0)
    centroids = torch.from_numpy(rng.standard_normal((3, 8), dtype=np.float32))
    ref = smoothed_labels(f, centroids, sigma=sigma, out_size=out_size)
    for name, g in D4_ELEMENTS.items():
        assert torch.equal(smoothed_labels(g(f), centroids, sigma=sigma, out_size=out_size), g(ref)), name
    assert ref.shape == (1, out_size or 16, out_size or 16)


def test_smoothed_labels_without_blur_match_kmeans_predict():
    rng = np.random.default_rng(1)
    f = rng.standard_normal((8, 12, 12)).astype(np.float32)
    model = fit_kmeans(
        f.reshape(8, -1).T.copy(), params=KMeansParams(k=3, backend="torch", device="cpu", l2_normalise=True)
    )
    labels = smoothed_labels(f, model.centroids, sigma=0.0)
    assert isinstance(labels, np.ndarray) and labels.shape == (12, 12)
    np.testing.assert_array_equal(labels, model.predict(f))
    with pytest.raises(ValueError, match="centroids of shape"):
        smoothed_labels(f, model.centroids[:, :4])
