"""Zip and tar inputs: extracted safely into the store's cache, then discovered like folders."""

from __future__ import annotations

import io
import os
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest

from medsam_engine.pipeline.core.errors import ReadError
from medsam_engine.pipeline.io.archives import ExtractLimits, extract_archive, safe_member_path
from medsam_engine.pipeline.io.discover import DiscoveryOptions, discover
from medsam_engine.pipeline.io.readers import read_case
from medsam_engine.pipeline.store.case_store import CaseStore


def _zip_folder(folder: Path, target: Path, *, extra: dict[str, bytes] | None = None) -> Path:
    with zipfile.ZipFile(target, "w", zipfile.ZIP_DEFLATED) as zf:
        for path in sorted(folder.rglob("*")):
            if path.is_file():
                zf.write(path, f"export/{path.relative_to(folder)}")
        for name, data in (extra or {}).items():
            zf.writestr(name, data)
    return target


def test_zip_of_a_study_gives_the_same_cases_as_the_folder(
    tmp_path, multi_series_folder, small_chest, chest_volume
):
    import shutil

    shutil.copy(small_chest[0], multi_series_folder.parent / "chest.nrrd")
    archive = _zip_folder(multi_series_folder.parent, tmp_path / "study.zip")
    (multi_series_folder.parent / "chest.nrrd").unlink()
    store = CaseStore(tmp_path / "store")
    cases = discover([archive], store.case_ids())
    assert sorted(c.kind for c in cases) == ["dicom-series", "dicom-series", "nrrd"]
    assert all(Path(c.image).is_relative_to(store.root / "_cache") for c in cases)
    for case in cases:
        assert np.array_equal(read_case(case).array, chest_volume.array)
    folder_ids = {c.case_id for c in discover([multi_series_folder], store.case_ids())}
    assert folder_ids <= {c.case_id for c in cases}  # same series, same ids, wherever they come from
    marker = next((store.root / "_cache" / "archives").iterdir()) / ".refused.json"
    before = marker.stat().st_mtime_ns
    assert discover([archive], store.case_ids()) == cases
    assert marker.stat().st_mtime_ns == before  # reused, not redone


def test_tar_gz_input(tmp_path, multi_series_folder):
    target = tmp_path / "study.tar.gz"
    with tarfile.open(target, "w:gz") as tf:
        tf.add(multi_series_folder, arcname="study")
    cases = discover([target], CaseStore(tmp_path / "store").case_ids())
    assert [c.kind for c in cases] == ["dicom-series", "dicom-series"]


def test_path_escapes_and_links_are_refused_and_recorded(tmp_path, multi_series_folder):
    target = tmp_path / "evil.tar"
    with tarfile.open(target, "w") as tf:
        tf.add(multi_series_folder / "a", arcname="ok")
        for name, kind, link in [
            ("../../escape.dcm", tarfile.REGTYPE, ""),
            ("/etc/cron.d/x", tarfile.REGTYPE, ""),
            ("ok/passwd", tarfile.SYMTYPE, "/etc/passwd"),
            ("ok/up", tarfile.SYMTYPE, "../../.."),
            ("ok/hard", tarfile.LNKTYPE, "/etc/shadow"),
        ]:
            info = tarfile.TarInfo(name)
            info.type, info.linkname, info.size = kind, link, 4 if kind == tarfile.REGTYPE else 0
            tf.addfile(info, io.BytesIO(b"evil") if kind == tarfile.REGTYPE else None)
    store = CaseStore(tmp_path / "store" / "deep")
    cases = discover([target], store.case_ids())
    errors = sorted(c.error for c in cases if c.error)
    assert len(errors) == 5
    assert sum("is a link" in e for e in errors) == 3
    assert sum("unsafe path" in e for e in errors) == 2
    assert not (tmp_path / "store" / "escape.dcm").exists()
    assert not (tmp_path / "escape.dcm").exists()
    extracted = list((store.root / "_cache").rglob("*"))
    assert not any(p.is_symlink() for p in extracted)
    assert [c.kind for c in cases if not c.error] == ["dicom-series"]
    for case in (c for c in cases if c.error):
        with pytest.raises(ReadError, match=r"evil.tar: member"):
            read_case(case)


def test_zip_symlinks_and_escapes_are_refused(tmp_path):
    target = tmp_path / "links.zip"
    with zipfile.ZipFile(target, "w") as zf:
        link = zipfile.ZipInfo("disc/passwd")
        link.external_attr = 0o120777 << 16  # a symbolic link, as Info-ZIP stores them
        zf.writestr(link, "/etc/passwd")
        zf.writestr("../../outside.dcm", b"x")
        zf.writestr("disc/ok.txt", b"fine")
    folder, refused = extract_archive(target, tmp_path / "out")
    assert sorted(refused) == [
        ("outside.dcm", "has an unsafe path (absolute or with '..'); not extracted"),
        ("passwd", "is a link (links are never extracted; they could point outside the archive)"),
    ]
    assert sorted(p.name for p in folder.rglob("*") if p.is_file()) == [".refused.json", "ok.txt"]
    assert not any(p.is_symlink() for p in folder.rglob("*"))
    assert not (tmp_path / "outside.dcm").exists()


def test_zip_bomb_stops_at_the_limit_and_leaves_nothing(tmp_path):
    target = tmp_path / "bomb.zip"
    with zipfile.ZipFile(target, "w", zipfile.ZIP_DEFLATED) as zf:
        for k in range(4):
            zf.writestr(f"layer/{k}.dcm", b"\x00" * (16 << 20))
    assert target.stat().st_size < 200_000
    limits = ExtractLimits(max_bytes=1 << 40, max_ratio=100.0, ratio_from_bytes=8 << 20)
    (case,) = discover(
        [target], CaseStore(tmp_path / "store").case_ids(), options=DiscoveryOptions(limits=limits)
    )
    assert case.kind == "unreadable"
    assert "zip bomb" in case.error
    assert not any((tmp_path / "store" / "_cache").rglob("*.dcm"))
    with pytest.raises(ReadError, match="expands beyond 1000000 bytes"):
        extract_archive(target, tmp_path / "x", limits=ExtractLimits(max_bytes=1_000_000))
    assert not (tmp_path / "x").exists()


def test_corrupt_archive_is_one_failing_case(tmp_path):
    target = tmp_path / "broken.zip"
    target.write_bytes(b"PK\x03\x04" + os.urandom(2000))
    (case,) = discover([target], CaseStore(tmp_path / "store").case_ids())
    assert case.kind == "unreadable"
    assert case.error.startswith("broken.zip: corrupt or unreadable archive")


def test_nested_zip_is_extracted(tmp_path, multi_series_folder):
    inner = _zip_folder(multi_series_folder / "a", tmp_path / "inner.zip")
    outer = tmp_path / "outer.zip"
    with zipfile.ZipFile(outer, "w") as zf:
        zf.write(inner, "disc/inner.zip")
    cases = discover([outer], CaseStore(tmp_path / "store").case_ids())
    assert [c.kind for c in cases] == ["dicom-series"]


@pytest.mark.parametrize(
    "name, safe",
    [
        ("a/b.dcm", "a/b.dcm"),
        ("./a//b", "a/b"),
        ("../x", None),
        ("/abs", None),
        ("C:\\win\\x", None),
        ("a\\..\\..\\x", None),
        ("", None),
    ],
)
def test_safe_member_path(name, safe):
    result = safe_member_path(name)
    assert (None if result is None else str(result)) == safe
