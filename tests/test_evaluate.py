"""Tests of equislide.evaluate: agreement metrics, Hungarian matching and ICC(3,1)."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from sklearn.metrics import cohen_kappa_score

from equislide.evaluate import (
    adjusted_rand,
    area_fraction_icc,
    cohen_kappa,
    confusion,
    dice_per_label,
    feature_icc,
    icc3_1,
    icc3_1_batch,
    match_labels,
    mean_dice,
    nmi,
    per_class_dice_after_matching,
    relabel,
    summarise,
)

# Shrout & Fleiss (1979), Table 2: 6 targets rated by 4 judges; ICC(3,1) = 0.71.
SHROUT_FLEISS = np.array(
    [[9, 2, 5, 8], [6, 1, 3, 2], [8, 4, 6, 8], [7, 1, 2, 6], [10, 5, 6, 9], [6, 2, 4, 7]], dtype=float
)


def _blocks(shape: tuple[int, int] = (60, 80), k: int = 4) -> np.ndarray:
    """A label map of k vertical bands with unequal widths (so no two labels tie)."""
    edges = np.cumsum(np.arange(1, k + 1))
    edges = (edges / edges[-1] * shape[1]).astype(int)
    cols = np.searchsorted(edges, np.arange(shape[1]), side="right")
    return np.broadcast_to(cols, shape).astype(np.int64).copy()


def _pingouin_icc3(x: np.ndarray) -> float:
    pd = pytest.importorskip("pandas")
    pg = pytest.importorskip("pingouin", reason="pingouin (dev extra) is the ICC reference")
    n, k = x.shape
    frame = pd.DataFrame({"t": np.repeat(np.arange(n), k), "r": np.tile(np.arange(k), n), "y": x.ravel()})
    with warnings.catch_warnings():  # pingouin's own pandas deprecations
        warnings.simplefilter("ignore")
        table = pg.intraclass_corr(data=frame, targets="t", raters="r", ratings="y")
    # pingouin < 0.6 names the row "ICC3", later versions "ICC(C,1)".
    row = table[table["Type"].isin(["ICC3", "ICC(C,1)"])]
    assert len(row) == 1, table
    return float(row["ICC"].iloc[0])


# ------------------------------------------------------------------ agreement of label maps


def test_identical_maps_give_kappa_and_dice_one() -> None:
    a = _blocks()
    assert cohen_kappa(a, a) == pytest.approx(1.0)
    assert mean_dice(a, a) == pytest.approx(1.0)
    assert all(v == pytest.approx(1.0) for v in dice_per_label(a, a).values())
    assert adjusted_rand(a, a) == pytest.approx(1.0)
    assert nmi(a, a) == pytest.approx(1.0)


def test_constant_identical_maps_give_kappa_one() -> None:
    a = np.full((5, 5), 3)
    assert cohen_kappa(a, a) == 1.0


def test_permuted_labels_dice_one_after_matching() -> None:
    a = _blocks(k=4)
    perm = np.array([2, 0, 3, 1])
    b = perm[a]
    assert mean_dice(a, b) < 0.5
    mapping = match_labels(a, b)
    assert mapping == {int(perm[i]): i for i in range(4)}
    assert mean_dice(a, relabel(b, mapping)) == pytest.approx(1.0)
    assert cohen_kappa(a, relabel(b, mapping)) == pytest.approx(1.0)
    # Label-name invariant scores need no matching.
    assert adjusted_rand(a, b) == pytest.approx(1.0)


def test_matching_with_different_label_counts() -> None:
    truth = _blocks(k=3)
    pred = _blocks(k=3)
    pred[:, :5] = 7  # an extra cluster carved out of class 0
    pred = np.array([5, 9, 2, 7])[np.searchsorted([0, 1, 2, 7], pred)]  # rename 0,1,2,7 -> 5,9,2,7
    mapping = match_labels(truth, pred)
    assert mapping == {5: 0, 9: 1, 2: 2}
    out = relabel(pred, mapping)
    assert set(np.unique(out).tolist()) == {0, 1, 2, 10}  # 7 unmatched -> fresh, beyond max label 9
    dice = per_class_dice_after_matching(pred, truth)
    assert set(dice) == {0, 1, 2}
    assert dice[1] == pytest.approx(1.0) and dice[2] == pytest.approx(1.0)
    assert 0.0 < dice[0] < 1.0
    # More classes than clusters: the class left without a cluster scores 0.
    dice_rev = per_class_dice_after_matching(np.zeros_like(truth), truth)
    assert sorted(dice_rev.values())[:2] == [0.0, 0.0]


def test_independent_random_maps_give_kappa_near_zero() -> None:
    rng = np.random.default_rng(0)
    a = rng.integers(0, 3, size=(200, 200))
    b = rng.integers(0, 3, size=(200, 200))
    assert abs(cohen_kappa(a, b)) < 0.02


@pytest.mark.parametrize("offset", [0, -1, 5000])
def test_kappa_matches_sklearn_with_valid_mask(offset: int) -> None:
    rng = np.random.default_rng(1)
    a = rng.integers(0, 4, size=(50, 70)) + offset
    b = np.where(rng.random((50, 70)) < 0.6, a, rng.integers(0, 5, size=(50, 70)) + offset)
    valid = rng.random((50, 70)) < 0.7
    expected = cohen_kappa_score(a[valid], b[valid])
    assert cohen_kappa(a, b, valid=valid) == pytest.approx(expected, abs=1e-12)
    assert cohen_kappa(a, b, valid=valid) != pytest.approx(cohen_kappa(a, b), abs=1e-6)


def test_confusion_and_dice_definitions() -> None:
    a = np.array([[0, 0, 1], [1, 2, 2]])
    b = np.array([[0, 1, 1], [1, 2, 0]])
    valid = np.array([[True, True, True], [True, True, False]])
    cm = confusion(a, b, valid=valid, k=4)
    expected = np.zeros((4, 4), dtype=np.int64)
    expected[0, 0] = expected[0, 1] = expected[2, 2] = 1
    expected[1, 1] = 2
    np.testing.assert_array_equal(cm, expected)
    dice = dice_per_label(a, b, valid=valid, labels=[0, 1, 2, 3])
    assert dice[0] == pytest.approx(2 * 1 / (2 + 1))
    assert dice[1] == pytest.approx(2 * 2 / (2 + 3))
    assert dice[2] == pytest.approx(1.0)
    assert np.isnan(dice[3])
    assert mean_dice(a, b, valid=valid) == pytest.approx(np.mean([2 / 3, 4 / 5, 1.0]))
    with pytest.raises(ValueError, match="k=2"):
        confusion(a, b, k=2)


def test_shape_mismatch_names_both_shapes() -> None:
    a = np.zeros((4, 5), dtype=int)
    b = np.zeros((5, 4), dtype=int)
    for fn in (cohen_kappa, mean_dice, adjusted_rand, nmi, confusion, match_labels):
        with pytest.raises(ValueError, match=r"\(4, 5\).*\(5, 4\)"):
            fn(a, b)
    with pytest.raises(ValueError, match=r"\(4, 4\).*\(4, 5\)"):
        cohen_kappa(a, a, valid=np.ones((4, 4), dtype=bool))
    with pytest.raises(ValueError, match="float64"):
        cohen_kappa(a.astype(float), a)


# ------------------------------------------------------------------ ICC


def test_icc_textbook_table() -> None:
    assert round(icc3_1(SHROUT_FLEISS), 2) == 0.71


def test_icc_matches_pingouin_textbook_and_random() -> None:
    rng = np.random.default_rng(2)
    tables = [SHROUT_FLEISS]
    for n, k in [(30, 4), (12, 2), (50, 8)]:
        target = rng.normal(size=(n, 1))
        tables.append(target + 0.7 * rng.normal(size=(n, k)) + rng.normal(size=(1, k)))
    for x in tables:
        assert icc3_1(x) == pytest.approx(_pingouin_icc3(x), abs=1e-10)


def test_icc_batch_equals_loop() -> None:
    rng = np.random.default_rng(3)
    x = rng.normal(size=(7, 25, 5)) + rng.normal(size=(7, 25, 1))
    x[3] = 2.5  # constant channel: undefined ICC
    batch = icc3_1_batch(x)
    assert batch.shape == (7,)
    loop = np.array([icc3_1(x[c]) for c in range(7)])
    np.testing.assert_allclose(batch, loop, rtol=0, atol=1e-14, equal_nan=True)
    assert np.isnan(batch[3]) and np.isfinite(np.delete(batch, 3)).all()


def test_icc_input_errors() -> None:
    with pytest.raises(ValueError, match=r"\(3,\)"):
        icc3_1(np.ones(3))
    with pytest.raises(ValueError, match=r"\(1, 4\)"):
        icc3_1(np.ones((1, 4)))
    with pytest.raises(ValueError, match="non-finite"):
        icc3_1(np.array([[1.0, np.nan], [2.0, 3.0]]))


def test_feature_icc() -> None:
    rng = np.random.default_rng(4)
    base = rng.normal(size=(300, 6))
    same = np.stack([base] * 4)  # (k_angles, n_pixels, channels)
    assert feature_icc(same) == pytest.approx(1.0)
    noisy = same + 0.5 * rng.normal(size=same.shape)
    expected = np.mean([icc3_1(noisy[:, :, c].T) for c in range(6)])
    assert feature_icc(noisy) == pytest.approx(expected, abs=1e-12)
    assert 0.5 < feature_icc(noisy) < 0.95
    noisy[:, :, 2] = 1.0  # a dead channel is skipped
    assert feature_icc(noisy) == pytest.approx(np.mean([icc3_1(noisy[:, :, c].T) for c in (0, 1, 3, 4, 5)]))


def test_area_fraction_icc() -> None:
    a = _blocks(k=4)
    maps = np.stack([a, a, a])
    valid = np.ones(maps.shape, dtype=bool)
    assert area_fraction_icc(maps, valid=valid, labels=range(4)) == pytest.approx(1.0)
    shifted = maps.copy()
    shifted[1, :, 8:12] = 0  # angle 1 grows cluster 0 at the expense of cluster 1
    value = area_fraction_icc([shifted, maps], valid=[valid, valid], labels=range(4))
    fractions = np.array([[np.mean(m == lab) for m in s] for s in (shifted, maps) for lab in range(4)])
    assert value == pytest.approx(icc3_1(fractions))
    assert 0.5 < value < 1.0
    with pytest.raises(ValueError, match="shape"):
        area_fraction_icc(maps, valid=valid[:, :-1], labels=range(4))


def test_summarise() -> None:
    assert summarise([1.0, 2.0, 3.0]) == {"mean": 2.0, "std": pytest.approx(1.0), "n": 3}
    assert summarise([0.4]) == {"mean": 0.4, "std": 0.0, "n": 1}
    with pytest.raises(ValueError):
        summarise([])
