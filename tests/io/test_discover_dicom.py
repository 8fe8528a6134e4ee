"""Discovery splits DICOM folders into one case per series, drops localizers, and leaks no UIDs."""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest

from medsam_engine.pipeline.core.errors import ReadError
from medsam_engine.pipeline.io.discover import DiscoveryOptions, case_content_hash, discover
from medsam_engine.pipeline.io.readers import read_case
from medsam_engine.pipeline.store.case_store import CaseStore

DICOMDIR_TREES = Path(pydicom.data.get_testdata_file("dicomdirtests"))


def _uids(folder: Path) -> set[str]:
    """Every UID value in the folder's DICOM files (to prove none reaches ids, keys, messages or logs)."""
    found = set()
    for path in folder.rglob("*"):
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
        except Exception:
            continue
        found |= {str(e.value) for e in ds.iterall() if e.VR == "UI" and e.value and "." in str(e.value)}
    return {uid for uid in found if not uid.startswith("1.2.840.10008.")}  # standard UIDs are not PHI


def _no_uid_in(text: str, uids: set[str]) -> bool:
    return not any(uid in text for uid in uids)


def test_multi_series_folder_gives_one_case_per_series(tmp_path, multi_series_folder, chest_volume, caplog):
    caplog.set_level(logging.DEBUG)
    cases = discover([multi_series_folder], CaseStore(tmp_path).case_ids())
    assert [c.kind for c in cases] == ["dicom-series", "dicom-series"]  # localizer, SC, README, DICOMDIR gone
    assert all(len(c.files) == 4 and c.series and len(c.series) == 16 for c in cases)
    assert len({c.case_id for c in cases}) == 2
    assert len({c.series for c in cases}) == 2
    for case in cases:  # series a (uncompressed) and b (RLE) hold the same real CT
        volume = read_case(case)
        assert np.array_equal(volume.array, chest_volume.array)
    uids = _uids(multi_series_folder)
    assert len(uids) > 10
    for case in cases:
        fields = dataclasses.asdict(case)
        fields = json.dumps({k: v for k, v in fields.items() if k not in ("image", "files")})
        assert _no_uid_in(fields, uids)
    assert _no_uid_in(caplog.text, uids)


def test_localizers_and_derived_images_are_kept_when_asked(tmp_path, multi_series_folder):
    options = DiscoveryOptions(keep_localizers=True, keep_derived=True)
    cases = discover([multi_series_folder], CaseStore(tmp_path).case_ids(), options=options)
    assert sorted(len(c.files) for c in cases) == [1, 1, 4, 4]


def test_case_ids_are_stable_and_keyed(tmp_path, multi_series_folder, monkeypatch):
    first = discover([multi_series_folder], CaseStore(tmp_path / "a").case_ids())
    again = discover([multi_series_folder], CaseStore(tmp_path / "a").case_ids())
    assert [c.case_id for c in first] == [c.case_id for c in again]
    monkeypatch.setenv("MEDSAM_ENGINE_ID_KEY", "another-key")
    other = discover([multi_series_folder], CaseStore(tmp_path / "b").case_ids())
    assert not {c.case_id for c in first} & {c.case_id for c in other}


def test_series_content_hash_covers_only_its_own_files(tmp_path, multi_series_folder):
    folder = tmp_path / "copy"
    shutil.copytree(multi_series_folder, folder)
    a, b = discover([folder], CaseStore(tmp_path / "store").case_ids())
    before = (case_content_hash(a), case_content_hash(b))
    victim = Path(b.files[0])
    victim.write_bytes(victim.read_bytes()[:-2] + b"\x00\x01")
    assert case_content_hash(a) == before[0]
    assert case_content_hash(b) != before[1]


def test_pydicom_dicomdir_trees(tmp_path, caplog):
    caplog.set_level(logging.INFO)
    cases = discover([DICOMDIR_TREES], CaseStore(tmp_path).case_ids())
    by_folder: dict[str, list] = {}
    for case in cases:
        by_folder.setdefault(Path(case.image).name, []).append(case)
    assert "CT2N" not in by_folder  # two localizers only
    assert "MR700" not in by_folder  # derived secondary projections
    assert [c.kind for c in by_folder["CR1"]] == ["dicom-image"]
    reversed_ct = read_case(by_folder["CT5N"][0])  # InstanceNumber runs against the positions
    assert reversed_ct.shape == (5, 16, 16)
    assert reversed_ct.spacing[0] == pytest.approx(2.5)
    with pytest.raises(
        ReadError,
        match=r"CT2 series [0-9a-f]{8}: 161 slices missing between z=-99.48 mm "
        r"and z=103.02 mm",
    ) as info:
        read_case(by_folder["CT2"][0])
    uids = _uids(DICOMDIR_TREES)
    assert len(uids) > 10
    assert _no_uid_in(str(info.value), uids)
    assert _no_uid_in(caplog.text, uids)
    assert all(_no_uid_in(c.case_id + (c.series or "") + (c.error or ""), uids) for c in cases)


def test_parallel_header_scan_matches_the_serial_one(tmp_path):
    serial = discover([DICOMDIR_TREES], CaseStore(tmp_path).case_ids())
    parallel = discover(
        [DICOMDIR_TREES],
        CaseStore(tmp_path).case_ids(),
        options=DiscoveryOptions(scan_workers=2, parallel_from=1),
    )
    assert serial == parallel


def test_a_folder_without_images_is_one_failing_case(tmp_path, multi_series_folder):
    folder = tmp_path / "nothing"
    folder.mkdir()
    (folder / "README.txt").write_text("no images here")
    (folder / "LOC0001").write_bytes((multi_series_folder / "a" / "LOC0000").read_bytes())
    (case,) = discover([folder], CaseStore(tmp_path / "s").case_ids())
    assert case.kind == "unreadable"
    assert case.error == "nothing: no image or DICOM series found (skipped: 1 .txt, 1 localizer)"


def test_scan_reads_headers_only(tmp_path, multi_series_folder):
    """A series whose pixel data is cut off is still discovered; reading it then fails with the reason."""
    folder = tmp_path / "cut"
    shutil.copytree(multi_series_folder / "a", folder)
    victim = sorted(folder.glob("IM*"))[0]
    victim.write_bytes(victim.read_bytes()[:-5000])
    (case,) = [c for c in discover([folder], CaseStore(tmp_path / "s").case_ids()) if len(c.files) == 4]
    with pytest.raises(ReadError, match="pixel data"):
        read_case(case)
