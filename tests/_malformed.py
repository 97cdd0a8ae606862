"""A generator of hostile inputs: malformed files, odd colour spaces, odd names, odd file kinds.

``write_malformed(folder)`` writes every kind into ``folder`` and returns ``{kind: path}``; run them as
one cohort with good slides (``tests/flows/test_hostile_cohort.py``). Everything is generated here:
small synthetic images with tifffile / PIL, and TIFFs written byte by byte where a library would refuse
to write the damage (bad IFD offsets, IFD loops, tile tables pointing nowhere, huge declared sizes).
"""

from __future__ import annotations

import io
import os
import struct
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np

# TIFF tag codes used by the hand-written files.
_W, _H, _BPS, _COMP, _PHOTO, _STRIPOFF, _SPP, _ROWS, _STRIPBYTES = 256, 257, 258, 259, 262, 273, 277, 278, 279
_XRES, _YRES, _PLANAR, _RESUNIT, _TW, _TL, _TILEOFF, _TILEBYTES = 282, 283, 284, 296, 322, 323, 324, 325
_SHORT, _LONG, _RATIONAL, _ASCII = 3, 4, 5, 2


def tissue_rgb(height: int = 384, width: int = 384, seed: int = 0) -> np.ndarray:
    """A pink-and-purple blob on white: enough tissue for the mask, cheap to segment."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    blob = ((yy - height / 2) ** 2 + (xx - width / 2) ** 2) < (min(height, width) / 2.6) ** 2
    img = np.full((height, width, 3), 245, np.uint8)
    noise = rng.integers(0, 40, size=(height, width, 1), dtype=np.uint8)
    img[blob] = (np.array([180, 90, 160], np.uint8) + noise[blob]).clip(0, 255).astype(np.uint8)
    return img


def _entry(tag: int, typ: int, values: list[int] | tuple[int, ...]) -> tuple[int, int, list[int]]:
    return (tag, typ, list(values))


def raw_tiff(entries: list[tuple[int, int, list[int]]], payload: bytes = b"", *, next_ifd: int = 0) -> bytes:
    """A little-endian classic TIFF: header, ``payload`` at offset 8, then one IFD of ``entries``.

    Values that do not fit in the entry go after the IFD. ``next_ifd`` is written as given (a loop or a
    pointer past the end when asked to be). Offsets inside ``payload`` are the caller's business.
    """
    ifd_at = 8 + len(payload)
    ifd_at += ifd_at % 2
    size = {_SHORT: 2, _LONG: 4, _RATIONAL: 8, _ASCII: 1}
    fmt = {_SHORT: "H", _LONG: "I", _ASCII: "B"}
    extra_at = ifd_at + 2 + 12 * len(entries) + 4
    extra = b""
    table = b""
    for tag, typ, values in sorted(entries):
        if typ == _RATIONAL:
            data = b"".join(struct.pack("<II", *v) for v in zip(values[::2], values[1::2], strict=True))
            count = len(values) // 2
        else:
            data = struct.pack("<" + fmt[typ] * len(values), *values)
            count = len(values)
        if len(data) <= 4:
            field = data.ljust(4, b"\0")
        else:
            field = struct.pack("<I", extra_at + len(extra))
            extra += data + b"\0" * (len(data) % 2)
        assert size[typ]
        table += struct.pack("<HHI", tag, typ, count) + field
    if next_ifd == -1:  # a loop: the IFD points at itself
        next_ifd = ifd_at
    head = b"II*\0" + struct.pack("<I", ifd_at)
    body = payload + b"\0" * (ifd_at - 8 - len(payload))
    return head + body + struct.pack("<H", len(entries)) + table + struct.pack("<I", next_ifd) + extra


def rgb_strip_tiff(
    img: np.ndarray, *, next_ifd: int = 0, extra: list | None = None, **overrides: list[int]
) -> bytes:
    """An uncompressed RGB single-strip TIFF of ``img``, with tags overridable to break it."""
    h, w = img.shape[:2]
    data = img.tobytes()
    tags = {
        _W: (_LONG, [w]),
        _H: (_LONG, [h]),
        _BPS: (_SHORT, [8, 8, 8]),
        _COMP: (_SHORT, [1]),
        _PHOTO: (_SHORT, [2]),
        _STRIPOFF: (_LONG, [8]),
        _SPP: (_SHORT, [3]),
        _ROWS: (_LONG, [h]),
        _STRIPBYTES: (_LONG, [len(data)]),
        _PLANAR: (_SHORT, [1]),
    }
    names = {
        "width": _W,
        "height": _H,
        "bps": _BPS,
        "comp": _COMP,
        "photo": _PHOTO,
        "stripoff": _STRIPOFF,
        "spp": _SPP,
        "rows": _ROWS,
        "stripbytes": _STRIPBYTES,
    }
    for name, values in overrides.items():
        tags[names[name]] = (tags[names[name]][0], values)
    entries = [_entry(t, typ, v) for t, (typ, v) in tags.items()] + list(extra or [])
    return raw_tiff(entries, data, next_ifd=next_ifd)


def huge_untiled_tiff(width: int = 200_000, height: int = 200_000, tile: int = 512) -> bytes:
    """A ``width`` x ``height`` tiled RGB TIFF with no pyramid, a few MB: every tile entry points at the
    same small deflate tile (so a reader that walks the full resolution for a thumbnail takes for ever)."""
    one = zlib.compress(np.full((tile, tile, 3), 240, np.uint8).tobytes(), 9)
    n = -(-width // tile) * -(-height // tile)
    entries = [
        _entry(_W, _LONG, [width]),
        _entry(_H, _LONG, [height]),
        _entry(_BPS, _SHORT, [8, 8, 8]),
        _entry(_COMP, _SHORT, [8]),
        _entry(_PHOTO, _SHORT, [2]),
        _entry(_SPP, _SHORT, [3]),
        _entry(_PLANAR, _SHORT, [1]),
        _entry(_TW, _SHORT, [tile]),
        _entry(_TL, _SHORT, [tile]),
        _entry(_TILEOFF, _LONG, [8] * n),
        _entry(_TILEBYTES, _LONG, [len(one)] * n),
    ]
    return raw_tiff(entries, one)


def _png(img: np.ndarray, mode: str | None = None) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    im = Image.fromarray(img) if mode is None else Image.fromarray(img).convert(mode)
    im.save(buf, format="PNG")
    return buf.getvalue()


def _jpeg(img: np.ndarray, mode: str = "RGB") -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(img).convert(mode).save(buf, format="JPEG", quality=85)
    return buf.getvalue()


def _tiff(img: np.ndarray, **kw) -> bytes:
    import tifffile

    buf = io.BytesIO()
    tifffile.imwrite(buf, img, **kw)
    return buf.getvalue()


def _pyramid_tiff(img: np.ndarray, description: str = "") -> bytes:
    """An SVS-like tiled TIFF: level 0 plus one subresolution, Aperio-ish description."""
    import tifffile

    buf = io.BytesIO()
    with tifffile.TiffWriter(buf) as tw:
        tw.write(img, tile=(128, 128), photometric="rgb", description=description, subifds=0)
        tw.write(img[::2, ::2].copy(), tile=(128, 128), photometric="rgb", subfiletype=1)
    return buf.getvalue()


def _aperio(mpp: str) -> str:
    return f"Aperio Image Library v12.0.0\r\n384x384 -> 384x384 JPEG/RGB Q=70|AppMag = 20|MPP = {mpp}"


def write_malformed(folder: str | os.PathLike[str]) -> dict[str, Path]:
    """Write every kind of hostile input into ``folder``; ``{kind: path}`` (at least 60 kinds)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    img = tissue_rgb(256, 256)
    good_tiff = _tiff(img, photometric="rgb")
    good_png = _png(img)
    good_jpeg = _jpeg(img)
    pyramid = _pyramid_tiff(img, _aperio("0.5"))
    kinds: dict[str, Path] = {}

    def put(kind: str, name: str | bytes, data: bytes) -> None:
        path = Path(os.fsdecode(os.path.join(os.fsencode(folder), os.fsencode(name))))
        path.write_bytes(data)
        kinds[kind] = path

    # Empty and truncated files of each container, at several offsets.
    put("empty_svs", "empty.svs", b"")
    put("empty_png", "empty.png", b"")
    for frac in (0.02, 0.3, 0.6, 0.95):
        tag = f"{int(frac * 100):02d}"
        put(f"trunc_tiff_{tag}", f"trunc_{tag}.tif", good_tiff[: max(8, int(len(good_tiff) * frac))])
        put(f"trunc_svs_{tag}", f"trunc_{tag}.svs", pyramid[: max(8, int(len(pyramid) * frac))])
        put(f"trunc_png_{tag}", f"trunc_{tag}.png", good_png[: max(8, int(len(good_png) * frac))])
        put(f"trunc_jpeg_{tag}", f"trunc_{tag}.jpg", good_jpeg[: max(4, int(len(good_jpeg) * frac))])
    put("jpeg_headers_only", "headers_only.jpg", good_jpeg[: good_jpeg.find(b"\xff\xda") + 2])
    put("tiff_header_only", "header_only.tif", b"II*\0\x08\0\0\0")
    put("tiff_bad_magic", "bad_magic.tif", b"II+\0" + good_tiff[4:])
    put("text_as_svs", "notes.svs", b"this is not a slide\n" * 20)
    put("random_bytes", "random.tiff", np.random.default_rng(1).integers(0, 256, 4096, np.uint8).tobytes())
    put("png_bad_crc", "bad_crc.png", good_png[:33] + bytes([good_png[33] ^ 0xFF]) + good_png[34:])

    # Bad IFDs.
    put("ifd_offset_past_end", "ifd_past_end.tif", b"II*\0" + struct.pack("<I", 10**9))
    put("ifd_offset_zero", "ifd_zero.tif", b"II*\0\0\0\0\0")
    put("ifd_odd_offset_garbage", "ifd_garbage.tif", b"II*\0" + struct.pack("<I", 9) + b"\xff" * 64)
    put("ifd_loop", "ifd_loop.tif", rgb_strip_tiff(img, next_ifd=-1))
    put("ifd_next_past_end", "ifd_next_past_end.tif", rgb_strip_tiff(img, next_ifd=10**8))
    put("strip_offset_past_end", "strip_past_end.tif", rgb_strip_tiff(img, stripoff=[10**8]))
    put("strip_bytes_huge", "strip_bytes_huge.tif", rgb_strip_tiff(img, stripbytes=[2**31]))
    put("strip_bytes_zero", "strip_bytes_zero.tif", rgb_strip_tiff(img, stripbytes=[0]))
    put("rows_per_strip_zero", "rows_zero.tif", rgb_strip_tiff(img, rows=[0]))
    put("unknown_compression", "comp_unknown.tif", rgb_strip_tiff(img, comp=[12345]))
    put("bps_mismatch", "bps_mismatch.tif", rgb_strip_tiff(img, bps=[8, 8]))
    put("spp_zero", "spp_zero.tif", rgb_strip_tiff(img, spp=[0]))

    # Huge and zero declared sizes.
    put("width_zero", "width_zero.tif", rgb_strip_tiff(img, width=[0]))
    put("height_zero", "height_zero.tif", rgb_strip_tiff(img, height=[0]))
    put(
        "strip_huge_declared",
        "huge_declared.tif",
        rgb_strip_tiff(img, width=[4_000_000_000], height=[4_000_000_000]),
    )
    put("tiff_huge_100k", "huge_100k.tif", rgb_strip_tiff(img, width=[100_000], height=[100_000]))
    put("tiff_huge_untiled_200k", "huge_untiled_200k.tif", huge_untiled_tiff())
    png_huge = bytearray(good_png)
    png_huge[16:24] = struct.pack(">II", 2**31 - 1, 2**31 - 1)
    put("png_huge_ihdr", "huge_ihdr.png", bytes(png_huge))
    png_zero = bytearray(good_png)
    png_zero[16:24] = struct.pack(">II", 0, 0)
    put("png_zero_ihdr", "zero_ihdr.png", bytes(png_zero))

    # Bad resolution metadata.
    for tag, mpp in (
        ("zero", "0"),
        ("negative", "-0.25"),
        ("nan", "nan"),
        ("inf", "inf"),
        ("huge", "1e30"),
        ("text", "abc"),
    ):
        put(f"svs_mpp_{tag}", f"mpp_{tag}.svs", _pyramid_tiff(img, _aperio(mpp)))
    put(
        "tiff_xres_zero_denominator",
        "xres_zero_den.tif",
        rgb_strip_tiff(
            img,
            extra=[
                _entry(_XRES, _RATIONAL, [1, 0]),
                _entry(_YRES, _RATIONAL, [1, 0]),
                _entry(_RESUNIT, _SHORT, [3]),
            ],
        ),
    )
    put(
        "tiff_xres_zero",
        "xres_zero.tif",
        rgb_strip_tiff(
            img,
            extra=[
                _entry(_XRES, _RATIONAL, [0, 1]),
                _entry(_YRES, _RATIONAL, [0, 1]),
                _entry(_RESUNIT, _SHORT, [3]),
            ],
        ),
    )

    # Odd colour spaces and sample formats.
    cmyk = np.concatenate([255 - img, np.zeros(img.shape[:2] + (1,), np.uint8)], axis=2)
    put("tiff_cmyk", "cmyk.tif", _tiff(cmyk, photometric="separated"))
    put("tiff_cielab", "cielab.tif", _tiff(img, photometric="cielab"))
    put("tiff_ycbcr_tag", "ycbcr.tif", rgb_strip_tiff(img, photo=[6]))
    put("tiff_12bit", "bits12.tif", rgb_strip_tiff(img, bps=[12, 12, 12]))
    put("tiff_16bit", "bits16.tif", _tiff(img.astype(np.uint16) * 257, photometric="rgb"))
    put("tiff_float", "float.tif", _tiff(img.astype(np.float32) / 255, photometric="rgb"))
    put("tiff_float_nan", "float_nan.tif", _tiff(np.full(img.shape, np.nan, np.float32), photometric="rgb"))
    put("tiff_1bit", "bits1.tif", _tiff(img[..., 0] > 128, photometric="minisblack"))
    put(
        "tiff_palette",
        "palette.tif",
        _tiff(
            img[..., 0],
            photometric="palette",
            colormap=np.tile(np.arange(256, dtype=np.uint16) * 257, (3, 1)),
        ),
    )
    put("tiff_gray_minisblack", "gray.tif", _tiff(img[..., 0], photometric="minisblack"))
    put(
        "tiff_rgba_extra",
        "rgba.tif",
        _tiff(np.dstack([img, np.full(img.shape[:2], 255, np.uint8)]), photometric="rgb", extrasamples=[2]),
    )
    put(
        "tiff_5_channels",
        "chan5.tif",
        _tiff(np.dstack([img, img[..., :2]]), photometric="minisblack", planarconfig="contig"),
    )
    put("jpeg_cmyk", "cmyk.jpg", _jpeg(img, "CMYK"))
    put("jpeg_gray", "gray.jpg", _jpeg(img, "L"))
    put("png_1bit", "bits1.png", _png(img, "1"))
    put("png_palette", "palette.png", _png(img, "P"))
    put("png_16bit_gray", "gray16.png", _png(img[..., 0].astype(np.uint16) * 257))
    put("png_la", "la.png", _png(img, "LA"))
    put("all_black", "black.png", _png(np.zeros_like(img)))
    put("one_pixel", "one_pixel.png", _png(img[:1, :1]))

    # Odd names (good content, so their outcome shows whether the name survived).
    put("name_non_utf8", b"bad\xff\xfename.png", good_png)
    put("name_newline", "line1\nline2.png", good_png)
    put("name_rich_markup", "[bold red]rich[_] markup.png", good_png)
    put("name_cjk", "組織切片.png", good_png)
    put("name_long", "x" * 240 + ".png", good_png)
    put("name_leading_dash", "-rf.png", good_png)
    put("name_spaces", "  spaced  name .png", good_png)
    put("name_dots_only", "....png", good_png)
    put("name_control", "tab\there\x1b[31mred.png", good_png)

    # Odd file kinds.
    (folder / "folder.svs").mkdir(exist_ok=True)
    kinds["directory_svs"] = folder / "folder.svs"
    loop = folder / "loop.svs"
    if not loop.is_symlink():
        os.symlink(loop.name, loop)
    kinds["symlink_loop"] = loop
    dangling = folder / "dangling.svs"
    if not dangling.is_symlink():
        os.symlink("does-not-exist.svs", dangling)
    kinds["symlink_dangling"] = dangling
    fifo = folder / "fifo.svs"
    if not fifo.exists():
        os.mkfifo(fifo)
    kinds["fifo"] = fifo
    put("unreadable", "unreadable.png", good_png)
    os.chmod(kinds["unreadable"], 0)
    kinds["missing"] = folder / "missing.svs"
    return kinds


