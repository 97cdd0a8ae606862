"""Per-sample OME-Zarr: the RGB image at the analysis resolution as a pyramid, plus label pyramids.

Written as OME-NGFF 0.5 (zarr v3, like the tile stores) by default, or 0.4 (zarr v2, ``"/"`` chunk
keys) with ``ngff_version="0.4"`` for viewers that read only 0.4. ome-zarr-py (and so napari-ome-zarr)
and ome-zarr-models read both; the tests validate both with ome-zarr-models and read them back with
ome-zarr-py. Layout (0.5; 0.4 has ``.zgroup``/``.zattrs``/``.zarray`` and no ``"ome"`` wrapper)::

    <sample>.ome.zarr/
      zarr.json                 attributes: "ome" {version, multiscales (axes c, y, x; per level a µm
                                scale and a translation placing the sample on its slide), omero (R, G,
                                B)}, "equislide" {l_origin, l0_origin, l0_per_l, ...: where it sits}
      0/ 1/ ...                 uint8 (3, Y_i, X_i); 0 is the analysis plane, level i is 2**i coarser
                                (2 x 2 block means, edges replicated)
      labels/
        zarr.json               "ome" {"labels": ["clusters", "tissue"]}
        clusters/ zarr.json     multiscales (axes y, x, the image's scales and translations) +
                                image-label (colors, properties, source {"image": "../../"});
                                0/ 1/ ...: uint8/uint16 (Y_i, X_i) with the image's shape at every
                                level: the label under each pixel's centre (nearest)
        tissue/                 the same for the tissue mask (0 background, 1 tissue)

The label map may be coarser than the image (``label_upsample``: image px per label px, e.g. the
feature stride) and offset from it (``label_offset``); each level's labels are sampled from it
directly, so every viewer overlays them without resampling. Label values follow
:mod:`equislide.storage.labels` (0 = no tissue, ``k + 1`` = cluster ``k``) and are coloured with its
:data:`~equislide.storage.labels.PALETTE`.

Memory stays bounded: the image is read from ``image[y0:y1]`` (a numpy array, a zarr array or a lazy
:class:`~equislide.storage.labels.TilePlane`) one band of chunk rows at a time, and each coarser level
is made from the level just written, a band at a time.

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
    "NGFF_VERSIONS",
    "ngff_attrs",
    "validate_image_attrs",
    "validate_label_attrs",
    "write_ome_zarr",
]

#: The OME-NGFF version written by default.
NGFF_VERSION = "0.5"
#: The versions :func:`write_ome_zarr` can write (0.4: zarr v2; 0.5: zarr v3).
NGFF_VERSIONS = ("0.4", "0.5")
_AXIS_TYPES = {"space", "time", "channel"}
_SPACE_UNITS = {"micrometer", "millimeter", "nanometer", "meter"}
_CHANNELS = (("R", "FF0000"), ("G", "00FF00"), ("B", "0000FF"))
_TISSUE_RGBA = (60, 180, 75, 255)


def _fail(field: str, problem: str) -> None:
    raise ValueError(f"OME-NGFF metadata: {field} {problem}")


def _unwrap(attrs: Mapping[str, Any]) -> tuple[str, Mapping[str, Any], str]:
    """``(version, body, field prefix)``: 0.5 keeps everything under ``"ome"``, 0.4 at the top."""
    if "ome" in attrs:
        ome = attrs["ome"]
        if not isinstance(ome, Mapping):
            _fail("ome", "must be an object")
        if ome.get("version") != "0.5":
            _fail("ome.version", f"must be '0.5', got {ome.get('version')!r}")
        return "0.5", ome, "ome."
    ms = attrs.get("multiscales")
    version = ms[0].get("version") if isinstance(ms, list) and ms and isinstance(ms[0], Mapping) else None
    if version != "0.4" and ms is not None:
        _fail(
            "multiscales[0].version", f"must be '0.4' (or the attributes under 'ome', 0.5), got {version!r}"
        )
    return "0.4", attrs, ""


def _validate_multiscales(body: Mapping[str, Any], *, ndim: int, prefix: str) -> int:
    ms = body.get("multiscales")
    if not isinstance(ms, list) or not ms:
        _fail(f"{prefix}multiscales", "must be a non-empty list")
    m = ms[0]
    if not isinstance(m, Mapping):
        _fail(f"{prefix}multiscales[0]", "must be an object")
    axes = m.get("axes")
    if not isinstance(axes, list) or len(axes) != ndim:
        _fail(f"{prefix}multiscales[0].axes", f"must list {ndim} axes, got {axes!r}")
    names = []
    for i, ax in enumerate(axes):
        where = f"{prefix}multiscales[0].axes[{i}]"
        if not isinstance(ax, Mapping) or not isinstance(ax.get("name"), str):
            _fail(f"{where}.name", "must be a string")
        if ax.get("type") not in _AXIS_TYPES:
            _fail(f"{where}.type", f"must be one of {sorted(_AXIS_TYPES)}, got {ax.get('type')!r}")
        if ax["type"] == "space" and ax.get("unit") not in _SPACE_UNITS:
            _fail(f"{where}.unit", f"must be a space unit such as 'micrometer', got {ax.get('unit')!r}")
        names.append(ax["name"])
    if len(set(names)) != len(names):
        _fail(f"{prefix}multiscales[0].axes", f"names must be unique, got {names}")
    if [a["type"] for a in axes][-2:] != ["space", "space"]:
        _fail(f"{prefix}multiscales[0].axes", "must end with two space axes (y, x)")
    datasets = m.get("datasets")
    if not isinstance(datasets, list) or not datasets:
        _fail(f"{prefix}multiscales[0].datasets", "must be a non-empty list")
    previous = None
    for i, ds in enumerate(datasets):
        where = f"{prefix}multiscales[0].datasets[{i}]"
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
        if len(ct) == 2:
            shift = ct[1].get("translation")
            if not (
                isinstance(shift, list)
                and len(shift) == ndim
                and all(isinstance(v, (int, float)) and np.isfinite(v) for v in shift)
            ):
                _fail(
                    f"{where}.coordinateTransformations[1].translation",
                    f"must be {ndim} finite numbers, got {shift!r}",
                )
        if previous is not None and any(s < p for s, p in zip(scale[-2:], previous[-2:], strict=True)):
            _fail(f"{where}.coordinateTransformations[0].scale", "must not decrease from the previous level")
        previous = scale
    return len(datasets)


def validate_image_attrs(attrs: Mapping[str, Any], *, ndim: int = 3) -> None:
    """Check an image group's attributes (``multiscales``, optional ``omero``) against NGFF 0.4 or 0.5.

    0.5 attributes sit under ``"ome"`` (with ``"version": "0.5"``), 0.4 ones at the top with the
    version in ``multiscales[0]``.

    Raises:
        ValueError: A field is missing or malformed; the message names it (``multiscales[0].axes[1].unit``).
    """
    _, body, prefix = _unwrap(attrs)
    _validate_multiscales(body, ndim=ndim, prefix=prefix)
    omero = body.get("omero")
    if omero is not None:
        channels = omero.get("channels") if isinstance(omero, Mapping) else None
        if not isinstance(channels, list) or not channels:
            _fail(f"{prefix}omero.channels", "must be a non-empty list")
        for i, ch in enumerate(channels):
            if not isinstance(ch.get("color"), str) or len(ch["color"]) != 6:
                _fail(f"{prefix}omero.channels[{i}].color", "must be a 6-digit hex RGB string")
            window = ch.get("window")
            if not isinstance(window, Mapping) or not {"min", "max", "start", "end"} <= window.keys():
                _fail(f"{prefix}omero.channels[{i}].window", "must have min, max, start and end")


def validate_label_attrs(attrs: Mapping[str, Any], *, ndim: int = 2, n_levels: int | None = None) -> None:
    """Check a label image's attributes (``multiscales`` + ``image-label``) against NGFF 0.4 or 0.5.

    Args:
        attrs: The label group's attributes.
        ndim: Axes of the label arrays.
        n_levels: Levels of the parent image; the label must have as many.

    Raises:
        ValueError: A field is missing or malformed; the message names it (``image-label.colors[2].rgba``).
    """
    version, body, prefix = _unwrap(attrs)
    levels = _validate_multiscales(body, ndim=ndim, prefix=prefix)
    if n_levels is not None and levels != n_levels:
        _fail(f"{prefix}multiscales[0].datasets", f"must have {n_levels} levels like the image, got {levels}")
    il = body.get("image-label")
    if not isinstance(il, Mapping):
        _fail(f"{prefix}image-label", "must be an object")
    if version == "0.4" and il.get("version") != "0.4":
        _fail("image-label.version", "must be '0.4'")
    colors = il.get("colors")
    if not isinstance(colors, list):
        _fail(f"{prefix}image-label.colors", "must be a list")
    seen = set()
    for i, c in enumerate(colors):
        value = c.get("label-value") if isinstance(c, Mapping) else None
        if not isinstance(value, int) or isinstance(value, bool):
            _fail(f"{prefix}image-label.colors[{i}].label-value", f"must be an int, got {value!r}")
        if value in seen:
            _fail(f"{prefix}image-label.colors[{i}].label-value", f"{value} is listed twice")
        seen.add(value)
        rgba = c.get("rgba")
        if not (
            isinstance(rgba, list)
            and len(rgba) == 4
            and all(isinstance(v, int) and 0 <= v <= 255 for v in rgba)
        ):
            _fail(f"{prefix}image-label.colors[{i}].rgba", f"must be 4 ints in 0-255, got {rgba!r}")
    for i, p in enumerate(il.get("properties", [])):
        if not isinstance(p, Mapping) or not isinstance(p.get("label-value"), int):
            _fail(f"{prefix}image-label.properties[{i}].label-value", "must be an int")
    source = il.get("source")
    if source is not None and not (isinstance(source, Mapping) and isinstance(source.get("image"), str)):
        _fail(f"{prefix}image-label.source.image", "must be a relative path string such as '../../'")


def ngff_attrs(group_attrs: Mapping[str, Any]) -> dict[str, Any]:
    """The OME-NGFF metadata of a group, whatever the version: 0.5's ``"ome"`` object, or 0.4's
    top-level attributes (``multiscales``, ``omero``, ``image-label``, ``labels``)."""
    if "ome" in group_attrs:
        return dict(group_attrs["ome"])
    return {k: v for k, v in group_attrs.items() if k in ("multiscales", "omero", "image-label", "labels")}


def _n_levels(shape: tuple[int, int], *, min_side: int, max_levels: int) -> int:
    n, side = 1, max(shape)
    while n < max_levels and side > min_side:
        side = -(-side // 2)
        n += 1
    return n


def _halve_image(img: np.ndarray, *, block: int = 2048) -> np.ndarray:
    """(3, Y, X) uint8 -> (3, ceil(Y/2), ceil(X/2)) by 2 x 2 means (halves round up), edges replicated.

    Integer sums in blocks of ``block`` output columns: the temporaries stay a few MB whatever the
    slide's width (a float copy of a whole band was the writer's largest allocation).
    """
    _, h, w = img.shape
    padded = np.pad(img, ((0, 0), (0, h % 2), (0, w % 2)), mode="edge")
    oh, ow = padded.shape[1] // 2, padded.shape[2] // 2
    out = np.empty((3, oh, ow), np.uint8)
    for c0 in range(0, ow, block):
        c1 = min(c0 + block, ow)
        part = padded[:, :, 2 * c0 : 2 * c1].astype(np.uint16)
        sums = part[:, 0::2, 0::2] + part[:, 1::2, 0::2] + part[:, 0::2, 1::2] + part[:, 1::2, 1::2]
        out[:, :, c0:c1] = (sums + 2) // 4
    return out


def _transforms(scales: list[list[float]], shifts: list[list[float]] | None) -> list[list[dict[str, Any]]]:
    out = []
    for i, scale in enumerate(scales):
        ct: list[dict[str, Any]] = [{"type": "scale", "scale": scale}]
        if shifts is not None:
            ct.append({"type": "translation", "translation": shifts[i]})
        out.append(ct)
    return out


def _multiscales(
    version: str, name: str, axes: list[dict[str, Any]], transforms: list[list[dict]], kind: str
) -> list[dict]:
    m: dict[str, Any] = {"name": name, "axes": axes}
    if version == "0.4":
        m = {"version": "0.4", **m}
    m["datasets"] = [{"path": str(i), "coordinateTransformations": ct} for i, ct in enumerate(transforms)]
    m["type"] = kind
    return [m]


def _wrap(version: str, body: dict[str, Any]) -> dict[str, Any]:
    return {"ome": {"version": "0.5", **body}} if version == "0.5" else body


def _label_attrs(
    version: str,
    name: str,
    values: Sequence[int],
    transforms: list[list[dict]],
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
    yx_transforms = [[{**t, t["type"]: t[t["type"]][-2:]} for t in ct] for ct in transforms]
    image_label: dict[str, Any] = {"colors": colours, "properties": props, "source": {"image": "../../"}}
    if version == "0.4":
        image_label = {"version": "0.4", **image_label}
    return _wrap(
        version,
        {
            "multiscales": _multiscales(version, name, yx, yx_transforms, "nearest"),
            "image-label": image_label,
        },
    )


def _level_shapes(shape: tuple[int, int], n_levels: int) -> list[tuple[int, int]]:
    shapes = [shape]
    for _ in range(n_levels - 1):
        h, w = shapes[-1]
        shapes.append((-(-h // 2), -(-w // 2)))
    return shapes


def _nearest_index(
    n_out: int, level: int, upsample: int, offset: int, n_in: int
) -> tuple[np.ndarray, np.ndarray]:
    """Label index under each level-``level`` pixel's centre, and whether it falls inside the map.

    Level pixel ``i`` has its centre at image (level-0) coordinate ``(i + 0.5) * 2**level``, which is
    label coordinate ``(that + offset) / upsample``; integers only, so no rounding drift on big slides.
    """
    i = np.arange(n_out, dtype=np.int64)
    idx = ((2 * i + 1) * 2**level + 2 * offset) // (2 * upsample)
    inside = (idx >= 0) & (idx < n_in)
    return np.clip(idx, 0, n_in - 1), inside


def _label_array(key: str, lab: Any, values: Mapping[str, Sequence[int]] | None) -> Any:
    """A label map as given: a numpy array, or a zarr array kept lazy when its values are given."""
    if isinstance(lab, np.ndarray) or not hasattr(lab, "chunks"):
        return np.asarray(lab)
    if values is None or key not in values:
        raise ValueError(f"labels[{key!r}] is a lazy array: label_values[{key!r}] must list its values")
    return lab


def _chunks(shape: tuple[int, ...], chunk: int) -> tuple[int, ...]:
    """A level array's chunks: all 3 channels, ``chunk`` x ``chunk`` pixels, cut to its shape."""
    return tuple(min(c, s) for c, s in zip((3, chunk, chunk)[-len(shape) :], shape, strict=True))


