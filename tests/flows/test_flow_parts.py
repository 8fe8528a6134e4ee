"""The distributed flow's parts on their own: shards, watermarks and the run summary."""

from __future__ import annotations

import os

import numpy as np
import pytest

from medsam_engine.flows.watermark import (
    Entry,
    check_name,
    next_mark,
    read_mark,
    select_new,
    study_entries,
    write_mark,
)
from medsam_engine.pipeline.annotate.plan import balance, estimate_slices
from medsam_engine.pipeline.core.types import CaseRef
from medsam_engine.pipeline.store.case_store import CaseStore


def test_balance_groups_cases_into_shards_of_near_equal_slices():
    weights = [40, 3, 3, 30, 10, 10]
    groups = balance(weights, 2)
    totals = sorted(sum(weights[i] + 1 for i in group) for group in groups)
    assert totals == [50, 52]
    assert sorted(i for g in groups for i in g) == list(range(6))
    assert balance([5, 5], 8) == [[0], [1]]
    with pytest.raises(ValueError, match="'shards'"):
        balance([1], 0)


def test_slice_counts_come_from_headers(small_chest, small_chest_nifti, small_chest_dicom, nuclei_2d):
    assert estimate_slices(CaseRef("a", str(small_chest[0]), kind="nrrd")) == 4
    assert estimate_slices(CaseRef("b", str(small_chest_nifti[0]), kind="nii.gz")) == 4
    files = tuple(str(p) for p in sorted(small_chest_dicom.iterdir()))
    assert estimate_slices(CaseRef("c", str(small_chest_dicom), kind="dicom-series", files=files)) == 4
    assert estimate_slices(CaseRef("d", str(nuclei_2d[0]), kind="png")) == 1
    assert estimate_slices(CaseRef("e", "gone.nii", kind="unreadable", error="gone")) == 0


def test_watermark_selects_settled_studies_changed_since_the_mark(tmp_path):
    inbox = tmp_path / "incoming"
    (inbox / "study1" / "series").mkdir(parents=True)
    (inbox / "study1" / "series" / "IM1").write_bytes(b"x")
    (inbox / "study2.zip").write_bytes(b"x")
    (inbox / ".partial").write_bytes(b"x")
    os.utime(inbox / "study2.zip", (1_000, 1_000))  # an old mtime (rsync -a) does not hide a new arrival
    entries = study_entries([str(inbox), "https://pacs.example/dicomweb/studies/1"])
    assert [os.path.basename(e.path) for e in entries][:2] == ["study1", "study2.zip"]
    assert entries[0].changed >= os.lstat(inbox / "study1" / "series" / "IM1").st_mtime
    assert entries[1].changed > 1_000
    assert entries[2].changed == float("inf")

    dated = [Entry("old", 50.0), Entry("new", 150.0), Entry("copying", 250.0), Entry("url", float("inf"))]
    assert [e.path for e in select_new(dated, since=100.0, until=200.0)] == ["new", "url"]
    assert [e.path for e in select_new(dated, since=None, until=200.0)] == ["old", "new", "url"]
    assert next_mark(200.0, [Entry("retry me", 150.0)]) < 150.0
    assert next_mark(200.0, []) == 200.0

    store = CaseStore(tmp_path / "store")
    assert read_mark(store, "nightly") is None
    write_mark(store, "nightly", 123.5, run_id="r1")
    assert read_mark(store, "nightly") == 123.5
    with pytest.raises(ValueError, match="watermark"):
        check_name("Nightly run")


def test_label_volumes_come_from_the_commits_counts_or_from_an_older_cases_map(tmp_path, small_chest):
    import json

    import nrrd
    from conftest import commit_from_source

    from medsam_engine.pipeline.annotate.run_record import label_volumes_ml
    from medsam_engine.pipeline.io.readers import read_volume

    store = CaseStore(tmp_path / "store")
    labels = read_volume(small_chest[1]).array.astype(np.uint16)
    case_id = commit_from_source(store, small_chest[0], labels)
    directions = nrrd.read_header(str(small_chest[0]))["space directions"]
    voxel_ml = abs(float(np.linalg.det(np.asarray(directions, dtype=float)))) / 1000
    expected = {int(v): (labels == v).sum() * voxel_ml for v in np.unique(labels) if v}
    recorded = label_volumes_ml(store, [case_id, "not-committed"])
    assert list(recorded) == [case_id]
    assert recorded[case_id] == pytest.approx(expected, rel=1e-3)
    assert label_volumes_ml(store, [case_id], from_maps=True) == recorded
    root = store.root / f"{case_id}.ome.zarr" / "zarr.json"  # as an engine that recorded no counts wrote it
    meta = json.loads(root.read_text())
    del meta["attributes"]["medsam"]["label_voxels"]
    root.write_text(json.dumps(meta))
    assert label_volumes_ml(store, [case_id]) == recorded


def test_ray_options_need_the_ray_engine(tmp_path, small_chest):
    from medsam_engine.pipeline.cli.main import main

    code = main(
        [
            "annotate",
            str(small_chest[0]),
            "--out",
            str(tmp_path / "s"),
            "--coarse-mask",
            str(small_chest[1]),
            "--actors",
            "2",
        ]
    )
    assert code == 2