#: Kinds whose outcome depends on the readers (colour spaces, mpp, limits): success and a one-line
#: failure are both acceptable; what must hold is no traceback and no hang.
EITHER_WAY = frozenset(
    {
        "tiff_cmyk",
        "tiff_cielab",
        "tiff_ycbcr_tag",
        "tiff_12bit",
        "tiff_16bit",
        "tiff_float",
        "tiff_1bit",
        "tiff_palette",
        "tiff_gray_minisblack",
        "tiff_rgba_extra",
        "tiff_5_channels",
        "jpeg_cmyk",
        "jpeg_gray",
        "png_1bit",
        "png_palette",
        "png_16bit_gray",
        "png_la",
        "svs_mpp_zero",
        "svs_mpp_negative",
        "svs_mpp_nan",
        "svs_mpp_inf",
        "svs_mpp_huge",
        "svs_mpp_text",
        "tiff_xres_zero_denominator",
        "tiff_xres_zero",
        "trunc_tiff_95",
        "trunc_svs_95",
        "trunc_png_95",
        "trunc_jpeg_95",
        "trunc_jpeg_60",
        "jpeg_headers_only",
        "ifd_loop",
        "ifd_next_past_end",
        "png_bad_crc",
        "bps_mismatch",
        "tiff_huge_untiled_200k",
        "rows_per_strip_zero",
        "strip_bytes_zero",
        "strip_bytes_huge",
        "tiff_float_nan",
        "one_pixel",
        "unreadable",
    }
)

#: Good content under an odd name: these must succeed.
MUST_SUCCEED = frozenset(
    {
        "name_non_utf8",
        "name_newline",
        "name_rich_markup",
        "name_cjk",
        "name_long",
        "name_leading_dash",
        "name_spaces",
        "name_control",
    }
)

Maker = Callable[[Path], dict[str, Path]]