def _creator(ngff_version: str, chunk: int):
    """``create(group, key, shape, dtype, dims)``: one level array as the writer makes it."""
    zarr_format = 3 if ngff_version == "0.5" else 2
    if zarr_format == 3:
        from equislide.storage.tile_store import tile_compressors

        array_kwargs: dict[str, Any] = {"compressors": tile_compressors()}
    else:
        import numcodecs

        array_kwargs = {
            "compressors": numcodecs.Blosc(cname="lz4", clevel=5, shuffle=numcodecs.Blosc.SHUFFLE),
            "chunk_key_encoding": {"name": "v2", "separator": "/"},
        }

    def create(group: Any, key: str, shape: tuple[int, ...], dtype: Any, dims: tuple[str, ...]) -> Any:
        extra = {"dimension_names": dims} if zarr_format == 3 else {}
        return group.create_array(
            key,
            shape=shape,
            chunks=_chunks(shape, chunk),
            dtype=dtype,
            fill_value=0,
            **array_kwargs,
            **extra,
        )

    return create


def _write_levels(root: Any, image: Any, shapes: list[tuple[int, int]], create: Any, chunk: int) -> None:
    """The RGB pyramid's arrays ``0``, ``1``, ... in ``root``: level 0 read a band of ``chunk`` rows at a
    time, each coarser level averaged from the one before."""
    previous = None
    for i, (lh, lw) in enumerate(shapes):
        arr = create(root, str(i), (3, lh, lw), np.uint8, ("c", "y", "x"))
        for y0 in range(0, lh, chunk):
            y1 = min(y0 + chunk, lh)
            if previous is None:
                band = np.asarray(image[y0:y1], dtype=np.uint8).transpose(2, 0, 1)
            else:
                band = _halve_image(previous[:, 2 * y0 : min(2 * y1, previous.shape[1])])
            arr[:, y0:y1] = band
        previous = arr


