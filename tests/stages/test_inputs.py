"""Resolving a run's inputs: globs, folders, manifests, and files still arriving (real files, real waits)."""

from __future__ import annotations

import os
import time

import pytest

from equislide.stages.inputs import InputsError, read_manifest, resolve_inputs


def _file(path, data=b"x" * 100, age_s=30.0):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    t = time.time() - age_s
    os.utime(path, (t, t))
    return str(path)


def test_recursive_glob_and_folder_leave_temporary_names_for_later(tmp_path):
    a = _file(tmp_path / "inbox" / "a.svs")
    b = _file(tmp_path / "inbox" / "deep" / "er" / "b.svs")
    part = _file(tmp_path / "inbox" / "c.svs.part")
    _file(tmp_path / "inbox" / "notes.txt")
    _file(tmp_path / "inbox" / ".hidden.svs")
    res = resolve_inputs([str(tmp_path / "inbox" / "**" / "*.svs")], settle_seconds=0)
    assert res.paths == [a, b] and res.waiting == [part]
    folder = resolve_inputs([str(tmp_path / "inbox")], settle_seconds=0)
    assert folder.paths == [a, b] and folder.waiting == [part]  # .txt and hidden files are not slides
    assert folder.describe()["left_for_later"] == 1 and folder.describe()["found"] == 2
    csv = tmp_path / "m.csv"
    csv.write_text(f"path\n{a}\n{part}\n")  # a manifest written before the copy finished
    listed = resolve_inputs([], manifest=csv, settle_seconds=0)
    assert listed.paths == [a] and listed.waiting == [part]


def test_files_being_written_are_left_for_the_next_run(tmp_path):
    old = _file(tmp_path / "in" / "old.svs")
    fresh = _file(tmp_path / "in" / "fresh.svs", age_s=0.0)  # modified just now
    res = resolve_inputs([str(tmp_path / "in" / "*.svs")], settle_seconds=1.0)
    assert res.paths == [old] and res.waiting == [fresh]
    # Named directly, a file is always taken: the user asked for it.
    direct = resolve_inputs([fresh], settle_seconds=1.0)
    assert direct.paths == [fresh] and direct.waiting == []


def test_a_file_growing_across_the_wait_is_arriving_even_with_an_old_mtime(tmp_path):
    import threading

    path = tmp_path / "in" / "slow.svs"
    _file(path, age_s=600.0)
    steady = _file(tmp_path / "in" / "steady.svs", age_s=600.0)

    def copy_more():  # a writer whose clock lags ours: it appends during the wait, the mtime stays old
        time.sleep(0.3)
        with open(path, "ab") as f:
            f.write(b"more")
        t = time.time() - 600
        os.utime(path, (t, t))

    writer = threading.Thread(target=copy_more)
    writer.start()
    res = resolve_inputs([str(tmp_path / "in")], settle_seconds=1.0)
    writer.join()
    assert res.paths == [steady] and res.waiting == [str(path)]


def test_manifest_rows_give_mpp_and_sample_ids_and_bad_rows_fail_alone(tmp_path):
    a = _file(tmp_path / "slides" / "a.svs")
    b = _file(tmp_path / "slides" / "b.svs")
    c = _file(tmp_path / "slides" / "c.svs")
    csv = tmp_path / "cohort.csv"
    csv.write_text(
        "\ufeffPath,MPP,sample_id,notes\n"  # Excel's BOM, capitalised headers, an extra column
        "slides/a.svs,0.5,patient 7,first\n"
        "slides/b.svs,,,\n"
        ",0.5,,no path\n"
        "slides/c.svs,abc,,\n"
        "slides/c.svs,40,,\n"
        f"{c},0.25,patient_7,\n"
        "\n"
        "slides/a.svs,,,again\n"
    )
    res = resolve_inputs([], manifest=csv, settle_seconds=0)
    assert res.paths == [a, b]
    assert res.input_mpp == {a: 0.5} and res.sample_ids == {a: "patient_7"}
    reasons = {k: r["reason"] for k, r in res.failed.items()}
    assert reasons == {
        f"{csv} line 4": f"{csv} line 4: empty path",
        f"{csv} line 5": f"{csv} line 5: mpp 'abc' is not a number of µm per pixel",
        f"{csv} line 6": f"{csv} line 6: mpp 40 is outside the plausible 0.05-20.0 µm per pixel",
        f"{csv} line 7": f"{csv} line 7: sample_id 'patient_7' is already used on line 2",
        f"{csv} line 9": f"{csv} line 9: slides/a.svs is already listed on line 2",
    }
    assert all(r["status"] == "failed" and "\n" not in r["reason"] for r in res.failed.values())


@pytest.mark.parametrize(
    ("content", "why"),
    [
        ("file,mpp\na.svs,0.5\n", "no 'path' column in the header (columns: file, mpp)"),
        ("", "no 'path' column in the header (columns: none)"),
        (b"path\n\xff\xfe.svs\n", "cannot read it"),
    ],
)
def test_unreadable_manifests_are_one_line_naming_the_file(tmp_path, content, why):
    csv = tmp_path / "m.csv"
    csv.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(InputsError) as err:
        read_manifest(csv)
    assert str(err.value).startswith(f"manifest {csv}: {why}") and "\n" not in str(err.value)
    with pytest.raises(InputsError, match="No such file"):
        read_manifest(tmp_path / "missing.csv")


def test_manifest_sample_ids_win_their_id_and_clashing_stems_move_aside(tmp_path):
    from equislide.stages.inputs import assign_sample_ids

    x = _file(tmp_path / "x" / "slide.svs")
    y = _file(tmp_path / "y" / "other.svs")
    ids, failed = assign_sample_ids([x, y], {y: "slide"})  # y is named "slide" by the manifest
    assert ids == {x: "slide-2", y: "slide"} and not failed


def test_a_glob_matching_nothing_is_a_warning_not_a_failure(tmp_path):
    res = resolve_inputs([str(tmp_path / "empty" / "*.svs")], settle_seconds=0)
    assert res.paths == [] and res.warnings == [f"{tmp_path / 'empty' / '*.svs'} matched no file"]
