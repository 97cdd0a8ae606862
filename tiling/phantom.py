"""A synthetic H&E tissue microarray (TMA) with per-pixel ground truth.

:func:`write_phantom` writes three files beside each other:

- ``<out>``: a pyramidal tiled TIFF (256 x 256 JPEG tiles, successive IFDs, reduced levels marked
  ``NewSubfileType=1``) that OpenSlide 4 opens as ``generic-tiff``; the microns per pixel are stored in
  the resolution tags (pixels per centimetre), so ``openslide.mpp-x`` is set.
- ``<out stem>.labels.tiff``: a uint8 label map (:data:`LABEL_NAMES`) at ``label_downsample``; label pixel
  ``(l_x, l_y)`` is the label of level-0 pixel ``(l_x * d + d // 2, l_y * d + d // 2)`` for downsample ``d``.
- ``<out stem>.json``: what :class:`PhantomInfo` holds (seed, mpp, array angle, grid, every core's name,
  centre and present/missing flag, label names, label downsample).

The slide shows round cores (irregular outline, frayed edge, a few tears) on near-white glass, in a grid
of ``rows x cols`` positions rotated by a small seeded angle, with some positions left empty. Each core
is a seeded, warped Voronoi partition into four tissue classes: glands (pink epithelial rings with white
lumina and basal nuclei), dense nuclei (crowded purple nuclei on pink), fibrous stroma (wavy eosin fibres
with sparse elongated nuclei) and fat (white polygonal cells with thin pink membranes). Colour follows
Beer-Lambert: haematoxylin and eosin concentration maps times the stain optical-density vectors.

Coordinates: level-0 pixel indices, ``x`` to the right and ``y`` down; pixel ``i`` has its centre at ``i``.
The same seed and arguments give byte-identical files (on the same platform: numpy's float32 maths and the
JPEG encoder are deterministic there). Generation is vectorised numpy: a 16-core array at 0.5 µm/px
(about 13.7k x 13.6k px, 5 levels, ~21 MB) takes about 16 s of one CPU core.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["LABEL_NAMES", "PhantomCore", "PhantomInfo", "read_phantom_info", "write_phantom"]

#: Label value -> class name of the ground truth.
LABEL_NAMES: tuple[str, ...] = ("background", "glands", "dense_nuclei", "stroma", "fat")

# Optical density per unit concentration (R, G, B). Macenko et al. (2009) reference H&E vectors: they
# match real scans better than Ruifrok & Johnston's (whose eosin is magenta); rgb2hed still separates them.
_H_OD = np.array([0.5626, 0.7201, 0.4062], np.float32)
_E_OD = np.array([0.2159, 0.8012, 0.5581], np.float32)
_GLASS_OD = np.array([0.020, 0.021, 0.024], np.float32)  # near-white glass, slightly warm
_FORMAT = "equislide-phantom/1"


@dataclass(frozen=True)
class PhantomCore:
    """One grid position of the phantom TMA.

    Attributes:
        name: Row letter and 1-based column number, rows top to bottom (``"A1"``, ``"B3"``).
        row: 1-based row (top to bottom, before the array rotation).
        col: 1-based column (left to right, before the array rotation).
        l0_x: Centre x in level-0 pixels.
        l0_y: Centre y in level-0 pixels.
        present: False for an empty position (no tissue there).
    """

    name: str
    row: int
    col: int
    l0_x: float
    l0_y: float
    present: bool


@dataclass(frozen=True)
class PhantomInfo:
    """What :func:`write_phantom` wrote; the same content as the ``.json`` beside the image.

    Attributes:
        image_path: The pyramidal TIFF.
        labels_path: The uint8 label map TIFF at ``label_downsample``.
        json_path: The JSON description.
        seed: Seed of the generator.
        mpp: Microns per level-0 pixel.
        l0_size: Level-0 ``(width, height)`` in pixels.
        level_count: Pyramid levels (each halves the previous one).
        angle_deg: Rotation of the array, degrees; positive turns clockwise on screen (y down).
        grid: ``(rows, cols)`` of the array.
        core_diameter_um: Nominal core diameter in µm.
        pitch_um: Nominal distance between neighbouring core centres in µm.
        cores: Every listed grid position, row-major.
        label_names: Class name per label value (index = value).
        label_downsample: Level-0 pixels per label-map pixel along x and y.
    """

    image_path: Path
    labels_path: Path
    json_path: Path
    seed: int
    mpp: float
    l0_size: tuple[int, int]
    level_count: int
    angle_deg: float
    grid: tuple[int, int]
    core_diameter_um: float
    pitch_um: float
    cores: tuple[PhantomCore, ...]
    label_names: tuple[str, ...]
    label_downsample: int

    def core(self, name: str) -> PhantomCore:
        """The core called ``name`` (e.g. ``"B3"``); raises ``KeyError`` naming it when absent."""
        for c in self.cores:
            if c.name == name:
                return c
        raise KeyError(f"no core {name!r} in this phantom (cores: {', '.join(c.name for c in self.cores)})")

    def to_json_dict(self) -> dict[str, Any]:
        """The JSON form: file names relative to the JSON's folder, so the folder can move."""
        return {
            "format": _FORMAT,
            "image": self.image_path.name,
            "labels": self.labels_path.name,
            "seed": self.seed,
            "mpp": self.mpp,
            "l0_width": self.l0_size[0],
            "l0_height": self.l0_size[1],
            "level_count": self.level_count,
            "array_angle_deg": self.angle_deg,
            "grid": {"rows": self.grid[0], "cols": self.grid[1]},
            "core_diameter_um": self.core_diameter_um,
            "pitch_um": self.pitch_um,
            "label_downsample": self.label_downsample,
            "label_names": {str(i): n for i, n in enumerate(self.label_names)},
            "cores": [
                {
                    "name": c.name,
                    "row": c.row,
                    "col": c.col,
                    "l0_x": c.l0_x,
                    "l0_y": c.l0_y,
                    "present": c.present,
                }
                for c in self.cores
            ],
        }


