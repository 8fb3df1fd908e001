"""dmquant deletes only what it created (dmquant/runs.py is the one place that deletes folders)."""

import os
from pathlib import Path

import numpy as np

from dmquant.calibration.collect import shared_temp_dir
from dmquant.runs import MARKER, atomic_folder, record_written, remove_own_folder, save_image_atomic


def test_remove_own_folder_deletes_only_marked_or_empty_folders(tmp_path):
    user = tmp_path / "user"
    user.mkdir()
    (user / "data.txt").write_text("precious")
    empty = tmp_path / "empty"
    empty.mkdir()
    with atomic_folder(tmp_path / "ours", kind="run") as out:
        (out / "weights.bin").write_text("x")
    assert remove_own_folder(user) is False and (user / "data.txt").read_text() == "precious"
    assert remove_own_folder(empty) is True and not empty.exists()
    assert (tmp_path / "ours" / MARKER).is_file()
    assert remove_own_folder(tmp_path / "ours") is True and not (tmp_path / "ours").exists()
    link = tmp_path / "link"
    link.symlink_to(user)
    assert remove_own_folder(link) is False and (user / "data.txt").exists()


def test_a_finished_folder_loses_only_the_entries_its_marker_lists(tmp_path, capsys):
    import json

    with atomic_folder(tmp_path / "ours", kind="run") as out:
        (out / "sub").mkdir()
        (out / "sub" / "w.bin").write_text("x")
        (out / "a.txt").write_text("y")
    ours = tmp_path / "ours"
    assert json.loads((ours / MARKER).read_text())["files"] == ["a.txt", "sub", "sub/w.bin"]
    (ours / "sub" / "mine.txt").write_text("the user's")  # added after dmquant wrote the folder
    (ours / "notes.txt").write_text("the user's too")
    assert remove_own_folder(ours) is False
    left = sorted(p.relative_to(ours).as_posix() for p in ours.rglob("*"))
    assert left == [MARKER, "notes.txt", "sub", "sub/mine.txt"]  # dmquant's files gone, the user's kept
    assert "holds files dmquant did not write" in capsys.readouterr().err
    later = tmp_path / "later"  # a file dmquant adds to a finished folder of its own is listed too
    with atomic_folder(later, kind="run") as out:
        (out / "sub").mkdir()
    (later / "sub" / "index.json").write_text("{}")
    record_written(later / "sub" / "index.json")
    assert remove_own_folder(later) is True and not later.exists()
    old_style = tmp_path / "old"  # a marker without a list or the private flag (an older dmquant)
    old_style.mkdir()
    (old_style / MARKER).write_text(json.dumps({"written_by": "dmquant", "kind": "model"}))
    (old_style / "w.bin").write_text("z")
    assert remove_own_folder(old_style) is False and (old_style / "w.bin").exists()


def test_a_private_marker_copied_into_another_folder_deletes_nothing_there(tmp_path):
    """A private (in-progress) marker empties only the folder dmquant made; copied with a tree, or into a user's
    folder that dmquant is later asked to replace, it makes none of that folder's files dmquant's."""
    import shutil

    from dmquant.runs import make_own_temp_folder

    made = Path(make_own_temp_folder("dmq-test-"))
    (made / "shard.bin").write_text("x")
    user = tmp_path / "user"
    shutil.copytree(made, user)  # the marker travels with the copy
    copied_marker = (user / MARKER).read_bytes()
    (user / "data.txt").write_text("precious")
    assert remove_own_folder(user) is False
    assert sorted(p.name for p in user.iterdir()) == sorted([MARKER, "data.txt", "shard.bin"])
    assert remove_own_folder(made) is True and not made.exists()  # the folder dmquant made: emptied, removed
    with atomic_folder(user, overwrite=True, kind="run") as out:  # replacing it moves it aside, deletes nothing
        (out / "w.bin").write_text("new")
    assert (user / "w.bin").read_text() == "new"
    aside = [p for p in tmp_path.iterdir() if p.name.startswith(".user.old-")]
    assert len(aside) == 1 and (aside[0] / "data.txt").read_text() == "precious" and (aside[0] / "shard.bin").exists()
    lone = tmp_path / "lone"  # the copied marker alone in a user's folder: the marker is not dmquant's either
    lone.mkdir()
    (lone / MARKER).write_bytes(copied_marker)
    assert remove_own_folder(lone) is False and (lone / MARKER).is_file()