def _copy_levels(source: str | Path | None, partial: Path, shapes: list[tuple[int, int]], chunk: int) -> bool:
    """Copy the level arrays of ``source`` (:func:`write_image_levels`) into ``partial`` when they are
    the pyramid the writer would make (shapes, chunks, dtype); False (nothing copied) otherwise."""
    import zarr

    if source is None:
        return False
    try:
        group = zarr.open_group(source, mode="r")
        for i, (lh, lw) in enumerate(shapes):
            arr = group[str(i)]
            if arr.shape != (3, lh, lw) or arr.chunks != _chunks((3, lh, lw), chunk) or arr.dtype != np.uint8:
                return False
        if str(len(shapes)) in group:
            return False
    except Exception:  # noqa: BLE001 - levels that cannot be read are written anew
        return False
    for i in range(len(shapes)):
        shutil.copytree(Path(source) / str(i), partial / str(i))
    return True


def write_image_levels(
    path: str | Path,
    image: Any,
    *,
    ngff_version: str = NGFF_VERSION,
    min_side: int = 256,
    max_levels: int = 10,
    chunk: int = 512,
    attributes: Mapping[str, Any] | None = None,
) -> Path:
    """The RGB pyramid of :func:`write_ome_zarr` alone, as a plain zarr group at ``path`` (replaced
    atomically), for a later ``write_ome_zarr(..., image_levels=path)`` to copy: the image of a large
    sample can be averaged while its features run, and the outputs written after them need only the
    labels. ``attributes`` go to the group's attributes (what the levels were made from)."""
    import zarr

    if ngff_version not in NGFF_VERSIONS:
        raise ValueError(f"ngff_version={ngff_version!r} must be one of {NGFF_VERSIONS}")
    shape = tuple(int(v) for v in getattr(image, "shape", ()))
    if len(shape) != 3 or shape[2] != 3 or 0 in shape:
        raise ValueError(f"image must be uint8 (Y, X, 3) RGB, got shape {shape}")
    shapes = _level_shapes(shape[:2], _n_levels(shape[:2], min_side=min_side, max_levels=max_levels))
    final = Path(path)
    partial = final.with_name(final.name + ".partial-" + uuid.uuid4().hex[:12])
    try:
        root = zarr.open_group(partial, mode="w", zarr_format=3 if ngff_version == "0.5" else 2)
        _write_levels(root, image, shapes, _creator(ngff_version, chunk), chunk)
        root.attrs.update(dict(attributes or {}))
        publish_dir(partial, final, fsync=False)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return final