def read_phantom_info(json_path: str | Path) -> PhantomInfo:
    """Read the ``.json`` that :func:`write_phantom` wrote.

    Args:
        json_path: Path of the JSON file.

    Returns:
        The :class:`PhantomInfo`, with paths resolved beside the JSON.

    Raises:
        ValueError: The file is not a phantom description.
    """
    json_path = Path(json_path)
    d = json.loads(json_path.read_text(encoding="utf-8"))
    if not isinstance(d, Mapping) or d.get("format") != _FORMAT:
        raise ValueError(f"{json_path} is not an equislide phantom description (format != {_FORMAT!r})")
    names = d["label_names"]
    return PhantomInfo(
        image_path=json_path.parent / d["image"],
        labels_path=json_path.parent / d["labels"],
        json_path=json_path,
        seed=int(d["seed"]),
        mpp=float(d["mpp"]),
        l0_size=(int(d["l0_width"]), int(d["l0_height"])),
        level_count=int(d["level_count"]),
        angle_deg=float(d["array_angle_deg"]),
        grid=(int(d["grid"]["rows"]), int(d["grid"]["cols"])),
        core_diameter_um=float(d["core_diameter_um"]),
        pitch_um=float(d["pitch_um"]),
        cores=tuple(PhantomCore(**c) for c in d["cores"]),
        label_names=tuple(names[str(i)] for i in range(len(names))),
        label_downsample=int(d["label_downsample"]),
    )


