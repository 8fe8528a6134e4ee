"""Atomic writes: a file or folder appears whole under its name, or not at all."""

from __future__ import annotations

import threading

import pytest

from medsam_engine.pipeline.core.atomic import atomic_file, create_exclusive, staged_folder, write_text_atomic


def test_a_failed_write_leaves_the_old_file_and_no_partial(tmp_path):
    path = write_text_atomic(tmp_path / "record.json", "old")
    with pytest.raises(RuntimeError), atomic_file(path) as temp:
        temp.write_text("half")
        raise RuntimeError("the check failed")
    assert path.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["record.json"]


def test_the_temporary_name_keeps_the_suffixes_writers_read(tmp_path):
    with atomic_file(tmp_path / "case.nii.gz") as temp:
        assert temp.name.endswith(".case.nii.gz")
        assert temp.name.startswith(".")
        assert temp.parent == tmp_path
        temp.write_bytes(b"x")
    assert (tmp_path / "case.nii.gz").read_bytes() == b"x"


def test_exclusive_creation_has_one_winner_among_racing_writers(tmp_path):
    path, wins = tmp_path / "_key", []
    threads = [
        threading.Thread(target=lambda n=n: wins.append(create_exclusive(path, f"key-{n}")))
        for n in range(16)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert wins.count(True) == 1
    assert path.read_text().startswith("key-")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["_key"]


def test_a_staged_folder_appears_whole_and_a_later_writer_keeps_the_first_copy(tmp_path):
    dest = tmp_path / "cache" / "study"
    with staged_folder(dest) as staging:
        (staging / "a.dcm").write_text("first")
        assert not dest.exists()
    with staged_folder(dest) as staging:
        (staging / "a.dcm").write_text("second")
    assert (dest / "a.dcm").read_text() == "first"
    with pytest.raises(ValueError), staged_folder(tmp_path / "cache" / "broken") as staging:
        (staging / "half.dcm").write_text("x")
        raise ValueError("download failed")
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == ["study"]
