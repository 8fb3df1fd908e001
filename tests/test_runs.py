"""dmquant deletes only what it created (dmquant/runs.py is the one place that deletes folders)."""

import os

import numpy as np

from dmquant.calibration.collect import shared_temp_dir
from dmquant.runs import MARKER, atomic_folder, remove_own_folder, save_image_atomic


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