def test_a_failed_write_leaves_no_temporary_folder_and_the_user_files_beside_it(tmp_path):
    (tmp_path / "keep.txt").write_text("k")
    try:
        with atomic_folder(tmp_path / "out") as out:
            (out / "partial").write_text("p")
            raise RuntimeError("boom")
    except RuntimeError:
        pass
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.txt"]


def test_image_save_never_removes_a_file_it_did_not_make(tmp_path):
    lookalike = tmp_path / f".img.png.tmp-{os.getpid()}.png"  # the name the old code used for its temporary file
    lookalike.write_text("someone's")
    save_image_atomic(np.zeros((8, 8, 3), np.uint8), tmp_path / "img.png")
    assert lookalike.read_text() == "someone's" and (tmp_path / "img.png").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == [lookalike.name, "img.png"]


def test_calibration_temp_folder_is_marked_and_removed(tmp_path):
    with shared_temp_dir() as folder:
        assert (folder / MARKER).is_file()
        (folder / "shard-00000.safetensors").write_bytes(b"x")
    assert not folder.exists()


def test_a_listed_file_changed_or_replaced_after_dmquant_wrote_it_stays(tmp_path):
    import os

    with atomic_folder(tmp_path / "ours", kind="run") as out:
        for name in ("kept.txt", "edited.txt", "replaced.txt", "touched.txt"):
            (out / name).write_text("dmquant's")
    ours = tmp_path / "ours"
    (ours / "edited.txt").write_text("the user's longer text")  # new size
    (ours / "replaced.txt").unlink()
    (ours / "replaced.txt").write_text("user's!!!")  # same size, a new file
    st = (ours / "touched.txt").stat()
    os.utime(ours / "touched.txt", ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    assert remove_own_folder(ours) is False
    left = sorted(p.name for p in ours.iterdir())
    assert left == [MARKER, "edited.txt", "replaced.txt", "touched.txt"]  # only the untouched file went
    assert (ours / "edited.txt").read_text() == "the user's longer text"


def test_a_marker_listing_outside_the_folder_deletes_nothing_there(tmp_path):
    """Entries of a (damaged or edited) marker that point outside the folder are never followed."""
    from dmquant.runs import _write_marker, remove_own_folder

    outside = tmp_path / "user.txt"
    outside.write_text("keep")
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "keep.txt").write_text("keep")
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / "mine.txt").write_text("dmquant's")
    (folder / "link").symlink_to(tmp_path / "elsewhere")
    _write_marker(folder, "run", files=["mine.txt", "../user.txt", str(outside), "link/keep.txt"])
    remove_own_folder(folder)
    assert outside.read_text() == "keep" and (tmp_path / "elsewhere" / "keep.txt").read_text() == "keep"
    assert not (folder / "mine.txt").exists()


def test_a_private_folder_keeps_a_file_that_predates_its_marker(tmp_path):
    """In a folder dmquant made, only what was written after its marker goes: a file brought in with its older
    times kept (``cp -p``, a move) stays, and so does the folder."""
    from dmquant.runs import make_own_temp_folder

    made = Path(make_own_temp_folder("dmq-test-"))
    (made / "shard.bin").write_text("x")  # written by dmquant, after the marker
    (made / "sub").mkdir()
    (made / "sub" / "part.bin").write_text("y")
    kept = made / "sub" / "moved-in.txt"
    kept.write_text("precious")
    marker_ns = (made / MARKER).lstat().st_mtime_ns
    os.utime(kept, ns=(marker_ns - 10**9, marker_ns - 10**9))  # times from before the marker
    assert remove_own_folder(made) is False
    assert sorted(p.relative_to(made).as_posix() for p in made.rglob("*")) == [MARKER, "sub", "sub/moved-in.txt"]
    assert kept.read_text() == "precious"
    kept.unlink()
    assert remove_own_folder(made) is True and not made.exists()
