"""Per-sample OME-Zarr (OME-NGFF 0.4, zarr format 2): an RGB image pyramid plus label pyramids.

napari (napari-ome-zarr), QuPath and vizarr open these without equislide. NGFF 0.4 on zarr v2 is the
version most viewers read; arrays use Blosc-LZ4 and ``"/"`` chunk keys, as 0.4 asks. Layout::

    <sample>.ome.zarr/
      .zgroup  .zattrs          multiscales (axes c, y, x; µm scale per level) + omero (R, G, B channels)
      0/ 1/ ...                 uint8 (3, Y_i, X_i), level i is 2**i coarser (2 x 2 block means)
      labels/
        .zattrs                 {"labels": ["clusters", "tissue"]}
        clusters/ .zattrs       multiscales (axes y, x, same scales) + image-label (colors, properties,
                                source {"image": "../../"}); 0/ 1/ ...: uint8/uint16 (Y_i, X_i),
                                nearest downsampling (every second pixel)
        tissue/                 the same for the tissue mask (0 background, 1 tissue)

Label images have the image's (y, x) shape at every level and the same number of levels, so every
viewer overlays them without resampling. Build the image at the label map's resolution (e.g.
``stitch_image(..., downsample=stride)`` next to ``stitch_labels(..., stride=stride)``). Label values
follow :mod:`equislide.storage.labels` (0 = no tissue, ``k + 1`` = cluster ``k``) and are coloured
with its :data:`~equislide.storage.labels.PALETTE`.

Metadata is validated before it is written (:func:`validate_image_attrs`,
:func:`validate_label_attrs`); a bad field raises ``ValueError`` naming it. The store is written under
``<path>.partial-<random>`` and renamed into place at the end.
"""

from __future__ import annotations

import shutil
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from equislide.files import publish_dir
from equislide.storage.labels import NO_TISSUE, label_color

__all__ = [
    "NGFF_VERSION",
    "validate_image_attrs",
    "validate_label_attrs",
    "write_ome_zarr",
]

#: The OME-NGFF version written.
NGFF_VERSION = "0.4"
_AXIS_TYPES = {"space", "time", "channel"}
_SPACE_UNITS = {"micrometer", "millimeter", "nanometer", "meter"}
_CHANNELS = (("R", "FF0000"), ("G", "00FF00"), ("B", "0000FF"))
_TISSUE_RGBA = (60, 180, 75, 255)


def _fail(field: str, problem: str) -> None:
    raise ValueError(f"OME-NGFF metadata: {field} {problem}")


def _validate_multiscales(attrs: Mapping[str, Any], *, ndim: int) -> int:
    ms = attrs.get("multiscales")
    if not isinstance(ms, list) or not ms:
        _fail("multiscales", "must be a non-empty list")
    m = ms[0]
    if not isinstance(m, Mapping):
        _fail("multiscales[0]", "must be an object")
    if m.get("version") != NGFF_VERSION:
        _fail("multiscales[0].version", f"must be {NGFF_VERSION!r}, got {m.get('version')!r}")
    axes = m.get("axes")
    if not isinstance(axes, list) or len(axes) != ndim:
        _fail("multiscales[0].axes", f"must list {ndim} axes, got {axes!r}")
    names = []
    for i, ax in enumerate(axes):
        where = f"multiscales[0].axes[{i}]"
        if not isinstance(ax, Mapping) or not isinstance(ax.get("name"), str):
            _fail(f"{where}.name", "must be a string")
        if ax.get("type") not in _AXIS_TYPES:
            _fail(f"{where}.type", f"must be one of {sorted(_AXIS_TYPES)}, got {ax.get('type')!r}")
        if ax["type"] == "space" and ax.get("unit") not in _SPACE_UNITS:
            _fail(f"{where}.unit", f"must be a space unit such as 'micrometer', got {ax.get('unit')!r}")
        names.append(ax["name"])
    if len(set(names)) != len(names):
        _fail("multiscales[0].axes", f"names must be unique, got {names}")
    if [a["type"] for a in axes][-2:] != ["space", "space"]:
        _fail("multiscales[0].axes", "must end with two space axes (y, x)")
    datasets = m.get("datasets")
    if not isinstance(datasets, list) or not datasets:
        _fail("multiscales[0].datasets", "must be a non-empty list")
    previous = None
    for i, ds in enumerate(datasets):
        where = f"multiscales[0].datasets[{i}]"
        if not isinstance(ds, Mapping) or not isinstance(ds.get("path"), str) or not ds["path"]:
            _fail(f"{where}.path", "must be a non-empty string")
        ct = ds.get("coordinateTransformations")
        if not isinstance(ct, list) or not ct:
            _fail(f"{where}.coordinateTransformations", "must be a non-empty list starting with a scale")
        if not isinstance(ct[0], Mapping) or ct[0].get("type") != "scale":
            _fail(f"{where}.coordinateTransformations[0].type", "must be 'scale'")
        scale = ct[0].get("scale")
        if (
            not isinstance(scale, list)
            or len(scale) != ndim
            or not all(isinstance(s, (int, float)) and s > 0 for s in scale)
        ):
            _fail(
                f"{where}.coordinateTransformations[0].scale",
                f"must be {ndim} positive numbers, got {scale!r}",
            )
        if len(ct) > 2 or (len(ct) == 2 and ct[1].get("type") != "translation"):
            _fail(f"{where}.coordinateTransformations", "may only add one 'translation' after the scale")
        if previous is not None and any(s < p for s, p in zip(scale[-2:], previous[-2:], strict=True)):
            _fail(f"{where}.coordinateTransformations[0].scale", "must not decrease from the previous level")
        previous = scale
    return len(datasets)