def write_ome_zarr(
    path: str | Path,
    image: Any,
    *,
    pixel_size_um: float,
    labels: Mapping[str, np.ndarray] | None = None,
    label_upsample: int = 1,
    label_offset: tuple[int, int] = (0, 0),
    label_colors: Mapping[str, Mapping[int, Sequence[int]]] | None = None,
    label_names: Mapping[str, Mapping[int, str]] | None = None,
    name: str = "",
    translation_um: tuple[float, float] | None = None,
    attributes: Mapping[str, Any] | None = None,
    ngff_version: str = NGFF_VERSION,
    label_values: Mapping[str, Sequence[int]] | None = None,
    min_side: int = 256,
    max_levels: int = 10,
    chunk: int = 512,
    image_levels: str | Path | None = None,
) -> Path:
    """Write one sample as OME-Zarr: an RGB pyramid and label pyramids on the same pixel grid.

    Args:
        path: Output folder (conventionally ``<sample>.ome.zarr``); an existing one is replaced.
        image: uint8 ``(Y, X, 3)`` RGB at level 0: a numpy or zarr array, or anything with ``shape``
            and row slicing ``image[y0:y1]`` (a :class:`~equislide.storage.labels.TilePlane`), read a
            band of ``chunk`` rows at a time.
        pixel_size_um: Level-0 pixel size in µm (the analysis mpp for the tile plane).
        labels: ``{name: (y, x) integer map}`` (e.g. ``{"clusters": ..., "tissue": ...}``), values >= 0,
            covering the image at ``label_upsample`` image px per label px.
        label_upsample: Image px per label px (the feature stride); 1: labels have the image's shape.
        label_offset: ``(x, y)`` image px from the label map's corner to the image's pixel (0, 0),
            >= 0 (the label grid may start before a cut image).
        label_colors: ``{name: {label value: (r, g, b[, a])}}``; default :data:`PALETTE` colours, label 0
            transparent (the ``tissue`` label gets green for 1).
        label_names: ``{name: {label value: text}}`` stored as ``image-label.properties[].name``.
        name: The image's name in the metadata (the sample ID).
        translation_um: ``(x, y)`` µm of level 0's pixel (0, 0) (a TMA core's place on its slide); a
            coarser level's translation adds half its pixel minus half a level-0 pixel, so pixel
            centres line up. None: no translation.
        attributes: JSON-able metadata stored beside the NGFF metadata under ``"equislide"``.
        ngff_version: ``"0.5"`` (zarr v3) or ``"0.4"`` (zarr v2).
        label_values: ``{name: values present}`` of a label map given as a zarr array (a whole
            slide's, stitched in bands): such a map is read only a band of the rows each level's band
            needs, never whole, and its values (for the colours and names) come from here.
        min_side: Stop adding levels once the largest side is at most this.
        max_levels: At most this many levels.
        chunk: Chunk side in pixels (and rows per band written).
        image_levels: A group :func:`write_image_levels` wrote of this ``image`` with the same
            ``ngff_version``, ``min_side``, ``max_levels`` and ``chunk``: its level arrays are copied
            (the same bytes) instead of reading and averaging the image again. Ignored when its levels'
            shapes, chunks or dtype differ.

    Returns:
        ``path``.

    Raises:
        ValueError: A bad array, a label map that does not cover the image, or invalid metadata (the
            field is named).
    """
    import zarr

    if ngff_version not in NGFF_VERSIONS:
        raise ValueError(f"ngff_version={ngff_version!r} must be one of {NGFF_VERSIONS}")
    shape = tuple(int(v) for v in getattr(image, "shape", ()))
    dtype = np.dtype(getattr(image, "dtype", np.uint8)) if shape else None
    if dtype != np.uint8 or len(shape) != 3 or shape[2] != 3 or 0 in shape:
        raise ValueError(f"image must be uint8 (Y, X, 3) RGB, got {dtype} {shape}")
    if not float(pixel_size_um) > 0:
        raise ValueError(f"pixel_size_um={pixel_size_um!r} must be > 0")
    up = int(label_upsample)
    ox, oy = (int(v) for v in label_offset)
    if up < 1 or ox < 0 or oy < 0:
        raise ValueError(
            f"need label_upsample >= 1 and label_offset >= 0, got {label_upsample}, {label_offset}"
        )
    h, w = shape[:2]
    labels = {k: _label_array(k, v, label_values) for k, v in (labels or {}).items()}
    for key, lab in labels.items():
        if not key or "/" in key or key.startswith("."):
            raise ValueError(f"label name {key!r} must be a plain folder name")
        covers = lab.ndim == 2 and lab.shape[0] * up >= h + oy and lab.shape[1] * up >= w + ox
        exact = up > 1 or (ox, oy) != (0, 0) or lab.shape == (h, w)
        lazy = not isinstance(lab, np.ndarray)
        negative = np.issubdtype(lab.dtype, np.signedinteger) if lazy else bool((lab < 0).any())
        if not (covers and exact) or not np.issubdtype(lab.dtype, np.integer) or negative:
            need = f"shape {(h, w)}" if up == 1 and (ox, oy) == (0, 0) else f"{up} px per label covering it"
            raise ValueError(
                f"labels[{key!r}] must be a non-negative integer map over the {(h, w)} image ({need}), "
                f"got {lab.dtype} {lab.shape}"
            )
    n_levels = _n_levels((h, w), min_side=min_side, max_levels=max_levels)
    shapes = _level_shapes((h, w), n_levels)
    px = float(pixel_size_um)
    scales = [[1.0, px * 2**i, px * 2**i] for i in range(n_levels)]
    shifts = None
    if translation_um is not None:
        tx, ty = (float(v) for v in translation_um)
        shifts = [[0.0, ty + (2**i - 1) * px / 2, tx + (2**i - 1) * px / 2] for i in range(n_levels)]
    transforms = _transforms(scales, shifts)
    cyx = [
        {"name": "c", "type": "channel"},
        {"name": "y", "type": "space", "unit": "micrometer"},
        {"name": "x", "type": "space", "unit": "micrometer"},
    ]
    multiscales = _multiscales(ngff_version, name, cyx, transforms, "mean")
    multiscales[0]["metadata"] = {"method": "2 x 2 block mean (edges replicated)"}
    omero: dict[str, Any] = {
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
    }
    if ngff_version == "0.4":
        omero = {"version": "0.4", **omero}
    image_attrs = _wrap(ngff_version, {"multiscales": multiscales, "omero": omero})
    validate_image_attrs(image_attrs, ndim=3)
    all_label_attrs = {}
    for key, lab in labels.items():
        colors = dict((label_colors or {}).get(key, {}))
        if key == "tissue" and 1 not in colors:
            colors[1] = _TISSUE_RGBA
        names = (label_names or {}).get(key)
        if names is None and key == "tissue":
            names = {0: "background", 1: "tissue"}
        values = list(label_values[key]) if not isinstance(lab, np.ndarray) else np.unique(lab).tolist()
        attrs = _label_attrs(ngff_version, key, values, transforms, colors, names)
        validate_label_attrs(attrs, ndim=2, n_levels=n_levels)
        all_label_attrs[key] = attrs

    final = Path(path)
    partial = final.with_name(final.name + ".partial-" + uuid.uuid4().hex[:12])
    create = _creator(ngff_version, chunk)
    try:
        root = zarr.open_group(partial, mode="w", zarr_format=3 if ngff_version == "0.5" else 2)
        if not _copy_levels(image_levels, partial, shapes, chunk):
            _write_levels(root, image, shapes, create, chunk)
        root.attrs.update(image_attrs)
        if attributes:
            root.attrs["equislide"] = dict(attributes)
        if labels:
            lab_root = root.require_group("labels")
            for key, lab in labels.items():
                g = lab_root.require_group(key)
                lazy = not isinstance(lab, np.ndarray)
                if lazy:
                    top = max((int(v) for v in label_values[key]), default=0)
                else:
                    top = int(lab.max()) if lab.size else 0
                out_dtype = np.dtype(np.uint8 if top <= 255 else np.uint16 if top <= 65535 else np.uint32)
                data = lab if lazy else lab.astype(out_dtype)
                for i, (lh, lw) in enumerate(shapes):
                    arr = create(g, str(i), (lh, lw), out_dtype, ("y", "x"))
                    cols, col_in = _nearest_index(lw, i, up, ox, data.shape[1])
                    rows, row_in = _nearest_index(lh, i, up, oy, data.shape[0])
                    for y0 in range(0, lh, chunk):
                        y1 = min(y0 + chunk, lh)
                        if lazy:  # only the map rows under this band: a whole slide's map stays on disk
                            lo, hi = int(rows[y0:y1].min()), int(rows[y0:y1].max()) + 1
                            block = np.asarray(data[lo:hi]).astype(out_dtype)
                            band = block[rows[y0:y1] - lo][:, cols]
                        else:
                            band = data[rows[y0:y1]][:, cols]
                        band[~(row_in[y0:y1, None] & col_in[None, :])] = NO_TISSUE
                        arr[y0:y1] = band
                g.attrs.update(all_label_attrs[key])
            lab_root.attrs.update(_wrap(ngff_version, {"labels": list(labels)}))
        publish_dir(partial, final, fsync=False)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return final
