"""The consistency stage: how stable a sample's segmentation is when the sample is rotated.

The protocol (Du et al., SRE-Conv, ISBI 2025; per sample and backbone):

1. Take the sample at the analysis resolution as a square image: a TMA core whole (its stored tile,
   centred on a white canvas that holds it at every angle: :func:`canvas_side`), or up to
   ``regions`` square regions of a whole slide, centred on tissue and spread over it
   (:func:`slide_regions`), read from the slide with slide around the scored disc.
2. Rotate the image by every angle (counter-clockwise about the image centre, white fill;
   :func:`equislide.tiling.rotate_image`) and compute its layer-L features. Either way the network
   sees the same content turned at every angle, never a square with its corners cut off.
3. Fit K-means on the 0-degree features alone (paper mode: k = 3 on up to 2000 sampled,
   L2-normalised tissue vectors), or take the cohort model (cohort mode), and label every angle's
   features with the same centroids: no label matching is needed.
4. Upsample each label map to analysis pixels (nearest), rotate it back by minus its angle (nearest;
   :func:`equislide.tiling.unrotate_labels`) and compare it with the 0-degree map on *valid* pixels:
   tissue at 0 degrees (:func:`equislide.tiling.tissue_mask` of the 0-degree image), inside the
   scored area (a core: all of it; a whole-slide region: its central disc, inside the frame at
   every angle) and with a source inside the rotated frame.
5. Score Cohen's kappa and mean Dice per angle (:mod:`equislide.evaluate`); the feature-level ICC(3,1)
   over ``track`` tissue pixels followed through every angle (targets = pixels, raters = angles,
   averaged over channels); and the clusters' area fractions per angle (their ICC is taken over
   samples by the study).

Rotations by multiples of 90 degrees of a square image are exact (``numpy.rot90``), so an exactly
D4-equivariant network scores 1.000 there; other angles interpolate the image (bilinear), which with
nearest resampling of the label map alone costs about 1 % of agreement.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from equislide.specs import ClusterSpec

__all__ = [
    "CONSISTENCY_SUFFIX",
    "SERVICE_SPEC",
    "BUDGET",
    "annotation_agreement",
    "budget_plan",
    "canvas_side",
    "region_side",
    "find_annotation",
    "is_off90",
    "choose_samples",
    "read_annotation",
    "figures",
    "ConsistencySpec",
    "rotation_consistency",
    "sample_images",
    "slide_regions",
    "store_consistency",
    "sample_consistency",
]

#: Per-sample result file beside the sample's outputs.
CONSISTENCY_SUFFIX = ".consistency.json"


@dataclass(frozen=True)
class ConsistencySpec:
    """How a sample is rotated and scored.

    Attributes:
        angles: Angles in degrees, counter-clockwise; the first is the reference and should be 0.
        regions: Most square regions per whole slide (a TMA core is always one region: itself).
        region: Diameter of a whole-slide region's scored disc, analysis pixels (a multiple of 8). The
            square read around it is ``context`` px larger on every side than the disc's enclosing
            square rotated by 45 degrees, so at every angle the scored disc sees slide around it, as a
            rotated slide would, never the white corners of a rotated crop.
        track: Tissue pixels followed through every angle for the feature-level ICC.
        seed: Seeds the choice of regions and of tracked pixels.
        labels: ``"nearest"``: each feature pixel's nearest centroid, repeated over its stride x stride
            analysis pixels; ``"upsampled"``: the per-cluster distance maps upsampled bilinearly to
            analysis pixels before the arg-min (:func:`equislide.models.tta.smoothed_labels`), so
            boundaries fall between feature pixels. Both are exact under the square's symmetries.
        disc_input: Whiten the image outside its inscribed disc at every angle, so that every rotated
            copy shows the network the same tissue (the corners of a square are otherwise tissue at
            0 degrees and glass at 45).
        canvas: A bare square (a TMA core, an image or tile: no slide around it) is centred on a white
            canvas that holds it whole at every angle (:func:`canvas_side`) before it is rotated, so
            each rotated copy is the same square turned, never one with its corners cut off and
            glass put in; it is then scored on all its tissue, corners included. Whole-slide regions
            are read with slide around them instead (``context``) and are never padded.
    """

    angles: tuple[float, ...] = tuple(30.0 * i for i in range(12))
    regions: int = 4
    region: int = 1024
    track: int = 1000
    seed: int = 0
    labels: str = "upsampled"
    disc_input: bool = False
    context: int = 64
    canvas: bool = True

    def __post_init__(self) -> None:
        angles = tuple(float(a) for a in self.angles)
        if not angles or angles[0] % 360 != 0:
            raise ValueError(f"angles={self.angles!r} must start at 0 (the reference)")
        if any(not math.isfinite(a) for a in angles):
            raise ValueError(f"angles={self.angles!r} must be finite")
        if self.regions < 1:
            raise ValueError(f"regions={self.regions} must be >= 1")
        if self.region < 64 or self.region % 8:
            raise ValueError(f"region={self.region} must be a multiple of 8, at least 64 px")
        if self.track < 0:
            raise ValueError(f"track={self.track} must be >= 0")
        if self.labels not in ("nearest", "upsampled"):
            raise ValueError(f"labels={self.labels!r}; use 'nearest' or 'upsampled'")
        object.__setattr__(self, "angles", angles)

    @classmethod
    def steps(cls, n: int, **kwargs: Any) -> ConsistencySpec:
        """``n`` equal steps around the circle: ``steps(12)`` is 0, 30, ..., 330 degrees."""
        if n < 2:
            raise ValueError(f"angles={n} must be >= 2 steps (0 degrees and at least one other)")
        return cls(angles=tuple(360.0 * i / n for i in range(n)), **kwargs)


#: What ``equislide segment --consistency`` scores by default: one off-90 angle (30 degrees; for an
#: exactly D4-equivariant network every off-90 multiple of 30 is 30 or 60 up to a symmetry of the
#: square) on up to 4 regions of 512 px per input (TMA slides: 4 cores, spread over the array).
SERVICE_SPEC = ConsistencySpec(angles=(0.0, 30.0), regions=4, region=512, track=500)


def choose_samples(samples: Sequence[str], n: int) -> list[str]:
    """Up to ``n`` of an input's samples (its TMA cores, in grid order), evenly spread over them."""
    samples = list(samples)
    if len(samples) <= n:
        return samples
    return [samples[(i * len(samples)) // n + len(samples) // (2 * n)] for i in range(n)]


#: Share of a run's feature work ``segment --consistency`` may add (the issue's "about a quarter").
BUDGET = 0.25


def region_side(spec: ConsistencySpec) -> int:
    """Side of the square read around a whole-slide region (its scored disc plus context), a multiple of
    16: the largest feature stride of the baselines (ResNet-18 and E2CNN at layer 4)."""
    return 16 * math.ceil((spec.region * math.sqrt(2) + 2 * spec.context) / 16)


#: The bare-square canvas is a multiple of this (every backbone's largest feature stride), so its
#: feature grid is centred and 90-degree turns stay exact.
CANVAS_MULTIPLE = 32


def canvas_side(side: int) -> int:
    """Side of the white canvas that holds a ``side``-px square at every angle: at least its diagonal,
    a multiple of :data:`CANVAS_MULTIPLE`. The margins are equal when ``side`` is even, as every
    stride-aligned square is (an odd one would sit a pixel off-centre, so 90 degrees is not exact)."""
    return CANVAS_MULTIPLE * math.ceil(side * math.sqrt(2) / CANVAS_MULTIPLE)


def _on_canvas(image: np.ndarray) -> tuple[np.ndarray, slice]:
    side = image.shape[0]
    big = canvas_side(side)
    o = (big - side) // 2
    out = np.full((big, big, 3), 255, np.uint8)
    out[o : o + side, o : o + side] = image
    return out, slice(o, o + side)


def budget_plan(
    samples: Sequence[tuple[str, str, int, int, str]], spec: ConsistencySpec, *, budget: float = BUDGET
) -> dict[str, int]:
    """Which samples ``segment --consistency`` scores, and how many regions each: ``{sample_id: regions}``.

    ``samples`` are ``(sample_id, input, n_tiles, stored tile side, kind)``. Work is counted in
    network pixels: a sample's features cost ``n_tiles x side²``; scoring costs ``len(angles)`` forward
    passes of each region (a TMA core: the core; a whole-slide region: :func:`region_side` squared).
    Per input, as many regions as keep the added work within ``budget`` of the input's feature work,
    at least one and at most ``spec.regions`` (TMA cores: :func:`choose_samples`, spread over the
    array). Small inputs therefore pay more than the budget for their one region.
    """
    by_input: dict[str, list[tuple[str, int, int, str]]] = {}
    for sid, source, n_tiles, side, kind in samples:
        by_input.setdefault(source, []).append((sid, n_tiles, side, kind))
    plan: dict[str, int] = {}
    n_angles = len(spec.angles)
    for members in by_input.values():
        work = sum(n * side**2 for _, n, side, _ in members)
        if len(members) == 1 and members[0][3] != "tma_core":
            sid, _, _, _ = members[0]
            per_region = n_angles * region_side(spec) ** 2
            plan[sid] = max(1, min(spec.regions, int(budget * work // per_region)))
            continue
        core = max(side for _, _, side, _ in members)
        per_core = n_angles * (canvas_side(core) if spec.canvas else core) ** 2
        k = max(1, min(spec.regions, int(budget * work // per_core)))
        for sid in choose_samples([m[0] for m in members], k):
            plan[sid] = 1
    return plan


def figures(doc: dict[str, Any]) -> dict[str, Any]:
    """The few numbers of a sample's consistency document that go into ``run.json`` and the tables."""
    keys = ("kappa_off90", "dice_off90", "kappa_90", "dice_90", "icc_feature", "seconds")
    return {k: doc.get(k) for k in keys} | {"path": doc.get("path"), "regions": len(doc.get("regions", []))}


def _disc(side: int, margin: float = 0.0) -> np.ndarray:
    """Pixels whose centre lies inside the disc inscribed in a ``side`` square (less ``margin`` px of
    radius): inside the frame at any angle."""
    c = (side - 1) / 2
    yy, xx = np.mgrid[0:side, 0:side]
    return (xx - c) ** 2 + (yy - c) ** 2 <= (side / 2 - 1 - margin) ** 2


def _features(model: Any, image: np.ndarray, *, layer: int, device: str, precision: str) -> np.ndarray:
    from equislide.models.extract import extract_features

    return extract_features(model, image[None], layer=layer, halo=0, device=device, precision=precision)[0]


def _tracked(valid: np.ndarray, n: int, seed: int) -> np.ndarray:
    """Up to ``n`` (row, col) of valid pixels, seeded."""
    rows, cols = np.nonzero(valid)
    if not len(rows) or n == 0:
        return np.zeros((0, 2), np.int64)
    pick = np.random.default_rng(seed).choice(len(rows), size=min(n, len(rows)), replace=False)
    return np.stack([rows[np.sort(pick)], cols[np.sort(pick)]], 1)


def _sample_rotated(features: np.ndarray, points: np.ndarray, degrees: float, side: int) -> np.ndarray:
    """Features of the rotated image at the rotated positions of 0-degree pixels, ``(n, C)`` (bilinear).

    A pixel at ``(x, y)`` from the centre moves to ``(x cos t + y sin t, -x sin t + y cos t)`` when the
    image turns counter-clockwise by ``t`` as displayed (y down), the convention of ``rotate_image``.
    """
    from scipy.ndimage import map_coordinates

    c = (side - 1) / 2
    t = math.radians(degrees)
    x, y = points[:, 1] - c, points[:, 0] - c
    xr, yr = x * math.cos(t) + y * math.sin(t) + c, -x * math.sin(t) + y * math.cos(t) + c
    stride = side // features.shape[-1]
    fr, fc = (yr - (stride - 1) / 2) / stride, (xr - (stride - 1) / 2) / stride
    coords = np.stack([fr, fc])
    return np.stack([map_coordinates(ch, coords, order=1, mode="nearest") for ch in features], 1)


def rotation_consistency(
    image: np.ndarray,
    model: Any,
    *,
    layer: int,
    spec: ConsistencySpec | None = None,
    cluster: ClusterSpec | None = None,
    kmeans: Any = None,
    mpp: float | None = None,
    device: str = "cpu",
    score_side: int | None = None,
    precision: str = "fp32",
) -> dict[str, Any]:
    """The protocol of the module docstring on one square image.

    Args:
        image: ``(S, S, 3)`` uint8 RGB at the analysis resolution, ``S`` a multiple of the layer's stride.
        model: A backbone with ``features(x, layer)`` (eval mode), as ``prepare_backbone`` gives it.
        layer: Feature stage 1-4.
        spec: Angles and tracking (default :class:`ConsistencySpec`).
        cluster: The per-sample K-means (k, vectors, seed); used when ``kmeans`` is None.
        kmeans: A fitted :class:`~equislide.models.KMeansModel` (cohort mode), or None (paper mode).
        mpp: µm per pixel of ``image`` (for the tissue mask); None = pixel units.
        device: Feature device.
        score_side: Diameter of the scored disc, centred (a whole-slide region read with context), or
            None: a bare square, scored on its inscribed disc, or whole on a canvas (``spec.canvas``).
        precision: Forward precision (:func:`~equislide.models.extract.extract_features`).

    Returns:
        ``{"angles": [{"angle", "kappa", "dice", "valid_pixels"}], "icc_feature", "area_fractions"
        (angles x k), "valid_pixels", "tissue_pixels", "labels0" (the 0-degree map at analysis px),
        "labels_back" (each angle's map rotated back), "valid" (each angle's valid pixels), "seconds"}``.

    Raises:
        ValueError: the image is not square uint8 RGB, or has no tissue inside the inscribed disc.
    """
    from equislide.evaluate import cohen_kappa, feature_icc, mean_dice
    from equislide.models.kmeans import ReservoirSampler, fit_kmeans, masked_vectors
    from equislide.tiling import rotate_image, tissue_mask, unrotate_labels

    spec = spec or ConsistencySpec()
    cluster = cluster or ClusterSpec(fit="per-sample")
    image = np.require(image, requirements=["C", "W"])  # torch refuses to wrap read-only arrays quietly
    if image.ndim != 3 or image.shape[0] != image.shape[1] or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"image of shape {image.shape} and dtype {image.dtype}: need square (S, S, 3) uint8")
    t0 = time.perf_counter()
    box = slice(None)
    if spec.canvas and score_side is None:
        image, box = _on_canvas(image)
    side = image.shape[0]
    disc = _disc(side)
    if box != slice(None):
        scored = np.zeros((side, side), bool)
        scored[box, box] = True
    elif score_side is None:
        scored = disc
    else:
        scored = _disc(side, margin=(side - min(score_side, side)) / 2)
    tissue = tissue_mask(image, mpp=mpp) & scored
    if tissue.sum() < 16:
        where = "the image" if box != slice(None) else "the region's inscribed disc"
        raise ValueError(f"only {int(tissue.sum())} tissue pixels inside {where}")

    if spec.disc_input:
        image = np.where(disc[..., None], image, np.uint8(255))
    feats0 = _features(model, image, layer=layer, device=device, precision=precision)
    stride = side // feats0.shape[-1]
    f_tissue = tissue[stride // 2 :: stride, stride // 2 :: stride]  # tissue at feature-pixel centres
    if kmeans is None:
        sampler = ReservoirSampler(cluster.per_sample, seed=cluster.seed)
        sampler.add(masked_vectors(feats0, f_tissue))
        kmeans = fit_kmeans(sampler.sample, params=cluster.kmeans_params())

    def label(features: np.ndarray) -> np.ndarray:
        if spec.labels == "upsampled":
            from equislide.models.tta import smoothed_labels

            normalise = bool(kmeans.params.l2_normalise)
            up = smoothed_labels(features, kmeans.centroids, sigma=0, normalise=normalise, out_size=side)
            return up.astype(np.int32)
        f_labels = kmeans.predict(features)
        return np.repeat(np.repeat(f_labels, stride, 0), stride, 1).astype(np.int32)

    labels0 = label(feats0)
    points = _tracked(tissue & _disc(side, margin=stride), spec.track, spec.seed)
    tracked = [_sample_rotated(feats0, points, 0.0, side)]
    rows, backs, valids = [], [labels0], [tissue]
    k = int(kmeans.k)
    areas = [np.bincount(labels0[tissue], minlength=k)[:k] / max(1, int(tissue.sum()))]
    for angle in spec.angles[1:]:
        rotated = rotate_image(image, angle, fill=255)
        if spec.disc_input:
            rotated = np.where(disc[..., None], rotated, np.uint8(255))
        feats = _features(model, rotated, layer=layer, device=device, precision=precision)
        back, inside = unrotate_labels(label(feats), angle, fill=-1)
        valid = tissue & inside & (back >= 0)
        rows.append(
            {
                "angle": float(angle),
                "kappa": cohen_kappa(labels0, back, valid=valid),
                "dice": mean_dice(labels0, back, valid=valid),
                "valid_pixels": int(valid.sum()),
            }
        )
        tracked.append(_sample_rotated(feats, points, angle, side))
        backs.append(back)
        valids.append(valid)
        areas.append(np.bincount(back[valid], minlength=k)[:k] / max(1, int(valid.sum())))
    icc = feature_icc(np.stack(tracked)) if len(points) >= 2 else float("nan")
    crop = (box, box)  # the caller's square: the maps line up with the image it gave
    return {
        "angles": rows,
        "icc_feature": float(icc),
        "area_fractions": [[float(v) for v in a] for a in areas],
        "tissue_pixels": int(tissue.sum()),
        "valid_pixels": int(np.logical_and.reduce(valids).sum()),
        "tracked_pixels": int(len(points)),
        "stride": int(stride),
        "canvas": int(side) if box != slice(None) else None,
        "labels0": labels0[crop],
        "labels_back": [b[crop] for b in backs],
        "valid": [v[crop] for v in valids],
        "seconds": round(time.perf_counter() - t0, 3),
    }


def slide_regions(store: str | Path, *, n: int, side: int, seed: int = 0) -> list[tuple[int, int]]:
    """Up to ``n`` region centres ``(l_x, l_y)`` (analysis px) on a whole slide's tissue, spread out.

    Candidates are tissue pixels of the store's thumbnail mask whose ``side`` square lies inside the
    slide (when the slide is smaller, its centre); the first is drawn (seeded) among the quarter of
    candidates with the most tissue around them, each next one is the candidate farthest from those
    already chosen, so the regions cover different parts of the section.
    """
    import zarr
    from scipy.ndimage import uniform_filter

    from equislide.storage import read_sample_meta

    meta = read_sample_meta(store)
    group = zarr.open_group(zarr.storage.LocalStore(store, read_only=True), mode="r")
    mask = np.asarray(group["tissue_mask"][:]).astype(bool)
    per_m = float(group["tissue_mask"].attrs["downsample"])  # analysis px per mask px
    origin = np.asarray(meta.get("tissue_mask_l_origin") or (0.0, 0.0), float)
    l0_per_l = meta["l0_per_l"]
    l_w = meta["source_dimensions"][0] / l0_per_l[0]
    l_h = meta["source_dimensions"][1] / l0_per_l[1]
    half = side / 2
    rows, cols = np.nonzero(mask)
    l_x = origin[0] + (cols + 0.5) * per_m
    l_y = origin[1] + (rows + 0.5) * per_m
    keep = (l_x >= half) & (l_x <= l_w - half) & (l_y >= half) & (l_y <= l_h - half)
    if not keep.any():
        return [(int(round(l_w / 2)), int(round(l_h / 2)))]
    radius = max(1, int(round(half / per_m)))
    density = uniform_filter(mask.astype(np.float32), size=2 * radius + 1, mode="constant")[rows, cols][keep]
    pts = np.stack([l_x[keep], l_y[keep]], 1)
    rng = np.random.default_rng(seed)
    dense = np.nonzero(density >= np.quantile(density, 0.75))[0]
    chosen = [int(rng.choice(dense))]
    dist = np.linalg.norm(pts - pts[chosen[0]], axis=1)
    while len(chosen) < min(n, len(pts)):
        nxt = int(np.argmax(dist))
        if dist[nxt] < half:  # every candidate is inside a chosen region already
            break
        chosen.append(nxt)
        dist = np.minimum(dist, np.linalg.norm(pts - pts[nxt], axis=1))
    return [(int(round(pts[i, 0])), int(round(pts[i, 1]))) for i in chosen]


def sample_images(
    store: str | Path, spec: ConsistencySpec
) -> list[tuple[str, np.ndarray, float | None, int | None, tuple[float, float, float, float]]]:
    """The square images a sample is scored on.

    Returns:
        ``[(region name, (S, S, 3) uint8, mpp, scored side, (l0_x, l0_y, l0_per_l_x, l0_per_l_y))]``:
        the last item places the image's top-left pixel corner on the slide's level 0 (for
        annotations).


    A TMA core: its stored tile (the whole core at the analysis resolution, glass around it), scored on
    its inscribed disc (``None``). A whole slide: up to ``spec.regions`` regions
    (:func:`slide_regions`), each a disc of ``spec.region`` px scored inside a square read with context
    (see :class:`ConsistencySpec`).
    """
    import zarr

    from equislide.stages.backbone import read_tiles
    from equislide.storage import read_sample_meta
    from equislide.tiling import open_slide

    meta = read_sample_meta(store)
    mpp = meta.get("mpp")
    l0_per_l = meta["l0_per_l"]
    if meta.get("kind") == "tma_core" or int(meta["n_tiles"]) == 1 and meta.get("kind") != "slide":
        group = zarr.open_group(zarr.storage.LocalStore(store, read_only=True), mode="r")
        l_x, l_y = (np.asarray(group["coords"][0], float) - int(meta["halo"])).tolist()
        window = (l_x * l0_per_l[0], l_y * l0_per_l[1], float(l0_per_l[0]), float(l0_per_l[1]))
        return [("core", read_tiles(store, 0, 1)[0], mpp, None, window)]
    side = region_side(spec)
    centres = slide_regions(store, n=spec.regions, side=int(spec.region), seed=spec.seed)
    # The tiles' mpp, whether the user forced it or filled it in, is what the regions must use.
    given = meta.get("mpp_source") in ("override", "input_mpp")
    force_mpp = meta.get("source_mpp") if given else None
    out = []
    with open_slide(meta["source_path"], force_mpp=force_mpp) as slide:
        for l_x, l_y in centres:
            l0_xy = (int(round((l_x - side / 2) * l0_per_l[0])), int(round((l_y - side / 2) * l0_per_l[1])))
            region = slide.read_region_mpp(l0_xy, (side, side), mpp)
            window = (float(l0_xy[0]), float(l0_xy[1]), float(l0_per_l[0]), float(l0_per_l[1]))
            out.append((f"region {l_x},{l_y}", np.ascontiguousarray(region), mpp, int(spec.region), window))
    return out


#: Annotation file names tried for a sample, in order (``{id}``: the sample ID; ``{slide}``: its slide's).
ANNOTATION_NAMES = ("{id}", "{slide}", "{slide}.labels")
_ANNOTATION_SUFFIXES = (".png", ".tif", ".tiff", ".jpg")


def find_annotation(folder: str | Path, sample_id: str) -> Path | None:
    """The annotation of a sample in ``folder``: ``<sample id>`` or its slide's ``<slide id>`` (or the
    phantom's ``<slide id>.labels``) with a ``.png``, ``.tif``, ``.tiff`` or ``.jpg`` suffix; None if none."""
    slide = sample_id.split("/")[0]
    for pattern in ANNOTATION_NAMES:
        for suffix in _ANNOTATION_SUFFIXES:
            path = Path(folder) / (pattern.format(id=sample_id, slide=slide) + suffix)
            if path.is_file():
                return path
    return None


def read_annotation(path: str | Path) -> np.ndarray:
    """An annotation as integer classes ``(H, W)``: an integer label image as it is (0 = unannotated), or
    a colour image whose distinct colours are numbered 1, 2, ... in sorted order (white and black = 0).

    Raises:
        ValueError: the file cannot be read as an image (the message names it).
    """
    import tifffile
    from PIL import Image

    path = Path(path)
    try:
        tiff = path.suffix.lower() in (".tif", ".tiff")
        arr = tifffile.imread(path) if tiff else np.asarray(Image.open(path))
    except Exception as err:  # PIL and tifffile raise many kinds
        raise ValueError(f"{path}: not a readable annotation image ({type(err).__name__})") from None
    if arr.ndim == 2:
        return arr.astype(np.int64)
    rgb = arr[..., :3].astype(np.int64)
    code = (rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2]
    colours, classes = np.unique(code, return_inverse=True)
    classes = classes.reshape(code.shape) + 1
    for i, c in enumerate(colours):
        if c in (0, 0xFFFFFF):
            classes[classes == i + 1] = 0
    return classes


def annotation_agreement(
    labels0: np.ndarray,
    valid: np.ndarray,
    annotation: str | Path,
    window: tuple[float, float, float, float],
    l0_size: Sequence[int],
) -> dict[str, Any]:
    """Agreement of a region's 0-degree clusters with an annotation of the whole input.

    The annotation covers the input's level 0 at any scale (``l0_size`` over its own size); each
    analysis pixel of the region reads it at the pixel's centre (nearest). Clusters are matched to
    annotation classes by Hungarian matching on the region's valid, annotated pixels.

    Returns:
        ``{"dice_per_class" {class: Dice}, "dice_mean", "ari", "nmi", "pixels"}`` (None values when no
        valid pixel is annotated).
    """
    from equislide.evaluate import adjusted_rand, nmi, per_class_dice_after_matching

    truth_full = read_annotation(annotation)
    side = labels0.shape[0]
    sx, sy = truth_full.shape[1] / float(l0_size[0]), truth_full.shape[0] / float(l0_size[1])
    centres = np.arange(side) + 0.5
    cols = np.floor((window[0] + centres * window[2]) * sx).astype(np.int64)
    rows = np.floor((window[1] + centres * window[3]) * sy).astype(np.int64)
    inside_r = (rows >= 0) & (rows < truth_full.shape[0])
    inside_c = (cols >= 0) & (cols < truth_full.shape[1])
    h, w = truth_full.shape
    truth = truth_full[np.clip(rows, 0, h - 1)][:, np.clip(cols, 0, w - 1)]
    keep = valid & (truth > 0) & inside_r[:, None] & inside_c[None, :]
    if keep.sum() < 2:
        return {"dice_per_class": {}, "dice_mean": None, "ari": None, "nmi": None, "pixels": int(keep.sum())}
    dice = per_class_dice_after_matching(labels0, truth, valid=keep)
    return {
        "dice_per_class": {str(k): float(v) for k, v in dice.items()},
        "dice_mean": float(np.mean(list(dice.values()))),
        "ari": float(adjusted_rand(labels0, truth, valid=keep)),
        "nmi": float(nmi(labels0, truth, valid=keep)),
        "pixels": int(keep.sum()),
    }


def _pooled_annotation(regions: Sequence[dict[str, Any]]) -> dict[str, Any] | None:
    """Pixel-weighted means of the regions' annotation scores (None without annotations)."""
    scored = [r["annotation"] for r in regions if r.get("annotation") and r["annotation"]["pixels"] >= 2]
    if not scored:
        return None
    w = np.asarray([a["pixels"] for a in scored], float)
    out = {k: float(np.dot(w, [a[k] for a in scored]) / w.sum()) for k in ("dice_mean", "ari", "nmi")}
    return {**out, "pixels": int(w.sum())}


def is_off90(angle: float) -> bool:
    """True for an angle that is not a multiple of 90 degrees (where rotation interpolates)."""
    return abs(angle / 90 - round(angle / 90)) > 1e-9


def _summary(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    def mean(key: str, keep) -> float | None:
        vals = [r[key] for r in rows if keep(r["angle"]) and not math.isnan(r[key])]
        return float(np.mean(vals)) if vals else None

    return {
        "kappa_mean": mean("kappa", lambda a: True),
        "dice_mean": mean("dice", lambda a: True),
        "kappa_off90": mean("kappa", is_off90),
        "dice_off90": mean("dice", is_off90),
        "kappa_90": mean("kappa", lambda a: not is_off90(a)),
        "dice_90": mean("dice", lambda a: not is_off90(a)),
    }


def store_consistency(
    store: str | Path,
    out_dir: str | Path,
    backbone: Any,
    *,
    spec: ConsistencySpec | None = None,
    cluster: ClusterSpec | None = None,
    kmeans: Any = None,
    device: str = "auto",
    name: str | None = None,
    strip: bool = False,
    annotation: str | Path | None = None,
) -> dict[str, Any]:
    """Score one sample (every region of it) and write ``<out_dir>/<sample_id><name>.consistency.json``.

    Args:
        store: A finished tile store.
        out_dir: Folder of the result file (the sample's outputs folder).
        backbone: A :class:`~equislide.specs.BackboneRef` (loaded once per process).
        spec: Angles, regions and tracking.
        cluster: Per-sample K-means parameters (paper mode).
        kmeans: A :class:`~equislide.specs.KMeansRef` of a cohort model (cohort mode), or None.
        device: Feature device.
        name: Suffix of the file name before ``.consistency.json`` (the study: ``.<backbone>``).
        strip: Also save the first region's rotated-back maps side by side (``.rotations.png``).
        annotation: A label image of the sample's input (:func:`annotation_agreement`): the 0-degree
            clusters are then scored against it (``annotation`` in each region and the summary).

    A result already written for the same store, network, K-means and spec is returned as it is
    (``status`` ``"skipped"``, no ``regions_data``).

    Returns:
        The JSON document written (per-angle means over regions, per-region rows, the summary), with
        ``"path"`` and ``"regions_data"`` (each region's arrays, not written) added.
    """
    from equislide.files import atomic_write_json, read_json, sha256_file
    from equislide.models.kmeans import KMeansModel
    from equislide.stages.backbone import load_backbone
    from equislide.storage import params_hash, read_sample_meta, store_identity, write_label_strip

    spec = spec or ConsistencySpec()
    cluster = cluster or ClusterSpec(fit="per-sample")
    t0 = time.perf_counter()
    meta = read_sample_meta(store)
    from equislide.storage.confine import confined

    base = confined(out_dir, Path(out_dir) / f"{meta['sample_id']}{name or ''}")
    path = base.with_name(base.name + CONSISTENCY_SUFFIX)
    identity = {
        "annotation": None if annotation is None else sha256_file(annotation),
        "sample": store_identity(store),
        "backbone": backbone.sha256,
        "layer": int(backbone.layer),
        "kmeans": None if kmeans is None else kmeans.sha256,
        "cluster": cluster.params(),
        "spec": dataclasses.asdict(spec),
    }
    precision = getattr(backbone, "precision", "fp32")
    if precision != "fp32":  # fp32 keeps the key of results written before precisions existed
        identity["precision"] = precision
    key = params_hash(identity)
    old = read_json(path)
    strip_path = base.with_name(base.name + ".rotations.png")
    if old is not None and old.get("key") == key and (not strip or strip_path.is_file()):
        return {**old, "path": str(path), "status": "skipped", "regions_data": []}
    model, info = load_backbone(backbone, device)
    model_km = KMeansModel.load(kmeans.path) if kmeans is not None else None
    regions, data = [], []
    for region_name, image, mpp, score_side, window in sample_images(store, spec):
        res = rotation_consistency(
            image,
            model,
            layer=int(backbone.layer),
            spec=spec,
            cluster=cluster,
            kmeans=model_km,
            mpp=mpp,
            device=info["device"],
            score_side=score_side,
            precision=precision,
        )
        data.append({"region": region_name, "image": image, **res})
        regions.append({k: v for k, v in res.items() if k not in ("labels0", "labels_back", "valid")})
        regions[-1]["region"] = region_name
        if annotation is not None:
            regions[-1]["annotation"] = annotation_agreement(
                res["labels0"], res["valid"][0], annotation, window, meta["source_dimensions"]
            )
    if strip and data:
        first = data[0]
        write_label_strip(
            strip_path,
            first["labels_back"],
            valid=[first["valid"][0]] * len(first["labels_back"]),
            titles=[f"{a:g}°" for a in spec.angles],
            label=f"{backbone.backbone} L{backbone.layer}",
        )
    per_angle = []
    for i, angle in enumerate(spec.angles[1:]):
        rows = [r["angles"][i] for r in regions]
        w = np.asarray([r["valid_pixels"] for r in rows], float)
        w = w / w.sum() if w.sum() else np.full(len(rows), 1 / len(rows))
        per_angle.append(
            {
                "angle": float(angle),
                "kappa": float(np.dot(w, [r["kappa"] for r in rows])),
                "dice": float(np.dot(w, [r["dice"] for r in rows])),
                "valid_pixels": int(sum(r["valid_pixels"] for r in rows)),
            }
        )
    doc = {
        "key": key,
        "sample_id": meta["sample_id"],
        "backbone": backbone.backbone,
        "weights_sha256": backbone.sha256,
        "layer": int(backbone.layer),
        "precision": precision,
        "mode": "cohort" if kmeans is not None else "per-sample",
        "angles": per_angle,
        **_summary(per_angle),
        "icc_feature": float(np.nanmean([r["icc_feature"] for r in regions])) if regions else None,
        "annotation": _pooled_annotation(regions),
        "regions": regions,
        "spec": {"angles": list(spec.angles), "regions": spec.regions, "region": spec.region,
                 "track": spec.track, "seed": spec.seed, "canvas": spec.canvas},
        "seconds": round(time.perf_counter() - t0, 3),
    }
    atomic_write_json(path, doc)
    return {**doc, "path": str(path), "status": "written", "regions_data": data}


def sample_consistency(
    sample: tuple[str, str | Path],
    out_dir: str | Path,
    backbone: Any,
    *,
    spec: ConsistencySpec,
    cluster: ClusterSpec | None = None,
    kmeans: Any = None,
    device: str = "auto",
    name: str | None = None,
    strip: bool = False,
    annotations: str | Path | None = None,
    regions: dict[str, int] | None = None,
) -> dict[str, Any]:
    """:func:`store_consistency` of one sample ``(sample_id, store)`` as the flows run it: its
    annotation looked up in the folder ``annotations``, its region count from ``regions`` (the
    service's budget), and without the bulky ``regions_data`` (a module-level callable: it runs in a
    budgeted child)."""
    sample_id, store = sample
    annotation = find_annotation(annotations, sample_id) if annotations else None
    mine = spec if not regions else dataclasses.replace(spec, regions=regions.get(sample_id, spec.regions))
    doc = store_consistency(
        store,
        out_dir,
        backbone,
        spec=mine,
        cluster=cluster,
        kmeans=kmeans,
        device=device,
        name=name,
        strip=strip,
        annotation=annotation,
    )
    doc.pop("regions_data", None)
    return doc