def validate_image_attrs(attrs: Mapping[str, Any], *, ndim: int = 3) -> None:
    """Check an image group's ``.zattrs`` (``multiscales``, optional ``omero``) against NGFF 0.4.

    Raises:
        ValueError: A field is missing or malformed; the message names it (``multiscales[0].axes[1].unit``).
    """
    _validate_multiscales(attrs, ndim=ndim)
    omero = attrs.get("omero")
    if omero is not None:
        channels = omero.get("channels") if isinstance(omero, Mapping) else None
        if not isinstance(channels, list) or not channels:
            _fail("omero.channels", "must be a non-empty list")
        for i, ch in enumerate(channels):
            if not isinstance(ch.get("color"), str) or len(ch["color"]) != 6:
                _fail(f"omero.channels[{i}].color", "must be a 6-digit hex RGB string")
            window = ch.get("window")
            if not isinstance(window, Mapping) or not {"min", "max", "start", "end"} <= window.keys():
                _fail(f"omero.channels[{i}].window", "must have min, max, start and end")


def validate_label_attrs(attrs: Mapping[str, Any], *, ndim: int = 2, n_levels: int | None = None) -> None:
    """Check a label image's ``.zattrs`` (``multiscales`` + ``image-label``) against NGFF 0.4.

    Args:
        attrs: The label group's attributes.
        ndim: Axes of the label arrays.
        n_levels: Levels of the parent image; the label must have as many.

    Raises:
        ValueError: A field is missing or malformed; the message names it (``image-label.colors[2].rgba``).
    """
    levels = _validate_multiscales(attrs, ndim=ndim)
    if n_levels is not None and levels != n_levels:
        _fail("multiscales[0].datasets", f"must have {n_levels} levels like the image, got {levels}")
    il = attrs.get("image-label")
    if not isinstance(il, Mapping):
        _fail("image-label", "must be an object")
    if il.get("version") != NGFF_VERSION:
        _fail("image-label.version", f"must be {NGFF_VERSION!r}")
    colors = il.get("colors")
    if not isinstance(colors, list):
        _fail("image-label.colors", "must be a list")
    seen = set()
    for i, c in enumerate(colors):
        value = c.get("label-value") if isinstance(c, Mapping) else None
        if not isinstance(value, int) or isinstance(value, bool):
            _fail(f"image-label.colors[{i}].label-value", f"must be an int, got {value!r}")
        if value in seen:
            _fail(f"image-label.colors[{i}].label-value", f"{value} is listed twice")
        seen.add(value)
        rgba = c.get("rgba")
        if not (
            isinstance(rgba, list)
            and len(rgba) == 4
            and all(isinstance(v, int) and 0 <= v <= 255 for v in rgba)
        ):
            _fail(f"image-label.colors[{i}].rgba", f"must be 4 ints in 0-255, got {rgba!r}")
    for i, p in enumerate(il.get("properties", [])):
        if not isinstance(p, Mapping) or not isinstance(p.get("label-value"), int):
            _fail(f"image-label.properties[{i}].label-value", "must be an int")
    source = il.get("source")
    if source is not None and not (isinstance(source, Mapping) and isinstance(source.get("image"), str)):
        _fail("image-label.source.image", "must be a relative path string such as '../../'")


