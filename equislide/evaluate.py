"""Metrics of the rotation-consistency study and of agreement with annotations.

Two families live here:

* **Agreement of two label maps** (a cluster map against the same map computed on a rotated copy and
  rotated back, or a cluster map against an annotation): :func:`cohen_kappa`, :func:`confusion`,
  :func:`dice_per_label`, :func:`mean_dice`, :func:`adjusted_rand`, :func:`nmi`, with Hungarian
  label matching (:func:`match_labels`, :func:`relabel`, :func:`per_class_dice_after_matching`).
* **Reliability across angles** with the intraclass correlation ICC(3,1): :func:`icc3_1`,
  :func:`icc3_1_batch`, :func:`feature_icc`, :func:`area_fraction_icc`.

Label maps are integer arrays of the same shape; ``valid`` is an optional boolean mask of that shape
selecting the pixels that are scored (tissue, and inside the image at every angle). Every function
raises :class:`ValueError` naming the offending value (shape, dtype, label) when its input is wrong.
:func:`summarise` turns per-sample values into the mean ± std reported over samples, and
:func:`phantom_agreement` scores a run's cluster maps against the synthetic phantom's ground truth
(the demo's adjusted Rand index).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray
from scipy.optimize import linear_sum_assignment
from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

__all__ = [
    "phantom_agreement",
    "adjusted_rand",
    "area_fraction_icc",
    "cohen_kappa",
    "confusion",
    "dice_per_label",
    "feature_icc",
    "icc3_1",
    "icc3_1_batch",
    "match_labels",
    "mean_dice",
    "nmi",
    "per_class_dice_after_matching",
    "relabel",
    "summarise",
]

# Largest label value + 1 for which the joint histogram is a direct bincount (K * K cells); beyond it,
# or with negative labels, labels are first compressed with np.unique.
_DENSE_MAX_K = 2048
# Elements per chunk of channels in feature_icc (float64 working copies stay around 128 MiB).
_ICC_CHUNK_ELEMENTS = 1 << 24


# --------------------------------------------------------------------------------------------------
# input checking
# --------------------------------------------------------------------------------------------------


def _as_label_map(x: ArrayLike, name: str) -> NDArray[np.integer]:
    arr = np.asarray(x)
    if arr.dtype == np.bool_:
        return arr.astype(np.int64)
    if not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"{name} must be an integer label map, got dtype {arr.dtype}")
    return arr


def _valid_pixels(
    a: ArrayLike, b: ArrayLike, valid: ArrayLike | None, names: tuple[str, str] = ("a", "b")
) -> tuple[NDArray[np.integer], NDArray[np.integer]]:
    """The labels of ``a`` and ``b`` on valid pixels, as two 1-D arrays of equal length."""
    a_arr = _as_label_map(a, names[0])
    b_arr = _as_label_map(b, names[1])
    if a_arr.shape != b_arr.shape:
        raise ValueError(
            f"shape mismatch: {names[0]} has shape {a_arr.shape} but {names[1]} has shape {b_arr.shape}"
        )
    if valid is None:
        a_v, b_v = a_arr.ravel(), b_arr.ravel()
    else:
        mask = np.asarray(valid)
        if mask.shape != a_arr.shape:
            raise ValueError(
                f"shape mismatch: valid has shape {mask.shape} but {names[0]} and {names[1]} have shape "
                f"{a_arr.shape}"
            )
        if mask.dtype != np.bool_:
            raise ValueError(f"valid must be a boolean mask, got dtype {mask.dtype}")
        a_v, b_v = a_arr[mask], b_arr[mask]
    if a_v.size == 0:
        raise ValueError(f"no valid pixels to score (label maps of shape {a_arr.shape})")
    return a_v, b_v


def _joint(a_v: NDArray[np.integer], b_v: NDArray[np.integer]) -> tuple[NDArray[np.int64], NDArray[np.int64]]:
    """Sorted labels present in ``a_v`` or ``b_v`` and their (m, m) confusion matrix (rows ``a_v``)."""
    lo = min(int(a_v.min()), int(b_v.min()))
    hi = max(int(a_v.max()), int(b_v.max()))
    if lo >= 0 and hi < _DENSE_MAX_K:
        k = hi + 1
        cm = np.bincount(a_v.astype(np.int64) * k + b_v, minlength=k * k).reshape(k, k)
        present = (cm.sum(axis=1) > 0) | (cm.sum(axis=0) > 0)
        values = np.flatnonzero(present).astype(np.int64)
        return values, cm[np.ix_(present, present)]
    values, inverse = np.unique(np.concatenate([a_v, b_v]), return_inverse=True)
    m = values.size
    ia, ib = inverse[: a_v.size], inverse[a_v.size :]
    cm = np.bincount(ia.astype(np.int64) * m + ib, minlength=m * m).reshape(m, m)
    return values.astype(np.int64), cm


# --------------------------------------------------------------------------------------------------
# agreement of two label maps
# --------------------------------------------------------------------------------------------------


def confusion(
    a: ArrayLike, b: ArrayLike, *, valid: ArrayLike | None = None, k: int | None = None
) -> NDArray[np.int64]:
    """Confusion matrix of two label maps.

    ``C[i, j]`` is the number of valid pixels with label ``i`` in ``a`` and label ``j`` in ``b``
    (rows ``a``, columns ``b``).

    Args:
        a: Integer label map with labels in ``[0, k)``.
        b: Integer label map of the same shape.
        valid: Boolean mask of the same shape; only its True pixels are counted. Default: all.
        k: Number of labels (matrix size). Default: largest valid label + 1.

    Returns:
        The ``(k, k)`` int64 confusion matrix.

    Raises:
        ValueError: On a shape or dtype mismatch, no valid pixels, a negative label, a label ``>= k``
            or ``k < 1``.
    """
    a_v, b_v = _valid_pixels(a, b, valid)
    lo = min(int(a_v.min()), int(b_v.min()))
    hi = max(int(a_v.max()), int(b_v.max()))
    if lo < 0:
        raise ValueError(f"labels must be non-negative for a confusion matrix, found label {lo}")
    if k is None:
        k = hi + 1
    elif k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    elif hi >= k:
        raise ValueError(f"label {hi} does not fit a confusion matrix with k={k}")
    return np.bincount(a_v.astype(np.int64) * k + b_v, minlength=k * k).reshape(k, k)


def cohen_kappa(a: ArrayLike, b: ArrayLike, *, valid: ArrayLike | None = None) -> float:
    """Unweighted Cohen's kappa of two label maps.

    With ``C`` the confusion matrix over valid pixels and ``N`` their number,
    ``p_o = trace(C) / N`` is the observed agreement and ``p_e = sum_i (row_i * col_i) / N**2`` the
    agreement expected by chance from the label frequencies; ``kappa = (p_o - p_e) / (1 - p_e)``.
    When ``p_e == 1`` (both maps constant with the same label) kappa is taken as 1.0 (perfect
    agreement; scikit-learn returns nan there). Otherwise equal to
    :func:`sklearn.metrics.cohen_kappa_score` on the valid pixels. Labels are compared as values, so
    cluster maps must share their labelling (see :func:`match_labels`).

    Args:
        a: Integer label map.
        b: Integer label map of the same shape.
        valid: Boolean mask of the same shape selecting the scored pixels. Default: all pixels.

    Returns:
        Kappa in ``[-1, 1]``.

    Raises:
        ValueError: On a shape or dtype mismatch or when no pixel is valid.
    """
    a_v, b_v = _valid_pixels(a, b, valid)
    _, cm = _joint(a_v, b_v)
    n = float(a_v.size)
    rows = cm.sum(axis=1).astype(np.float64)
    cols = cm.sum(axis=0).astype(np.float64)
    if cm.shape[0] == 1:  # one label overall: both maps constant and equal
        return 1.0
    p_o = float(np.trace(cm)) / n
    p_e = float(rows @ cols) / (n * n)
    return float((p_o - p_e) / (1.0 - p_e))


def dice_per_label(
    a: ArrayLike,
    b: ArrayLike,
    *,
    valid: ArrayLike | None = None,
    labels: Iterable[int] | None = None,
) -> dict[int, float]:
    """Dice coefficient of each label between two label maps.

    For label ``l`` with ``A = {a == l}`` and ``B = {b == l}`` over valid pixels,
    ``Dice = 2 |A ∩ B| / (|A| + |B|)``; it is nan when ``l`` is absent from both maps.

    Args:
        a: Integer label map.
        b: Integer label map of the same shape.
        valid: Boolean mask of the same shape selecting the scored pixels. Default: all pixels.
        labels: Labels to score. Default: every label present (on valid pixels) in either map.

    Returns:
        ``{label: dice}`` in ascending label order (default) or in the order of ``labels``.

    Raises:
        ValueError: On a shape or dtype mismatch or when no pixel is valid.
    """
    a_v, b_v = _valid_pixels(a, b, valid)
    values, cm = _joint(a_v, b_v)
    inter = np.diag(cm)
    sizes = cm.sum(axis=1) + cm.sum(axis=0)
    index = {int(v): i for i, v in enumerate(values)}
    wanted = [int(v) for v in values] if labels is None else [int(v) for v in labels]
    out: dict[int, float] = {}
    for label in wanted:
        i = index.get(label)
        out[label] = float("nan") if i is None else float(2.0 * inter[i] / sizes[i])
    return out


def mean_dice(a: ArrayLike, b: ArrayLike, *, valid: ArrayLike | None = None) -> float:
    """Mean Dice over the labels present (on valid pixels) in either map.

    See :func:`dice_per_label` for the per-label definition; a label absent from both maps does not
    enter the mean. Labels are compared as values (match cluster labels first if needed).

    Raises:
        ValueError: On a shape or dtype mismatch or when no pixel is valid.
    """
    return float(np.mean(list(dice_per_label(a, b, valid=valid).values())))


def match_labels(ref: ArrayLike, other: ArrayLike, *, valid: ArrayLike | None = None) -> dict[int, int]:
    """Hungarian matching of the labels of ``other`` to those of ``ref``.

    Builds the confusion matrix between the labels present (on valid pixels) in ``other`` (rows) and
    in ``ref`` (columns) and solves the assignment maximising the total overlap
    (:func:`scipy.optimize.linear_sum_assignment` with ``maximize=True``), one-to-one. When the maps
    have different numbers of labels, ``min(n_other, n_ref)`` pairs are matched and the surplus
    labels of ``other`` are left out of the mapping (:func:`relabel` gives them fresh values).

    Args:
        ref: Reference integer label map (e.g. the annotation, or the cluster map at angle 0).
        other: Integer label map of the same shape whose labels are renamed.
        valid: Boolean mask of the same shape selecting the pixels that count. Default: all pixels.

    Returns:
        ``{other_label: ref_label}`` for the matched labels.

    Raises:
        ValueError: On a shape or dtype mismatch or when no pixel is valid.
    """
    ref_v, other_v = _valid_pixels(ref, other, valid, names=("ref", "other"))
    values, cm = _joint(other_v, ref_v)
    in_other = cm.sum(axis=1) > 0
    in_ref = cm.sum(axis=0) > 0
    sub = cm[np.ix_(in_other, in_ref)]
    rows, cols = linear_sum_assignment(sub, maximize=True)
    other_labels, ref_labels = values[in_other], values[in_ref]
    return {int(other_labels[r]): int(ref_labels[c]) for r, c in zip(rows, cols, strict=True)}


def relabel(labels: ArrayLike, mapping: Mapping[int, int]) -> NDArray[np.int64]:
    """Rename the labels of a label map.

    Each label ``l`` in ``mapping`` becomes ``mapping[l]``. Every other label (unmatched, including
    labels only present outside a ``valid`` mask) receives a fresh value larger than every input
    label and every mapping target, in ascending order of the original labels, so it collides with
    nothing.

    Args:
        labels: Integer label map of any shape.
        mapping: ``{old_label: new_label}``, e.g. from :func:`match_labels`; must be one-to-one.

    Returns:
        The relabelled map (int64, same shape).

    Raises:
        ValueError: On a non-integer label map or a mapping that sends two labels to the same value.
    """
    arr = _as_label_map(labels, "labels")
    targets = [int(v) for v in mapping.values()]
    if len(set(targets)) != len(targets):
        raise ValueError(f"mapping must be one-to-one, got {dict(mapping)}")
    if arr.size == 0:
        return arr.astype(np.int64)
    uniq, inverse = np.unique(arr, return_inverse=True)
    fresh = max([int(uniq[-1]), *targets]) + 1
    lut = np.empty(uniq.size, dtype=np.int64)
    for i, value in enumerate(uniq.tolist()):
        if value in mapping:
            lut[i] = int(mapping[value])
        else:
            lut[i] = fresh
            fresh += 1
    return lut[inverse].reshape(arr.shape)


def adjusted_rand(a: ArrayLike, b: ArrayLike, *, valid: ArrayLike | None = None) -> float:
    """Adjusted Rand index of two label maps over valid pixels.

    :func:`sklearn.metrics.adjusted_rand_score` (pair-counting agreement corrected for chance: 1 for
    identical partitions, about 0 for independent ones); invariant to label names.

    Raises:
        ValueError: On a shape or dtype mismatch or when no pixel is valid.
    """
    a_v, b_v = _valid_pixels(a, b, valid)
    return float(adjusted_rand_score(a_v, b_v))


def nmi(a: ArrayLike, b: ArrayLike, *, valid: ArrayLike | None = None) -> float:
    """Normalized mutual information of two label maps over valid pixels.

    :func:`sklearn.metrics.normalized_mutual_info_score` with its default arithmetic normalisation,
    ``NMI = I(a; b) / mean(H(a), H(b))``; invariant to label names.

    Raises:
        ValueError: On a shape or dtype mismatch or when no pixel is valid.
    """
    a_v, b_v = _valid_pixels(a, b, valid)
    return float(normalized_mutual_info_score(a_v, b_v))


def per_class_dice_after_matching(
    pred: ArrayLike, truth: ArrayLike, *, valid: ArrayLike | None = None
) -> dict[int, float]:
    """Dice per annotation class after mapping predicted clusters to classes.

    Clusters of ``pred`` are matched one-to-one to the classes of ``truth`` by :func:`match_labels`
    (Hungarian, maximal overlap); unmatched clusters get fresh labels and count as errors. The result
    is :func:`dice_per_label` of the relabelled prediction against ``truth`` for each class present
    in ``truth`` on valid pixels (a class with no matched cluster scores 0).

    Args:
        pred: Integer cluster map.
        truth: Integer annotation map of the same shape.
        valid: Boolean mask of the same shape (e.g. annotated pixels only). Default: all pixels.

    Returns:
        ``{class: dice}`` in ascending class order.

    Raises:
        ValueError: On a shape or dtype mismatch or when no pixel is valid.
    """
    _, truth_v = _valid_pixels(pred, truth, valid, names=("pred", "truth"))
    mapping = match_labels(truth, pred, valid=valid)
    matched = relabel(pred, mapping)
    classes = np.unique(truth_v).tolist()
    return dice_per_label(matched, truth, valid=valid, labels=classes)


# --------------------------------------------------------------------------------------------------
# intraclass correlation
# --------------------------------------------------------------------------------------------------


def icc3_1_batch(x: ArrayLike) -> NDArray[np.float64]:
    """ICC(3,1) of each channel of a batch of ratings tables, vectorised.

    Same definition as :func:`icc3_1`, computed independently for each ``x[c]``. A channel whose
    between-target and residual variation are both zero (to rounding), e.g. a constant channel, has
    no defined ICC and returns nan; average with :func:`numpy.nanmean` to skip them.

    Args:
        x: Array of shape ``(n_channels, n_targets, k_raters)`` with ``n_targets >= 2`` and
            ``k_raters >= 2``, finite.

    Returns:
        float64 array of shape ``(n_channels,)``.

    Raises:
        ValueError: On a wrong number of dimensions, fewer than 2 targets or raters, or non-finite
            values.
    """
    arr = np.asarray(x, dtype=np.float64)
    if arr.ndim != 3:
        raise ValueError(f"x must have shape (n_channels, n_targets, k_raters), got shape {arr.shape}")
    _, n, k = arr.shape
    if n < 2 or k < 2:
        raise ValueError(f"ICC needs at least 2 targets and 2 raters, got shape {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"x (shape {arr.shape}) contains non-finite values")
    grand = arr.mean(axis=(1, 2), keepdims=True)
    row = arr.mean(axis=2, keepdims=True)  # per target
    col = arr.mean(axis=1, keepdims=True)  # per rater
    ss_r = k * np.sum((row - grand) ** 2, axis=(1, 2))
    ss_e = np.sum((arr - row - col + grand) ** 2, axis=(1, 2))
    ms_r = ss_r / (n - 1)
    ms_e = ss_e / ((n - 1) * (k - 1))
    num = ms_r - ms_e
    den = ms_r + (k - 1) * ms_e
    # Rounding floor of the sums of squares: deviations are exact to ~eps * max|x| per cell.
    scale = np.max(np.abs(arr), axis=(1, 2))
    degenerate = (ss_r + ss_e) <= n * k * (64.0 * np.finfo(np.float64).eps * scale) ** 2
    out = np.full(arr.shape[0], np.nan)
    ok = ~degenerate
    out[ok] = num[ok] / den[ok]
    return out


def icc3_1(x: ArrayLike) -> float:
    """ICC(3,1): two-way mixed effects, consistency, single rater.

    Shrout & Fleiss (1979) ICC(3,1), McGraw & Wong (1996) ICC(C,1). For ratings ``x`` of ``n``
    targets (rows) by ``k`` raters (columns), with the two-way ANOVA mean squares
    ``MS_R = k * sum_i (mean_i - mean)**2 / (n - 1)`` (between targets) and
    ``MS_E = sum_ij (x_ij - mean_i - mean_j + mean)**2 / ((n - 1)(k - 1))`` (residual),
    ``ICC = (MS_R - MS_E) / (MS_R + (k - 1) MS_E)``. Systematic offsets between raters do not lower
    it (consistency, not absolute agreement). Equals the "ICC3" row of
    :func:`pingouin.intraclass_corr`.

    Args:
        x: Array of shape ``(n_targets, k_raters)``, ``n_targets >= 2``, ``k_raters >= 2``, finite.

    Returns:
        The ICC (at most 1; may be negative), or nan when between-target and residual variation are
        both zero (e.g. constant ratings).

    Raises:
        ValueError: On a wrong number of dimensions, fewer than 2 targets or raters, or non-finite
            values.
    """
    arr = np.asarray(x, dtype=np.float64)
    if arr.ndim != 2:
        raise ValueError(f"x must have shape (n_targets, k_raters), got shape {arr.shape}")
    if arr.shape[0] < 2 or arr.shape[1] < 2:
        raise ValueError(f"ICC needs at least 2 targets and 2 raters, got shape {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"x (shape {arr.shape}) contains non-finite values")
    return float(icc3_1_batch(arr[None])[0])


def feature_icc(features: ArrayLike) -> float:
    """Feature-level rotation consistency: ICC(3,1) per channel, averaged over channels.

    ``features[j, i, c]`` is channel ``c`` of the feature map computed at angle ``j`` and sampled at
    tracked tissue pixel ``i`` (the same physical location at every angle). For each channel the
    table ``features[:, :, c].T`` (targets = pixels, raters = angles) gives one :func:`icc3_1`; the
    result is their :func:`numpy.nanmean`, degenerate (constant) channels being skipped. Channels are
    processed in chunks to bound memory.

    Args:
        features: Array of shape ``(k_angles, n_pixels, channels)``, ``k_angles >= 2``,
            ``n_pixels >= 2``.

    Returns:
        The mean ICC over channels, or nan when every channel is degenerate.

    Raises:
        ValueError: On a wrong number of dimensions, too few angles or pixels, or non-finite values.
    """
    feats = np.asarray(features)
    if feats.ndim != 3:
        raise ValueError(f"features must have shape (k_angles, n_pixels, channels), got shape {feats.shape}")
    k, n, c = feats.shape
    if c == 0:
        raise ValueError(f"features has no channels (shape {feats.shape})")
    step = max(1, _ICC_CHUNK_ELEMENTS // max(1, k * n))
    values = []
    for start in range(0, c, step):
        chunk = np.transpose(feats[:, :, start : start + step], (2, 1, 0))  # (channels, pixels, angles)
        values.append(icc3_1_batch(chunk))
    per_channel = np.concatenate(values)
    if np.all(np.isnan(per_channel)):
        return float("nan")
    return float(np.nanmean(per_channel))


def _area_fractions(maps: NDArray[np.integer], mask: NDArray[np.bool_], labels: Sequence[int]) -> NDArray:
    """(n_labels, k_angles) fraction of valid pixels carrying each label, per angle."""
    k = maps.shape[0]
    flat_maps = maps.reshape(k, -1)
    flat_mask = mask.reshape(k, -1)
    totals = flat_mask.sum(axis=1)
    if np.any(totals == 0):
        raise ValueError(f"an angle has no valid pixels (valid counts per angle: {totals.tolist()})")
    out = np.empty((len(labels), k))
    for i, label in enumerate(labels):
        out[i] = np.count_nonzero((flat_maps == label) & flat_mask, axis=1) / totals
    return out


def area_fraction_icc(
    label_maps: ArrayLike | Sequence[ArrayLike],
    *,
    valid: ArrayLike | Sequence[ArrayLike],
    labels: Sequence[int],
) -> float:
    """ICC(3,1) of per-cluster area fractions across angles.

    For each angle ``j`` and cluster ``l`` the area fraction is the share of valid pixels labelled
    ``l``. The ICC table has targets = clusters (clusters of several samples stacked, when a sequence
    of samples is given) and raters = angles; see :func:`icc3_1`. Cluster labels must be shared
    across angles (one K-means model applied to every angle), not re-fitted per angle.

    Note:
        This metric barely separates backbones: clusters differ far more in size than any backbone's
        fractions drift with rotation, so between-target variance dominates and the ICC sits near 1
        even for non-equivariant features. Prefer :func:`feature_icc` and pixel-level agreement
        (:func:`cohen_kappa`, :func:`mean_dice`) to compare backbones.

    Args:
        label_maps: Integer ndarray ``(k_angles, *spatial)`` for one sample, or a sequence of such
            arrays (one per sample, all with the same ``k_angles``).
        valid: Boolean mask matching ``label_maps`` (an array of the same shape for one sample, a
            sequence of such arrays for several).
        labels: Cluster labels to use as targets.

    Returns:
        The ICC, or nan when the table is degenerate.

    Raises:
        ValueError: On shape or dtype mismatches, different numbers of angles across samples, an
            angle with no valid pixels, fewer than 2 targets in total or fewer than 2 angles.
    """
    if isinstance(label_maps, np.ndarray):
        samples: list[ArrayLike] = [label_maps]
        masks: list[ArrayLike] = [np.asarray(valid)]
    else:
        samples = list(label_maps)
        masks = list(valid)
    if len(samples) != len(masks):
        raise ValueError(f"got {len(samples)} label-map samples but {len(masks)} valid masks")
    if len(samples) == 0:
        raise ValueError("label_maps is empty")
    labels = [int(v) for v in labels]
    tables = []
    angles: int | None = None
    for s, (maps_in, mask_in) in enumerate(zip(samples, masks, strict=True)):
        maps = _as_label_map(maps_in, f"label_maps[{s}]")
        mask = np.asarray(mask_in)
        if maps.ndim < 2:
            raise ValueError(f"label_maps[{s}] must have shape (k_angles, *spatial), got shape {maps.shape}")
        if mask.shape != maps.shape:
            raise ValueError(
                f"shape mismatch: valid[{s}] has shape {mask.shape} but label_maps[{s}] has shape "
                f"{maps.shape}"
            )
        if mask.dtype != np.bool_:
            raise ValueError(f"valid[{s}] must be a boolean mask, got dtype {mask.dtype}")
        if angles is None:
            angles = maps.shape[0]
        elif maps.shape[0] != angles:
            raise ValueError(f"label_maps[{s}] has {maps.shape[0]} angles but label_maps[0] has {angles}")
        tables.append(_area_fractions(maps, mask, labels))
    return icc3_1(np.concatenate(tables, axis=0))


# --------------------------------------------------------------------------------------------------
# summaries
# --------------------------------------------------------------------------------------------------


def summarise(values: Iterable[float]) -> dict[str, float | int]:
    """Mean ± standard deviation of a metric over samples.

    Args:
        values: One value per sample.

    Returns:
        ``{"mean": mean, "std": sample standard deviation (ddof=1) when n > 1 else 0.0, "n": n}``.

    Raises:
        ValueError: When ``values`` is empty or not one-dimensional.
    """
    arr = np.asarray(list(values), dtype=np.float64)
    if arr.ndim != 1 or arr.size == 0:
        raise ValueError(f"values must be a non-empty 1-D sequence, got shape {arr.shape}")
    n = int(arr.size)
    std = float(np.std(arr, ddof=1)) if n > 1 else 0.0
    return {"mean": float(np.mean(arr)), "std": std, "n": n}


def phantom_agreement(report: dict[str, Any], phantom_json: str | Path) -> dict[str, Any]:
    """Adjusted Rand index of the cluster maps against the phantom's classes, on tissue pixels.

    Every label-map pixel's centre is mapped to the slide's level-0 plane and the ground truth is read
    there (nearest), so both lie on the label map's grid; pixels where either says "no tissue" are left
    out. All cores are pooled (the cohort model gives one set of cluster IDs).
    """
    import tifffile
    import zarr

    from equislide.storage import read_sample_meta
    from equislide.tiling import read_phantom_info

    info = read_phantom_info(phantom_json)
    truth = tifffile.imread(info.labels_path)
    d = info.label_downsample
    pred_all, true_all, per_core = [], [], {}
    for sid, s in report["samples"].items():
        if s["status"] == "failed" or "ome_zarr" not in s["outputs"]:
            continue
        labels = np.asarray(zarr.open_array(str(Path(s["outputs"]["ome_zarr"]) / "labels/clusters/0"))[:])
        store = s["outputs"]["tiles"]
        meta = read_sample_meta(store)
        coords = np.asarray(zarr.open_group(store, mode="r")["coords"][:])
        stride = _stride(meta, labels, coords)
        l0_per_l = meta["l0_per_l"]
        lx0, ly0 = coords.min(0)
        rows, cols = labels.shape[-2:]
        l0_x = (lx0 + (np.arange(cols) + 0.5) * stride) * l0_per_l[0]
        l0_y = (ly0 + (np.arange(rows) + 0.5) * stride) * l0_per_l[1]
        ty = np.clip((l0_y // d).astype(int), 0, truth.shape[0] - 1)
        tx = np.clip((l0_x // d).astype(int), 0, truth.shape[1] - 1)
        gt = truth[ty][:, tx]
        lab = labels.reshape(rows, cols)
        keep = (lab > 0) & (gt > 0)
        if keep.sum() < 2:
            continue
        pred_all.append(lab[keep])
        true_all.append(gt[keep])
        per_core[sid] = float(adjusted_rand_score(gt[keep], lab[keep]))
    if not pred_all:
        return {"ari": float("nan"), "pixels": 0, "per_core": {}}
    pred, true = np.concatenate(pred_all), np.concatenate(true_all)
    return {"ari": float(adjusted_rand_score(true, pred)), "pixels": int(pred.size), "per_core": per_core}


def _stride(meta: dict[str, Any], labels, coords) -> int:
    """Analysis px per label px: the stitched map spans the tiles' extent."""
    span = int(coords[:, 0].max() - coords[:, 0].min()) + int(meta["tile"])
    return max(1, int(np.rint(span / labels.shape[-1])))
