"""The store and exports on S3 (fsspec/s3fs), against a real local S3 server (moto) on a loopback port."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
from conftest import commit_from_source, use_s3

from medsam_engine.pipeline.core.errors import StoreConflictError
from medsam_engine.pipeline.export.formats import export_store
from medsam_engine.pipeline.io.readers import read_volume
from medsam_engine.pipeline.store.case_store import CaseStore


@pytest.fixture(scope="module")
def bucket(s3_endpoint):
    """A bucket on the session's moto S3 server, reached through the standard AWS environment variables."""
    import s3fs

    with pytest.MonkeyPatch.context() as env:
        yield use_s3(env, s3_endpoint, "medsam")
        s3fs.S3FileSystem.clear_instance_cache()


@pytest.fixture(scope="module")
def chest_labels(small_chest):
    return read_volume(small_chest[1]).array


def test_commit_read_refuse_and_overwrite_on_s3(bucket, small_chest, chest_labels, chest_label_names):
    store = CaseStore(f"{bucket}/store")
    case_id = commit_from_source(store, small_chest[0], chest_labels, names=chest_label_names)
    assert store.committed_cases() == [case_id]
    labels, attrs = store.read_labels(case_id)
    assert np.array_equal(labels, chest_labels)
    assert attrs.raw["status"] == "committed"
    assert store.read_image(case_id).shape == chest_labels.shape
    assert {p["name"] for p in store.label_properties(case_id)} >= {"right lung", "left lung"}
    assert store.manifest(case_id)["image"] == str(small_chest[0])
    store.record_error("other", stage="read", reason="unreadable", run_id="r1")
    assert store.errors()["other"]["reason"] == "unreadable"

    changed = dict(attrs.raw, signature={"model_sha256": "1" * 64})
    with pytest.raises(StoreConflictError):
        store.commit_case(case_id, labels=labels, attrs=changed)
    store.commit_case(case_id, labels=np.where(labels == 5, 5, 0), attrs=changed, overwrite=True)
    labels_now, attrs_now = store.read_labels(case_id)
    assert set(np.unique(labels_now)) == {0, 5}
    (previous,) = attrs_now.raw["previous_versions"]
    assert previous["signature"] == attrs.signature
    kept = json.loads(store.fs.cat_file(f"{store.root}/{previous['path']}/zarr.json"))  # the earlier round
    assert kept["attributes"]["medsam"]["signature"] == attrs.signature
    assert store.fs.exists(f"{store.root}/{previous['path']}/labels/medsam/0/zarr.json")


class _Killed(BaseException):
    """Stands in for the writer dying: nothing after the raise is written."""


def test_an_interrupted_write_on_s3_is_not_a_case_and_a_rerun_commits_it(
    bucket, small_chest, chest_labels, monkeypatch, tmp_path
):
    import zarr

    store = CaseStore(f"{bucket}/interrupted")

    def die(*args, **kwargs):
        raise _Killed

    monkeypatch.setattr(zarr.Group, "update_attributes", die)  # chunks are written, the marker is not
    with pytest.raises(_Killed):
        commit_from_source(store, small_chest[0], chest_labels)
    monkeypatch.undo()
    (debris,) = [p for p in store.fs.ls(str(store.root), refresh=True) if p.endswith(".ome.zarr")]
    assert store.fs.exists(f"{debris}/labels/medsam/0/c/0/0/0")  # label chunks did reach the bucket
    assert store.committed_cases() == []
    assert export_store(store, "nifti", tmp_path).written == []
    case_id = commit_from_source(store, small_chest[0], chest_labels)
    assert store.committed_cases() == [case_id]


def test_exports_read_from_and_write_to_s3(bucket, small_chest, chest_labels, tmp_path):
    from medsam_engine.pipeline.cli.main import main

    store = CaseStore(f"{bucket}/exports-store")
    case_id = commit_from_source(store, small_chest[0], chest_labels)
    out = str(tmp_path / "local")
    assert main(["export", f"{bucket}/exports-store", "--format", "nifti", "--out", out]) == 0
    local = nib.load(str(tmp_path / "local" / f"{case_id}.nii.gz"))
    report = export_store(store, "nifti", f"{bucket}/exports/nifti")
    assert report.written == [f"{bucket}/exports/nifti/{case_id}.nii.gz"]
    store.fs.get_file(f"medsam/exports/nifti/{case_id}.nii.gz", str(tmp_path / "back.nii.gz"))
    back = nib.load(str(tmp_path / "back.nii.gz"))
    assert np.array_equal(np.asanyarray(back.dataobj), np.asanyarray(local.dataobj))
    assert np.allclose(back.affine, local.affine)