def write_phantom(
    out: str | Path,
    *,
    cores: int = 16,
    seed: int = 0,
    mpp: float = 0.5,
    core_diameter_um: float = 1200.0,
    pitch_um: float | None = None,
    missing: int | None = None,
    max_angle_deg: float = 4.0,
    label_downsample: int = 4,
    jpeg_quality: int = 85,
) -> PhantomInfo:
    """Write a synthetic H&E TMA, its label map and its JSON description.

    Args:
        out: Path of the pyramidal TIFF to write (``.tiff``); the label map and JSON go beside it.
        cores: Grid positions listed, filled row-major in a ``ceil(sqrt(cores))``-column grid.
        seed: Seed; the same seed and arguments give byte-identical files.
        mpp: Microns per level-0 pixel.
        core_diameter_um: Core diameter in µm.
        pitch_um: Distance between core centres in µm; default ``1.25 * core_diameter_um``.
        missing: Positions left empty (seeded choice); default ``max(1, cores // 8)`` from 4 cores up.
        max_angle_deg: The array is rotated by a seeded angle of ``max_angle_deg / 4`` to
            ``max_angle_deg`` degrees, either direction.
        label_downsample: Level-0 pixels per label-map pixel (1 for a full-resolution label map).
        jpeg_quality: JPEG quality of the image tiles (1-100).

    Returns:
        The :class:`PhantomInfo` that is also written as ``<out stem>.json``.

    Raises:
        ValueError: An argument is out of range (the message names it).
    """
    import tifffile

    out = Path(out)
    if cores < 1:
        raise ValueError(f"cores={cores} must be >= 1")
    if not mpp > 0:
        raise ValueError(f"mpp={mpp} must be > 0")
    if not core_diameter_um / mpp >= 32:
        raise ValueError(
            f"core_diameter_um={core_diameter_um} is under 32 px at mpp={mpp}; raise it or lower mpp"
        )
    if label_downsample not in (1, 2, 4, 8, 16):
        raise ValueError(f"label_downsample={label_downsample} must be one of 1, 2, 4, 8, 16")
    if not 1 <= jpeg_quality <= 100:
        raise ValueError(f"jpeg_quality={jpeg_quality} must be in 1..100")
    pitch_um = 1.25 * core_diameter_um if pitch_um is None else float(pitch_um)
    if pitch_um < 1.1 * core_diameter_um:
        raise ValueError(f"pitch_um={pitch_um} must be >= 1.1 * core_diameter_um={core_diameter_um}")
    if missing is None:
        missing = max(1, cores // 8) if cores >= 4 else 0
    if not 0 <= missing < cores:
        raise ValueError(f"missing={missing} must be in 0..cores-1={cores - 1}")

    rng = np.random.default_rng([seed, 0])
    cols = math.ceil(math.sqrt(cores))
    rows = math.ceil(cores / cols)
    angle = float(rng.uniform(max_angle_deg / 4, max_angle_deg) * rng.choice([-1.0, 1.0]))
    gone = set(rng.choice(cores, size=missing, replace=False).tolist())

    # Grid centres (µm, relative to the array centre), jittered a little, then rotated.
    r_idx, c_idx = np.divmod(np.arange(rows * cols), cols)
    gx = (c_idx - (cols - 1) / 2) * pitch_um + rng.normal(0, 0.02 * pitch_um, rows * cols)
    gy = (r_idx - (rows - 1) / 2) * pitch_um + rng.normal(0, 0.02 * pitch_um, rows * cols)
    ca, sa = math.cos(math.radians(angle)), math.sin(math.radians(angle))
    rx, ry = gx * ca - gy * sa, gx * sa + gy * ca
    reach = 0.55 * core_diameter_um + 0.3 * core_diameter_um  # core + fray, then a margin
    l0_w = _round_up((2 * (np.abs(rx).max() + reach)) / mpp, 64)
    l0_h = _round_up((2 * (np.abs(ry).max() + reach)) / mpp, 64)
    l0_cx = np.round(l0_w / 2 + rx / mpp, 2)
    l0_cy = np.round(l0_h / 2 + ry / mpp, 2)

    core_list = tuple(
        PhantomCore(
            name=f"{_row_letter(int(r_idx[i]))}{int(c_idx[i]) + 1}",
            row=int(r_idx[i]) + 1,
            col=int(c_idx[i]) + 1,
            l0_x=float(l0_cx[i]),
            l0_y=float(l0_cy[i]),
            present=i not in gone,
        )
        for i in range(cores)
    )

    glass = _od_to_rgb(np.zeros((1, 1), np.float32), np.zeros((1, 1), np.float32))[0, 0]
    image = np.empty((l0_h, l0_w, 3), np.uint8)
    image[:] = np.tile(glass, (l0_w, 1))  # one row broadcast: much faster than a per-pixel broadcast
    labels = np.zeros((l0_h, l0_w), np.uint8)
    radius = core_diameter_um / 2 / mpp
    for i, core in enumerate(core_list):
        if core.present:
            _render_core(
                image, labels, core.l0_x, core.l0_y, radius, mpp, np.random.default_rng([seed, 1 + i])
            )

    levels = [image]
    while len(levels) < 3 or max(levels[-1].shape[:2]) > 1024:
        levels.append(_half(levels[-1]))
    d = label_downsample
    label_map = np.ascontiguousarray(labels[d // 2 :: d, d // 2 :: d])
    del labels

    info = PhantomInfo(
        image_path=out,
        labels_path=out.with_name(out.stem + ".labels.tiff"),
        json_path=out.with_name(out.stem + ".json"),
        seed=seed,
        mpp=float(mpp),
        l0_size=(l0_w, l0_h),
        level_count=len(levels),
        angle_deg=round(angle, 4),
        grid=(rows, cols),
        core_diameter_um=float(core_diameter_um),
        pitch_um=float(pitch_um),
        cores=core_list,
        label_names=LABEL_NAMES,
        label_downsample=d,
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    px_per_cm = 1e4 / mpp
    with tifffile.TiffWriter(out, bigtiff=image.nbytes > 2**31) as tw:
        for k, level in enumerate(levels):
            tw.write(
                level,
                photometric="rgb",
                tile=(256, 256),
                compression="jpeg",
                compressionargs={"level": jpeg_quality},
                resolution=(px_per_cm / 2**k, px_per_cm / 2**k),
                resolutionunit="CENTIMETER",
                subfiletype=1 if k else 0,
                description=f"equislide phantom seed={seed} mpp={mpp} level={k}" if k == 0 else None,
                software="equislide",
                metadata=None,
                maxworkers=1,
            )
    tifffile.imwrite(
        info.labels_path,
        label_map,
        photometric="minisblack",
        tile=(256, 256),
        compression="zlib",
        resolution=(px_per_cm / d, px_per_cm / d),
        resolutionunit="CENTIMETER",
        description=json.dumps({"label_downsample": d, "label_names": list(LABEL_NAMES)}),
        software="equislide",
        metadata=None,
        maxworkers=1,
    )
    info.json_path.write_text(json.dumps(info.to_json_dict(), indent=2) + "\n", encoding="utf-8")
    return info


# --------------------------------------------------------------------------------------------------------
# Layout helpers


def _round_up(value: float, multiple: int) -> int:
    return int(math.ceil(value / multiple) * multiple)


def _row_letter(row: int) -> str:
    """0 -> A, 25 -> Z, 26 -> AA (spreadsheet style)."""
    s = ""
    row += 1
    while row:
        row, rem = divmod(row - 1, 26)
        s = chr(65 + rem) + s
    return s


def _half(a: np.ndarray) -> np.ndarray:
    """2 x 2 box downsample of an (H, W, 3) uint8 image with even H and W (odd edges dropped)."""
    h, w = a.shape[0] // 2 * 2, a.shape[1] // 2 * 2
    s = a[0:h:2, 0:w:2].astype(np.uint16)
    s += a[1:h:2, 0:w:2]
    s += a[0:h:2, 1:w:2]
    s += a[1:h:2, 1:w:2]
    s += 2
    s >>= 2
    return s.astype(np.uint8)


# --------------------------------------------------------------------------------------------------------
# Rendering one core. Costly steps are kept off full-resolution arrays: the outline comes from 1-D tables
# over angle and radius, the region partition is drawn at a coarser grid, cell textures use a reshape onto
# their cell grid instead of gathers, and nuclei are scattered with one bincount.


def _render_core(
    image: np.ndarray, labels: np.ndarray, l0_cx: float, l0_cy: float, radius: float, mpp: float, rng
) -> None:
    """Draw one core into ``image`` and ``labels`` (level 0) around centre ``(l0_cx, l0_cy)``."""
    um = 1.0 / mpp  # pixels per µm
    f = max(1, int(round(1.0 * um)))  # coarse grid of the region partition: about 1 µm
    half = _round_up(radius * 1.1 + 4, f)
    size = 2 * half
    l0_x0, l0_y0 = int(round(l0_cx)) - half, int(round(l0_cy)) - half
    t_y = (np.arange(size, dtype=np.float32) + np.float32(l0_y0 - l0_cy))[:, None]  # centre at 0
    t_x = (np.arange(size, dtype=np.float32) + np.float32(l0_x0 - l0_cx))[None, :]

    # Outline from tables over angle (low harmonics + frayed edge) and radius; loose fragments outside.
    n_ang = 8192
    arc = 2 * np.pi * radius / n_ang  # px of circumference per table entry
    ang = np.linspace(0, 2 * np.pi, n_ang, endpoint=False)
    edge_tab = np.ones(n_ang)
    for k in range(2, 6):
        edge_tab += rng.normal(0, 0.025 / k) * np.cos(k * ang + rng.uniform(0, 2 * np.pi))
    edge_tab = radius * edge_tab + _noise_1d(rng, n_ang, 14 * um / arc) * 5 * um
    edge_tab += _noise_1d(rng, n_ang, 50 * um / arc) * 9 * um
    frag_tab = _noise_1d(rng, n_ang, 9 * um / arc) > 1.2
    r = np.sqrt(t_x * t_x + t_y * t_y)
    a_idx = ((np.arctan2(t_y, t_x) + np.float32(np.pi)) * np.float32(n_ang / (2 * np.pi))).astype(np.int32)
    a_idx &= n_ang - 1
    edge = edge_tab.astype(np.float32)[a_idx]
    beyond = r - edge
    tissue = beyond < 0
    r_tab = _noise_1d(rng, size, 6 * um) > 0.3
    tissue |= (beyond < 22 * um) & frag_tab[a_idx] & r_tab[np.minimum(r.astype(np.int32), size - 1)]
    del a_idx, r

    # Regions: a warped Voronoi partition on the coarse grid; every class among the first four seeds.
    n_regions = int(rng.integers(4, 7))
    classes = np.concatenate([rng.permutation(4) + 1, rng.integers(1, 5, n_regions - 4)]).astype(np.uint8)
    s_r = radius * np.sqrt(rng.uniform(0.05, 0.55, n_regions))
    s_t = rng.uniform(0, 2 * np.pi, n_regions)
    c_x, c_y, n_c = t_x[:, f // 2 :: f], t_y[f // 2 :: f, :], size // f
    w_x = c_x + _smooth_noise(rng, n_c, 0.35 * radius / f) * np.float32(0.18 * radius)
    w_y = c_y + _smooth_noise(rng, n_c, 0.35 * radius / f) * np.float32(0.18 * radius)
    best = np.full((n_c, n_c), np.inf, np.float32)
    lab_c = np.zeros((n_c, n_c), np.uint8)
    for k in range(n_regions):
        d2 = (w_x - np.float32(s_r[k] * np.cos(s_t[k]))) ** 2 + (
            w_y - np.float32(s_r[k] * np.sin(s_t[k]))
        ) ** 2
        closer = d2 < best
        best = np.minimum(d2, best)
        lab_c[closer] = classes[k]
    # Thin tears (label 0): narrow bands along a smooth noise's zero level, only where a second noise is high.
    tear = (np.abs(_smooth_noise(rng, n_c, 150 * um / f)) < 0.02) & (
        _smooth_noise(rng, n_c, 200 * um / f) > 0.6
    )
    lab_c[tear] = 0
    lab = np.broadcast_to(lab_c[:, None, :, None], (n_c, f, n_c, f)).reshape(size, size) * tissue
    del w_x, w_y, best, tissue

    grain = (rng.random((size, size), dtype=np.float32) - np.float32(0.5)) * np.float32(3.4)  # unit variance
    c_h = np.zeros((size, size), np.float32)
    c_e = np.zeros((size, size), np.float32)
    painters = {1: _paint_glands, 2: _paint_dense_nuclei, 3: _paint_stroma, 4: _paint_fat}
    for value, paint in painters.items():
        box = _bbox(lab_c == value, f)
        if box is None:
            continue
        sub = lab[box] == value
        h, e = paint(rng, t_x[:, box[1]], t_y[box[0], :], um, grain[box], sub)
        c_h[box] += h * sub
        c_e[box] += e * sub
    # Thinner, paler tissue within ~15 µm of the core edge; per-core stain strength varies by up to 15 %.
    rim = np.clip(beyond * np.float32(-1 / (15 * um)), 0.45, 1.0)
    c_h *= rim * np.float32(rng.uniform(0.85, 1.15))
    c_e *= rim * np.float32(rng.uniform(0.85, 1.15))
    del rim, beyond, grain
    c_h, c_e = _blur121(c_h), _blur121(c_e)
    rgb = _od_to_rgb(c_h, c_e)

    # Paste the patch, clipped to the canvas (the patch's glass equals the canvas glass).
    H, W = labels.shape
    ys, xs = slice(max(l0_y0, 0), min(l0_y0 + size, H)), slice(max(l0_x0, 0), min(l0_x0 + size, W))
    ps = (slice(ys.start - l0_y0, ys.stop - l0_y0), slice(xs.start - l0_x0, xs.stop - l0_x0))
    # Only stained pixels are pasted, so a neighbour's frayed edge inside this patch's box survives.
    ink = (c_h + c_e)[ps] > 1e-4
    np.copyto(image[ys, xs], rgb[ps], where=ink[..., None])
    np.copyto(labels[ys, xs], lab[ps], where=ink)


def _od_to_rgb(c_h: np.ndarray, c_e: np.ndarray) -> np.ndarray:
    """Beer-Lambert: concentrations of haematoxylin and eosin -> uint8 RGB through the glass."""
    out = np.empty((*c_h.shape, 3), np.uint8)
    od = np.empty(c_h.shape, np.float32)
    tmp = np.empty(c_h.shape, np.float32)
    for ch in range(3):
        np.multiply(c_h, -np.log(10.0) * _H_OD[ch], out=od)
        np.multiply(c_e, -np.log(10.0) * _E_OD[ch], out=tmp)
        od += tmp
        od += np.float32(-np.log(10.0) * _GLASS_OD[ch])
        np.exp(od, out=od)
        od *= np.float32(255.0)
        od += np.float32(0.5)
        out[..., ch] = od  # in [0, 255.5): the cast truncates, so +0.5 rounds
    return out


def _blur121(a: np.ndarray) -> np.ndarray:
    """Separable [1, 2, 1] / 4 blur (a point-spread function of about 0.7 px); edges see zero outside."""
    for axis in (0, 1):
        src = np.moveaxis(a, axis, 0)
        out = src * np.float32(0.5)
        out[1:] += src[:-1] * np.float32(0.25)
        out[:-1] += src[1:] * np.float32(0.25)
        a = np.moveaxis(out, 0, axis)
    return a


def _bbox(mask: np.ndarray, f: int) -> tuple[slice, slice] | None:
    """Bounding box of ``mask`` (a coarse grid) in full-resolution pixels (factor ``f``)."""
    rows = np.flatnonzero(mask.any(axis=1))
    if rows.size == 0:
        return None
    cols = np.flatnonzero(mask.any(axis=0))
    return slice(int(rows[0]) * f, (int(rows[-1]) + 1) * f), slice(int(cols[0]) * f, (int(cols[-1]) + 1) * f)


def _noise_1d(rng, n: int, scale: float) -> np.ndarray:
    """Periodic 1-D Gaussian-correlated noise of unit standard deviation and correlation length ``scale``."""
    spec = np.fft.rfft(rng.standard_normal(n))
    freq = np.fft.rfftfreq(n)
    spec *= np.exp(-0.5 * (2 * np.pi * freq * max(scale, 0.5)) ** 2)
    out = np.fft.irfft(spec, n)
    return out / max(float(out.std()), 1e-12)


def _smooth_noise(rng, size: int | tuple[int, int], scale: float) -> np.ndarray:
    """2-D Gaussian-correlated noise of about unit standard deviation, correlation length ``scale`` px.

    Drawn on a knot grid of pitch ``scale`` and interpolated with Gaussian weights (two matrix products).
    """
    h, w = (size, size) if isinstance(size, int) else size
    scale = max(float(scale), 1.0)

    def basis(n: int) -> np.ndarray:
        m = int(math.ceil(n / scale)) + 4
        knots = (np.arange(m) - 2) * scale
        b = np.exp(-0.5 * ((np.arange(n)[:, None] - knots[None, :]) / (0.8 * scale)) ** 2)
        return (b / np.sqrt((b**2).sum(axis=1, keepdims=True))).astype(np.float32)

    by, bx = basis(h), basis(w)
    g = rng.standard_normal((by.shape[1], bx.shape[1]), dtype=np.float32)
    return (by @ g) @ bx.T


def _cell_sites(rng, h: int, w: int, cell: int, jitter: float, *, second: bool):
    """Distance to the nearest seed of a jittered grid (pitch ``cell`` px), and the second-nearest or the
    nearest seed's index.

    Pixel ``(y, x)`` of an (h, w) box has its seed among the 3 x 3 cells around its own, so the box is
    reshaped to (cells_y, cell, cells_x, cell) and every seed broadcast over its cell: no gathers.

    Returns:
        ``(d1, other, sites_x, sites_y)``: (h, w) distance in px to the nearest seed; ``other`` is the
        (h, w) distance to the second-nearest seed when ``second`` else the flat index of the nearest seed
        into ``sites_x``/``sites_y`` (box pixel coordinates, raveled from shape (ny + 2, nx + 2)).
    """
    ny, nx = -(-h // cell), -(-w // cell)
    gy, gx = np.mgrid[-1 : ny + 1, -1 : nx + 1].astype(np.float32)
    sx = (gx + 0.5 + rng.uniform(-jitter, jitter, gx.shape).astype(np.float32)) * cell
    sy = (gy + 0.5 + rng.uniform(-jitter, jitter, gy.shape).astype(np.float32)) * cell
    ids = np.arange(sx.size, dtype=np.float32).reshape(sx.shape)
    x = np.arange(nx * cell, dtype=np.float32).reshape(1, 1, nx, cell)
    y = np.arange(ny * cell, dtype=np.float32).reshape(ny, cell, 1, 1)
    shape = (ny, cell, nx, cell)
    d1 = np.full(shape, np.inf, np.float32)
    other = np.full(shape, np.inf, np.float32) if second else np.zeros(shape, np.float32)
    for dj in (0, 1, 2):
        for di in (0, 1, 2):
            sl = (slice(dj, dj + ny), slice(di, di + nx))
            d = (x - sx[sl][:, None, :, None]) ** 2 + (y - sy[sl][:, None, :, None]) ** 2
            if second:
                np.minimum(other, np.maximum(d1, d), out=other)
            else:
                other += (d < d1) * (ids[sl][:, None, :, None] - other)
            np.minimum(d1, d, out=d1)

    def crop(a: np.ndarray) -> np.ndarray:
        return a.reshape(ny * cell, nx * cell)[:h, :w]

    other = np.sqrt(crop(other)) if second else crop(other).astype(np.int64)
    return np.sqrt(crop(d1)), other, sx.ravel(), sy.ravel()


def _stamp_bank(half_len: np.ndarray, half_wid: np.ndarray, angle: np.ndarray) -> np.ndarray:
    """(K, k, k) soft-edged ellipse stamps (1 px edge), one per (half length, half width, angle) in px."""
    r = int(math.ceil(float(np.max(half_len)))) + 1
    oy, ox = (o.astype(np.float32)[None] for o in np.mgrid[-r : r + 1, -r : r + 1])
    c = np.cos(angle).astype(np.float32)[:, None, None]
    s = np.sin(angle).astype(np.float32)[:, None, None]
    u = (ox * c + oy * s) / np.asarray(half_len, np.float32)[:, None, None]
    v = (oy * c - ox * s) / np.asarray(half_wid, np.float32)[:, None, None]
    val = (1.0 - np.sqrt(u * u + v * v)) * np.asarray(half_wid, np.float32)[:, None, None] + np.float32(0.5)
    return np.clip(val, 0.0, 1.0)


def _nuclei(
    shape: tuple[int, int], xs: np.ndarray, ys: np.ndarray, bank: np.ndarray, ids: np.ndarray
) -> np.ndarray:
    """Sum of stamps ``bank[ids]`` centred at ``(xs, ys)`` (px) on a zero (H, W) field, capped at 1.5.

    One gather and one ``np.bincount`` over a field padded by the stamp radius (no bounds checks).
    """
    h, w = shape
    k = bank.shape[-1]
    r = k // 2
    if xs.size == 0:
        return np.zeros(shape, np.float32)
    wp = w + 2 * r
    oy, ox = np.mgrid[0:k, 0:k]
    offs = (oy * wp + ox).ravel()
    base = np.rint(ys).astype(np.int64) * wp + np.rint(xs).astype(np.int64)
    flat = (base[:, None] + offs[None, :]).ravel()
    vals = bank.reshape(bank.shape[0], -1)[ids].ravel()
    field = np.bincount(flat, weights=vals, minlength=(h + 2 * r) * wp).reshape(h + 2 * r, wp)
    return np.minimum(field[r : r + h, r : r + w], 1.5).astype(np.float32)


def _points_in(rng, sub: np.ndarray, spacing: float, keep: float = 1.0):
    """Jittered-grid points (pitch ``spacing`` px) that fall on ``sub``; returns box-pixel x, y."""
    h, w = sub.shape
    gx, gy = np.meshgrid(np.arange(0, w, spacing), np.arange(0, h, spacing))
    xs = (gx + rng.uniform(0, spacing, gx.shape)).ravel()
    ys = (gy + rng.uniform(0, spacing, gy.shape)).ravel()
    sel = (rng.uniform(size=xs.size) < keep) & (xs < w - 0.5) & (ys < h - 0.5)
    xs, ys = xs[sel], ys[sel]
    on = sub[np.rint(ys).astype(np.int64), np.rint(xs).astype(np.int64)]
    return xs[on], ys[on]


def _fibres(rng, t_x, t_y, um, grain, *, width_um: float, phi: float) -> np.ndarray:
    """Wavy collagen-like fibres in [0, 1] running at about angle ``phi`` (radians).

    The profile across the fibres is a 1-D noise (irregular spacing and thickness, correlation length
    ``width_um``) read at a warped across-coordinate; a 2-D noise breaks fibres along their length.
    """
    shape = grain.shape
    n_tab = 1 << 14
    tab = (_noise_1d(rng, n_tab, width_um * um) * 0.6 + 0.25).astype(np.float32)
    c, s = np.float32(np.cos(phi)), np.float32(np.sin(phi))
    across = t_y * c - t_x * s + _smooth_noise(rng, shape, 45 * um) * np.float32(9 * um)
    fib = tab[across.astype(np.int32) & (n_tab - 1)]
    fib += _smooth_noise(rng, shape, 9 * um) * np.float32(0.25) + grain * np.float32(0.12)
    np.clip(fib, 0, 1, out=fib)
    return fib


def _paint_dense_nuclei(rng, t_x, t_y, um, grain, sub):
    """Crowded round-to-oval purple nuclei on pink cytoplasm."""
    xs, ys = _points_in(rng, sub, 8.5 * um)
    a = rng.uniform(3.0, 4.6, 48) * um
    bank = _stamp_bank(a, a * rng.uniform(0.7, 1.0, 48), rng.uniform(0, np.pi, 48))
    nuc = _nuclei(sub.shape, xs, ys, bank, rng.integers(0, 48, xs.size))
    h = np.float32(0.06) + nuc * (np.float32(0.78) + np.float32(0.1) * grain)
    e = (np.float32(0.27) + np.float32(0.04) * grain) * (1 - np.float32(0.4) * np.minimum(nuc, 1))
    return h, e


def _paint_stroma(rng, t_x, t_y, um, grain, sub):
    """Wavy eosin fibre bundles with pale gaps and sparse elongated nuclei along them."""
    phi = float(rng.uniform(0, np.pi))
    fib = _fibres(rng, t_x, t_y, um, grain, width_um=1.6, phi=phi)
    e = np.float32(0.16) + np.float32(0.42) * fib
    xs, ys = _points_in(rng, sub, 22 * um, keep=0.45)
    bank = _stamp_bank(
        rng.uniform(5.0, 8.0, 24) * um, rng.uniform(1.3, 2.0, 24) * um, phi + rng.normal(0, 0.15, 24)
    )
    nuc = _nuclei(sub.shape, xs, ys, bank, rng.integers(0, 24, xs.size))
    h = np.float32(0.04) + nuc * (np.float32(0.75) + np.float32(0.08) * grain)
    return h, e + np.float32(0.1) * nuc


def _paint_glands(rng, t_x, t_y, um, grain, sub):
    """Epithelial rings (pink, basal nuclei) around white lumina, in loose stroma."""
    shape = sub.shape
    cell = max(int(round(105 * um)), 8)
    d1, nearest, sx, sy = _cell_sites(rng, shape[0], shape[1], cell, 0.2, second=False)
    r_out = rng.uniform(0.30, 0.41, sx.size).astype(np.float32) * cell
    r_in = np.maximum(r_out - rng.uniform(13, 20, sx.size).astype(np.float32) * um, 3 * um)
    d1 += _smooth_noise(rng, shape, 15 * um) * np.float32(4 * um)
    ro, ri = r_out[nearest], r_in[nearest]
    epith = (d1 < ro) & (d1 >= ri)
    lumen = d1 < ri
    loose = np.float32(0.06) + np.float32(0.22) * _fibres(rng, t_x, t_y, um, grain, width_um=2.5, phi=1.0)
    e = (
        loose
        + epith * (np.float32(0.4) + np.float32(0.04) * grain - loose)
        - lumen * (loose - np.float32(0.015))
    )
    h = np.float32(0.03) + np.float32(0.09) * epith
    # Basal nuclei: a ring of radially elongated nuclei just inside each gland's outer edge.
    per = np.maximum((2 * np.pi * (r_out - 5 * um) / (6.5 * um)).astype(np.int64), 0)
    g = np.repeat(np.arange(sx.size), per)
    k = np.arange(g.size) - np.repeat(np.cumsum(per) - per, per)
    ang = (
        rng.uniform(0, 2 * np.pi, sx.size)[g]
        + k * (2 * np.pi / np.maximum(per[g], 1))
        + rng.normal(0, 0.05, g.size)
    )
    rad = r_out[g] - 5.2 * um + rng.normal(0, 0.6 * um, g.size)
    xs, ys = sx[g] + rad * np.cos(ang), sy[g] + rad * np.sin(ang)
    inside = (xs > 0) & (xs < shape[1] - 1) & (ys > 0) & (ys < shape[0] - 1)
    xs, ys, ang = xs[inside], ys[inside], ang[inside]
    bins = 24  # radial orientations over half a turn (an ellipse repeats after pi)
    bank = _stamp_bank(
        rng.uniform(3.8, 5.0, bins) * um, rng.uniform(2.2, 2.9, bins) * um, np.arange(bins) * np.pi / bins
    )
    nuc = _nuclei(shape, xs, ys, bank, np.rint(ang * (bins / np.pi)).astype(np.int64) % bins)
    h = h + nuc * (np.float32(0.8) + np.float32(0.08) * grain)
    return h, e


def _paint_fat(rng, t_x, t_y, um, grain, sub):
    """Large empty adipocytes separated by thin pink membranes."""
    cell = max(int(round(75 * um)), 8)
    d1, d2, _, _ = _cell_sites(rng, sub.shape[0], sub.shape[1], cell, 0.22, second=True)
    gap = (d2 - d1) * np.float32(1 / (1.4 * um))
    membrane = np.exp(-(gap * gap))
    e = np.float32(0.004) + np.float32(0.5) * membrane * (1 + np.float32(0.15) * grain)
    h = np.float32(0.05) * membrane
    return h, e
