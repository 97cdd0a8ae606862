"""``equislide tile`` on broken, odd and hostile inputs mixed with good ones in one invocation.

Every bad input must give exactly one ``equislide tile: FAILED <path>: <reason>`` line and exit status 1,
while the good inputs beside it are still written as stores that plain zarr opens.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import tifffile
import zarr
from PIL import Image

from equislide.cli import main

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def _he(shared_data: Path) -> np.ndarray:
    """A real H&E image (1000 x 1000 RGB)."""
    return np.asarray(Image.open(shared_data / "images" / "he-carcinoma-1000.png").convert("RGB"))


def _failed_lines(err: str) -> dict[str, str]:
    """``{path: reason}`` from the FAILED lines of stderr (each exactly one line)."""
    out = {}
    for line in err.splitlines():
        if line.startswith("equislide tile: FAILED "):
            rest = line[len("equislide tile: FAILED ") :]
            path, _, reason = rest.rpartition(": ") if rest.count(": ") == 1 else rest.partition(": ")
            assert path not in out, f"two FAILED lines for {path}"
            out[path] = reason
    return out


def _open_store(path: Path) -> zarr.Group:
    g = zarr.open_group(str(path), mode="r")
    assert g["tiles"].shape[0] >= 1 and g["tiles"].shape[0] == g["coords"].shape[0]
    assert g["tiles"][0].dtype == np.uint8
    return g


def test_bad_inputs_among_good_ones(shared_data: Path, tmp_path: Path, tiff_bomb, capsys) -> None:
    he = _he(shared_data)
    svs = shared_data / "slides" / "CMU-1-Small-Region.svs"
    d = tmp_path / "in"
    d.mkdir()
    bad: dict[str, tuple[Path, str]] = {}  # kind -> (path, text expected in the reason)
    good: dict[str, tuple[Path, str]] = {}  # kind -> (path, expected sample ID)

    # --- bad -------------------------------------------------------------------------------------
    (d / "empty.svs").write_bytes(b"")
    bad["zero-byte file"] = (d / "empty.svs", "empty file")
    (d / "notes.svs").write_text("this is not a slide\n")
    bad["text renamed .svs"] = (d / "notes.svs", "unknown format")
    (d / "cut.tiff").write_bytes(
        (shared_data / "slides" / "CMU-1-Small-Region.pyramid3.tiff").read_bytes()[:100_000]
    )
    bad["truncated TIFF"] = (d / "cut.tiff", "truncated")
    (d / "cut.svs").write_bytes(svs.read_bytes()[:300_000])
    bad["truncated SVS"] = (d / "cut.svs", "truncated")
    full_png = tmp_path / "full.png"
    Image.fromarray(he).save(full_png)
    (d / "cut.png").write_bytes(full_png.read_bytes()[: full_png.stat().st_size // 2])
    bad["truncated PNG"] = (d / "cut.png", "truncated or corrupt PNG")
    bad["decompression bomb"] = (tiff_bomb(d / "bomb.tif", 100_000, 100_000), "100000x100000")
    Image.new("RGB", (800, 600), (250, 250, 250)).save(d / "white.png")
    bad["all-white slide"] = (d / "white.png", "no tissue")
    Image.new("RGB", (1, 1), (120, 40, 140)).save(d / "dot.png")
    bad["1x1 image"] = (d / "dot.png", "image too small")
    bad["missing file"] = (d / "missing.svs", "file not found")
    (d / "folder.svs").mkdir()
    bad["directory"] = (d / "folder.svs", "directory")
    os.mkfifo(d / "pipe.svs")
    bad["FIFO"] = (d / "pipe.svs", "not a regular file")
    (d / "loop.svs").symlink_to("loop.svs")  # unreadable for any user, root included (ELOOP)
    bad["unreadable (symlink loop)"] = (d / "loop.svs", "cannot access file")
    (d / "dangling.svs").symlink_to(d / "nowhere.svs")
    bad["dangling symlink"] = (d / "dangling.svs", "file not found")
    Image.fromarray(he).save(d / "...png", format="PNG")  # stem "..": no usable sample ID
    bad["stem '..'"] = (d / "...png", "no usable sample ID")

    # --- good (or odd but usable) -----------------------------------------------------------------
    good["real SVS"] = (svs, "CMU-1-Small-Region")
    Image.fromarray(he).save(d / "really-a-png.svs", format="PNG")
    good["PNG named .svs"] = (d / "really-a-png.svs", "really-a-png")
    rgba = np.dstack([he, np.full(he.shape[:2], 255, np.uint8)])
    rgba[:, :200, 3] = 0  # a transparent strip: composited on white
    Image.fromarray(rgba, mode="RGBA").save(d / "rgba.png")
    good["RGBA"] = (d / "rgba.png", "rgba")
    tifffile.imwrite(d / "sixteen.tif", he.astype(np.uint16) * 257, photometric="rgb")
    good["16-bit"] = (d / "sixteen.tif", "sixteen")
    Image.fromarray(he).convert("L").save(d / "gray.png")
    good["grayscale"] = (d / "gray.png", "gray")
    for sub in ("a", "b"):
        (d / sub).mkdir()
        tifffile.imwrite(d / sub / "slide.tiff", he, photometric="rgb")
    good["duplicate stem 1"] = (d / "a" / "slide.tiff", "slide")
    good["duplicate stem 2"] = (d / "b" / "slide.tiff", "slide-2")
    (d / "dossier é ✓").mkdir()
    Image.fromarray(he).save(d / "dossier é ✓" / "coupe n°1 — tümör.png")
    # Letters of any script stay in the ID; symbols become "_".
    good["unicode and spaces"] = (d / "dossier é ✓" / "coupe n°1 — tümör.png", "coupe_n_1_tümör")
    Image.fromarray(he[:500]).save(d / "trav.png")
    good["'../' in the path"] = (d / "a" / ".." / "trav.png", "trav")

    out = tmp_path / "out"
    inputs = [str(p) for p, _ in bad.values()] + [str(p) for p, _ in good.values()]
    inputs.append(str(svs))  # the same file twice is tiled once
    assert main(["tile", *inputs, "--out", str(out), "--tile", "256", "--halo", "8", "--native-pixels"]) == 1
    captured = capsys.readouterr()
    failed = _failed_lines(captured.err)
    assert "Traceback" not in captured.err
    for kind, (path, expected) in bad.items():
        assert str(path) in failed, f"{kind}: no FAILED line for {path}\n{captured.err}"
        assert expected in failed[str(path)], f"{kind}: {failed[str(path)]!r}"
    assert len(failed) == len(bad), failed

    report = json.loads((out / "tile_report.json").read_text(encoding="utf-8"))
    by_path = {r["path"]: r for r in report["inputs"]}
    assert len(report["inputs"]) == len(bad) + len(good) and report["summary"]["failed"] == len(bad)
    assert report["parameters"]["tile"] == 256 and report["equislide_version"]
    for kind, (path, sample_id) in good.items():
        record = by_path[str(path)]
        assert record["status"] == "ok", f"{kind}: {record}"
        assert record["sample_id"] == sample_id and len(record["sha256"]) == 64
        g = _open_store(out / f"{sample_id}.zarr")
        assert g.attrs["equislide"]["source_sha256"] == record["sha256"]
    assert by_path[str(d / "empty.svs")]["error"] == "NotASlideError"
    assert by_path[str(d / "notes.svs")]["sha256"] is not None  # hashed even though it failed
    # Odd pixels became plain RGB: the grayscale store is gray, the RGBA strip white.
    gray = np.asarray(zarr.open_group(str(out / "gray.zarr"), mode="r")["tiles"][0])
    assert (gray[..., 0] == gray[..., 1]).all() and (gray[..., 1] == gray[..., 2]).all()
    # PNGs have no microscope resolution: native pixels as asked, warned on stderr and in the store.
    assert f"WARNING {d / 'rgba.png'}: no usable resolution: processed at native" in captured.err
    assert zarr.open_group(str(out / "rgba.zarr"), mode="r").attrs["equislide"]["warnings"]
    assert not list(out.rglob("*.partial-*"))


def test_usage_errors_exit_2(tmp_path: Path, capsys) -> None:
    with pytest.raises(SystemExit) as info:
        main(["tile", "--out", str(tmp_path / "out")])  # no inputs
    assert info.value.code == 2
    assert "SLIDE" in capsys.readouterr().err
    a_file = tmp_path / "out.txt"
    a_file.write_text("x")
    assert main(["tile", str(tmp_path / "x.svs"), "--out", str(a_file)]) == 2
    err = capsys.readouterr().err
    assert err.strip() == f"equislide tile: error: --out {a_file} exists and is not a folder"
    assert main(["tile", str(tmp_path / "x.svs"), "--out", str(tmp_path / "o"), "--tile", "0"]) == 2
    assert "--tile 0" in capsys.readouterr().err


def test_unexpected_error_is_one_line_and_others_continue(shared_data: Path, tmp_path: Path, capsys) -> None:
    """An input that raises something other than a SlideError: a TMA whose slide folder is a file."""
    from equislide.tiling import write_phantom

    write_phantom(tmp_path / "clash.tiff", cores=6, seed=3, mpp=2.0, core_diameter_um=600)
    Image.fromarray(_he(shared_data)).save(tmp_path / "ok.png")
    out = tmp_path / "out"
    out.mkdir()
    (out / "clash").write_text("a file where the folder of the cores' stores should go")
    args = [
        "tile",
        str(tmp_path / "clash.tiff"),
        str(tmp_path / "ok.png"),
        "--out",
        str(out),
        "--tma",
        "yes",
        "--native-pixels",
    ]
    assert main(args) == 1
    err = capsys.readouterr().err
    (line,) = [x for x in err.splitlines() if "FAILED" in x]
    assert line.startswith(f"equislide tile: FAILED {tmp_path / 'clash.tiff'}: unexpected FileExistsError: ")
    assert "Traceback" not in err
    assert (out / "ok" / "A1.zarr" / "_equislide_done.json").is_file()  # --tma yes: one core "A1"


@pytest.mark.slow
def test_local_cluster_two_workers_matches_in_process(shared_data: Path, tmp_path: Path, capsys) -> None:
    from equislide.tiling import write_phantom

    write_phantom(tmp_path / "tma02.tiff", cores=6, seed=2, mpp=1.0, core_diameter_um=600)
    (tmp_path / "bad.svs").write_text("nope")
    shutil.copyfile(shared_data / "images" / "he-carcinoma-1000.png", tmp_path / "he.png")
    inputs = [str(tmp_path / n) for n in ("tma02.tiff", "bad.svs", "he.png")]
    assert main(["tile", *inputs, "--out", str(tmp_path / "one"), "--native-pixels"]) == 1
    assert main(["tile", *inputs, "--out", str(tmp_path / "two"), "--workers", "2", "--native-pixels"]) == 1
    err = capsys.readouterr().err
    assert err.count(f"FAILED {tmp_path / 'bad.svs'}: not a slide") == 2
    one = sorted(p.relative_to(tmp_path / "one") for p in (tmp_path / "one").rglob("*") if p.is_file())
    two = sorted(p.relative_to(tmp_path / "two") for p in (tmp_path / "two").rglob("*") if p.is_file())
    assert one == two and any(str(p).startswith("tma02/") for p in one)
    for rel in one:
        if rel.name != "tile_report.json":
            assert (tmp_path / "one" / rel).read_bytes() == (tmp_path / "two" / rel).read_bytes(), rel
    report = json.loads((tmp_path / "two" / "tile_report.json").read_text())
    assert report["parameters"]["workers"] == 2


def test_hang_names_and_incremental_report(tmp_path: Path) -> None:
    """A file whose planning hangs (200000 x 200000, no pyramid) is stopped by its budget while the
    report already shows the inputs done before it; odd names (not UTF-8, markup, newline, CJK) are
    tiled, shown escaped, and never split a line; a duplicate is warned about with both paths."""
    import subprocess
    import sys
    import time

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from _malformed import huge_untiled_tiff, tissue_rgb

    from equislide.text import path_text

    d = tmp_path / "in"
    d.mkdir()
    png = d / "good.png"
    Image.fromarray(tissue_rgb(256, 256)).save(png)
    # The largest untiled TIFF the readers' limits still accept (2^28 px): its thumbnail decodes the
    # whole level (about 10 s here), far over a 3 s planning budget.
    huge = d / "huge.tif"
    huge.write_bytes(huge_untiled_tiff(16384, 16383))
    odd = [
        os.fsdecode(os.fsencode(d) + b"/bad\xff\xfename.png"),
        str(d / "[bold red]rich[_] markup.png"),
        str(d / "line1\nline2.png"),
        str(d / "組織切片.png"),
    ]
    for name in odd:
        shutil.copyfile(png, name)
    copy = d / "copy of good.png"
    shutil.copyfile(png, copy)
    out = tmp_path / "out"
    inputs = [str(png), str(huge), *odd, str(copy)]
    cmd = [
        sys.executable,
        "-m",
        "equislide",
        "tile",
        *inputs,
        "--out",
        str(out),
        "--tile",
        "128",
        "--budget",
        "plan=3",
        "--input-mpp",
        "0.5",
    ]
    proc = subprocess.Popen([os.fsencode(a) for a in cmd], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    seen_partial = False
    deadline = time.monotonic() + 300
    while proc.poll() is None and time.monotonic() < deadline:
        doc = (
            json.loads((out / "tile_report.json").read_bytes())
            if (out / "tile_report.json").is_file()
            else None
        )
        if doc:
            status = {r["path"]: r["status"] for r in doc["inputs"]}
            seen_partial |= status[str(png)] == "ok" and status[str(huge)] == "pending"
        time.sleep(0.2)
    stdout, stderr = proc.communicate(timeout=60)
    err = stderr.decode("utf-8")  # always valid UTF-8, whatever the names
    assert proc.returncode == 1, err
    assert seen_partial, "the report was not written before the hanging input finished"
    assert "Traceback" not in err
    failed = _failed_lines(err)
    assert list(failed) == [str(huge)] and "time budget of 3 s" in failed[str(huge)]
    report = json.loads((out / "tile_report.json").read_text(encoding="utf-8"))
    by_path = {r["path"]: r for r in report["inputs"]}
    assert report["summary"]["finished"] == len(inputs) == len(by_path)
    ids = {by_path[path_text(p)]["sample_id"] for p in odd}
    assert ids == {"bad_name", "_bold_red_rich_markup", "line1_line2", "組織切片"}
    for p in odd:
        assert by_path[path_text(p)]["status"] == "ok"
    assert path_text(odd[0]) == str(d / "bad\\xff\\xfename.png")
    assert "line1\nline2" not in err and "line1\\nline2" in err  # escaped, on one line
    # Every copy of good.png is a duplicate of it: one warning each, naming both paths.
    dups = [x for x in err.splitlines() if "(a duplicate input)" in x]
    assert len(dups) == len(odd) + 1
    assert f"equislide tile: WARNING {copy}: the same bytes as {png} (a duplicate input)" in dups
