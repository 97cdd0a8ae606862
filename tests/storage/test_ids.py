"""Sample IDs: safe names, uniqueness, store paths and parameter hashes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from equislide.storage import (
    SampleIdError,
    canonical_json,
    params_hash,
    safe_sample_id,
    sample_store_path,
    unique_sample_ids,
)


@pytest.mark.parametrize(
    ("stem", "expected"),
    [
        ("tma01", "tma01"),
        ("slide 1 (copy)", "slide_1_copy_"),
        ("Präparat-é", "Präparat-é"),
        ("Pra\u0308parat", "Pr\u00e4parat"),  # NFD input: one ID, in NFC
        ("[bold red]rich[/] markup", "_bold_red_rich_markup"),  # never read as markup
        ("line1\nline2\x1b[31m", "line1_line2_31m"),
        ("bad\udcff\udcfename", "bad_name"),  # bytes that are not UTF-8
        ("...", None),
        ("..", None),
        ("../../etc/passwd", "_.._etc_passwd"),
        (".hidden", "hidden"),
        ("a/b\\c", "a_b_c"),
        ("组织切片", "组织切片"),
        ("组织 slide", "组织_slide"),
        ("x" * 300, "x" * 180),
        ("组" * 100, "组" * 60),  # 180 UTF-8 bytes: outputs' names stay under 255 bytes
        ("ok.v2_final-3", "ok.v2_final-3"),
        ("", None),
    ],
)
def test_safe_sample_id(stem, expected):
    if expected is None:
        with pytest.raises(SampleIdError, match="empty"):
            safe_sample_id(stem)
    else:
        got = safe_sample_id(stem)
        assert got == expected
        assert "/" not in got and not got.startswith(".") and got not in {".", ".."}
        assert sample_store_path("root", got).name == got + ".zarr"  # accepted as a safe part
        got.encode("utf-8")  # always encodable


def test_unique_ids_keep_unicode_and_clash_on_normal_form():
    ids = unique_sample_ids([Path("/a/Caf\u00e9.svs"), Path("/b/Cafe\u0301.svs"), Path("/c/組織.png")])
    assert sorted(ids.values()) == ["Café", "Café-2", "組織"]


def test_unique_sample_ids_are_deterministic():
    paths = [
        Path("/b/slide.svs"),
        Path("/a/slide.tiff"),
        Path("/c/Slide.svs"),
        Path("/d/slide 1.svs"),
        Path("/e/slide_1.svs"),
        Path("/f/slide-2.svs"),
    ]
    ids = unique_sample_ids(paths)
    assert ids == unique_sample_ids(list(reversed(paths))) == unique_sample_ids(paths + paths[:2])
    assert ids[Path("/a/slide.tiff")] == "slide"
    assert ids[Path("/b/slide.svs")] == "slide-3"  # "slide-2" is another file's own ID
    assert ids[Path("/c/Slide.svs")] == "Slide-4"  # case-insensitive clash
    assert ids[Path("/d/slide 1.svs")] == "slide_1"
    assert ids[Path("/e/slide_1.svs")] == "slide_1-2"
    assert len(set(s.casefold() for s in ids.values())) == len(ids)
    assert list(ids) == sorted(ids, key=lambda p: str(p).casefold())


def test_sample_store_path(tmp_path):
    assert sample_store_path(tmp_path, "tma01/B3") == tmp_path / "tma01" / "B3.zarr"
    assert sample_store_path(tmp_path, "CMU-1") == tmp_path / "CMU-1.zarr"
    for bad in ("../x", "a/../b", "/abs", "a/b/c", "", "a b", ".hidden", "a/", "tma01/.."):
        with pytest.raises(SampleIdError, match="safe_sample_id"):
            sample_store_path(tmp_path, bad)


def test_params_hash_is_canonical():
    a = {"x": 1, "y": [1.5, "s"], "z": {"b": True, "a": None}}
    b = {"z": {"a": None, "b": True}, "y": (1.5, "s"), "x": np.int64(1)}
    assert params_hash(a) == params_hash(b) and len(params_hash(a)) == 64
    assert params_hash(a) != params_hash({**a, "x": 2})
    assert canonical_json(b) == '{"x":1,"y":[1.5,"s"],"z":{"a":null,"b":true}}'
    with pytest.raises(ValueError, match="nan"):
        params_hash({"nan": float("nan")})
    with pytest.raises(ValueError, match="type object"):
        params_hash({"o": object()})