def _n_levels(shape: tuple[int, int], *, min_side: int, max_levels: int) -> int:
    n, side = 1, max(shape)
    while n < max_levels and side > min_side:
        side = -(-side // 2)
        n += 1
    return n


def _halve_image(img: np.ndarray) -> np.ndarray:
    """(3, Y, X) uint8 -> (3, ceil(Y/2), ceil(X/2)) by 2 x 2 means, edges replicated."""
    _, h, w = img.shape
    padded = np.pad(img, ((0, 0), (0, h % 2), (0, w % 2)), mode="edge").astype(np.float32)
    mean = padded.reshape(3, padded.shape[1] // 2, 2, padded.shape[2] // 2, 2).mean(axis=(2, 4))
    return np.rint(mean).astype(np.uint8)


def _multiscales(name: str, axes: list[dict[str, Any]], scales: list[list[float]], kind: str) -> list[dict]:
    return [
        {
            "version": NGFF_VERSION,
            "name": name,
            "axes": axes,
            "datasets": [
                {"path": str(i), "coordinateTransformations": [{"type": "scale", "scale": s}]}
                for i, s in enumerate(scales)
            ],
            "type": kind,
        }
    ]


def _label_attrs(
    name: str,
    values: Sequence[int],
    scales: list[list[float]],
    colors: Mapping[int, Sequence[int]] | None,
    names: Mapping[int, str] | None,
) -> dict[str, Any]:
    yx = [
        {"name": "y", "type": "space", "unit": "micrometer"},
        {"name": "x", "type": "space", "unit": "micrometer"},
    ]
    colours = []
    props = []
    for v in sorted({int(v) for v in values} | {NO_TISSUE}):
        if colors is not None and v in colors:
            rgba = [int(c) for c in colors[v]]
            rgba = rgba + [255] * (4 - len(rgba))
        elif v == NO_TISSUE:
            rgba = [0, 0, 0, 0]
        else:
            rgba = [*label_color(v), 255]
        colours.append({"label-value": v, "rgba": rgba})
        props.append(
            {"label-value": v, "name": (names or {}).get(v, "no tissue" if v == NO_TISSUE else str(v))}
        )
    return {
        "multiscales": _multiscales(name, yx, [s[-2:] for s in scales], "nearest"),
        "image-label": {
            "version": NGFF_VERSION,
            "colors": colours,
            "properties": props,
            "source": {"image": "../../"},
        },
    }


def write_ome_zarr(
    path: str | Path,
    image: np.ndarray,
    *,
    pixel_size_um: float,
    labels: Mapping[str, np.ndarray] | None = None,
    label_colors: Mapping[str, Mapping[int, Sequence[int]]] | None = None,
    label_names: Mapping[str, Mapping[int, str]] | None = None,
    name: str = "",
    min_side: int = 256,
    max_levels: int = 8,
    chunk: int = 256,
) -> Path:
    """Write one sample as OME-Zarr (NGFF 0.4, zarr v2): an RGB pyramid and label pyramids.

    Args:
        path: Output folder (conventionally ``<sample>.ome.zarr``); an existing one is replaced.
        image: uint8 ``(Y, X, 3)`` RGB at level 0.
        pixel_size_um: Level-0 pixel size in µm (analysis mpp x downsample of ``image``).
        labels: ``{name: (Y, X) integer array}``, each with the image's shape (e.g. ``{"clusters": ...,
            "tissue": ...}``); values >= 0.
        label_colors: ``{name: {label value: (r, g, b[, a])}}``; default :data:`PALETTE` colours, label 0
            transparent (the ``tissue`` label gets green for 1).
        label_names: ``{name: {label value: text}}`` stored as ``image-label.properties[].name``.
        name: The image's name in the metadata (the sample ID).
        min_side: Stop adding levels once the largest side is at most this.
        max_levels: At most this many levels.
        chunk: Chunk side in pixels.

    Returns:
        ``path``.

    Raises:
        ValueError: A bad array, a label of the wrong shape, or invalid metadata (the field is named).
    """
    import numcodecs
    import zarr

    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3 or 0 in image.shape:
        raise ValueError(f"image must be uint8 (Y, X, 3) RGB, got {image.dtype} {image.shape}")
    if not float(pixel_size_um) > 0:
        raise ValueError(f"pixel_size_um={pixel_size_um!r} must be > 0")
    labels = dict(labels or {})
    for key, lab in labels.items():
        lab = np.asarray(lab)
        if lab.shape != image.shape[:2] or not np.issubdtype(lab.dtype, np.integer) or (lab < 0).any():
            raise ValueError(
                f"labels[{key!r}] must be a non-negative integer array of shape {image.shape[:2]}, "
                f"got {lab.dtype} {lab.shape}"
            )
        if not key or "/" in key or key.startswith("."):
            raise ValueError(f"label name {key!r} must be a plain folder name")
    n_levels = _n_levels(image.shape[:2], min_side=min_side, max_levels=max_levels)
    px = float(pixel_size_um)
    scales = [[1.0, px * 2**i, px * 2**i] for i in range(n_levels)]
    cyx = [
        {"name": "c", "type": "channel"},
        {"name": "y", "type": "space", "unit": "micrometer"},
        {"name": "x", "type": "space", "unit": "micrometer"},
    ]
    image_attrs: dict[str, Any] = {
        "multiscales": _multiscales(name, cyx, scales, "mean"),
        "omero": {
            "version": NGFF_VERSION,
            "name": name,
            "rdefs": {"model": "color", "defaultZ": 0, "defaultT": 0},
            "channels": [
                {
                    "label": label,
                    "color": colour,
                    "active": True,
                    "coefficient": 1.0,
                    "family": "linear",
                    "inverted": False,
                    "window": {"min": 0, "max": 255, "start": 0, "end": 255},
                }
                for label, colour in _CHANNELS
            ],
        },
    }
    image_attrs["multiscales"][0]["metadata"] = {"method": "2 x 2 block mean (edges replicated)"}
    validate_image_attrs(image_attrs, ndim=3)
    all_label_attrs = {}
    for key, lab in labels.items():
        colors = dict((label_colors or {}).get(key, {}))
        if key == "tissue" and 1 not in colors:
            colors[1] = _TISSUE_RGBA
        names = (label_names or {}).get(key)
        if names is None and key == "tissue":
            names = {0: "background", 1: "tissue"}
        values = np.unique(np.asarray(lab)).tolist()
        attrs = _label_attrs(key, values, scales, colors, names)
        validate_label_attrs(attrs, ndim=2, n_levels=n_levels)
        all_label_attrs[key] = attrs

    final = Path(path)
    partial = final.with_name(final.name + ".partial-" + uuid.uuid4().hex[:12])
    compressor = numcodecs.Blosc(cname="lz4", clevel=5, shuffle=numcodecs.Blosc.SHUFFLE)
    keys = {"name": "v2", "separator": "/"}

    def put(group: Any, key: str, data: np.ndarray, chunks: tuple[int, ...]) -> None:
        arr = group.create_array(
            key,
            shape=data.shape,
            chunks=tuple(min(c, s) for c, s in zip(chunks, data.shape, strict=True)),
            dtype=data.dtype,
            compressors=compressor,
            chunk_key_encoding=keys,
            fill_value=0,
        )
        arr[...] = data

    try:
        root = zarr.open_group(partial, mode="w", zarr_format=2)
        level = np.ascontiguousarray(image.transpose(2, 0, 1))
        for i in range(n_levels):
            if i:
                level = _halve_image(level)
            put(root, str(i), level, (1, chunk, chunk))
        root.attrs.update(image_attrs)
        if labels:
            lab_root = root.require_group("labels")
            for key, lab in labels.items():
                g = lab_root.require_group(key)
                lab = np.asarray(lab)
                top = int(lab.max()) if lab.size else 0
                data = lab.astype(np.uint8 if top <= 255 else np.uint16 if top <= 65535 else np.uint32)
                for i in range(n_levels):
                    put(g, str(i), data[:: 2**i, :: 2**i], (chunk, chunk))
                g.attrs.update(all_label_attrs[key])
            lab_root.attrs["labels"] = list(labels)
        publish_dir(partial, final, fsync=False)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return final
