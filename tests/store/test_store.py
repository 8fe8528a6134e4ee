"""The store: commit last, skip or refuse by signature, keep earlier versions, ignore staging."""

from __future__ import annotations

import json

import numpy as np
import pytest

from medsam_engine.pipeline.core.errors import StoreConflictError
from medsam_engine.pipeline.core.types import Geometry
from medsam_engine.pipeline.store.case_store import CaseStore
from medsam_engine.pipeline.store.labels_meta import label_colour

AFFINE = np.diag([2.0, 1.0, 1.0, 1.0])  # (z, y, x) voxel -> mm
GEOMETRY = Geometry(
    affine=AFFINE,
    shape=(2, 4, 4),
    source_affine=AFFINE[:, [2, 1, 0, 3]],
    source_shape=(4, 4, 2),
    source_format="nifti",
).to_json()


def _commit(store, case_id, value, signature, **kw):
    labels = np.full((2, 4, 4), value, dtype=np.uint16)
    return store.commit_case(
        case_id,
        labels=labels,
        attrs={"geometry": GEOMETRY, "signature": signature},
        image=np.zeros((2, 4, 4), np.int16),
        **kw,
    )


def test_commit_then_read_back_with_ome_metadata(tmp_path):
    store = CaseStore(tmp_path)
    path = _commit(store, "c1", 3, {"s": 1})
    labels, attrs = store.read_labels("c1")
    assert labels.dtype == np.uint16
    assert (labels == 3).all()
    assert attrs.raw["status"] == "committed"
    meta = json.loads((path / "labels" / "medsam" / "zarr.json").read_text())["attributes"]["ome"]
    assert meta["version"] == "0.5"
    assert meta["image-label"]["properties"][0]["label-value"] == 3
    axes = json.loads((path / "zarr.json").read_text())["attributes"]["ome"]["multiscales"][0]["axes"]
    assert [a["name"] for a in axes] == ["z", "y", "x"]


def test_other_signature_is_refused_unless_overwrite_which_keeps_the_old(tmp_path):
    store = CaseStore(tmp_path)
    _commit(store, "c1", 1, {"s": 1})
    with pytest.raises(StoreConflictError, match="different signature"):
        _commit(store, "c1", 2, {"s": 2})
    _commit(store, "c1", 2, {"s": 2}, overwrite=True)
    assert (store.read_labels("c1")[0] == 2).all()
    assert len(list((tmp_path / "_previous" / "c1").iterdir())) == 1


def test_uncommitted_folder_is_not_a_case(tmp_path):
    store = CaseStore(tmp_path)
    _commit(store, "c1", 1, {"s": 1})
    meta = tmp_path / "c1.ome.zarr" / "zarr.json"
    data = json.loads(meta.read_text())
    data["attributes"]["medsam"]["status"] = "writing"
    meta.write_text(json.dumps(data))
    assert store.committed_cases() == []
    (tmp_path / "_staging" / "c2-x.ome.zarr").mkdir(parents=True)
    assert store.committed_cases() == []


def test_case_ids_are_keyed_hashes(tmp_path, monkeypatch):
    monkeypatch.delenv("MEDSAM_ENGINE_ID_KEY", raising=False)
    a, b = CaseStore(tmp_path / "a"), CaseStore(tmp_path / "b")
    assert a.case_id("series-uid-1") == a.case_id("series-uid-1")
    assert a.case_id("series-uid-1") != b.case_id("series-uid-1")  # each store has its own key
    assert "series" not in a.case_id("series-uid-1")


def test_label_colours_and_names_do_not_depend_on_the_other_labels(tmp_path):
    store = CaseStore(tmp_path)
    both = np.zeros((2, 4, 4), np.uint16)
    both[0], both[1] = 3, 5
    attrs = {"geometry": GEOMETRY, "signature": {}}
    store.commit_case("a", labels=both, attrs=attrs, label_names={5: "liver"})
    store.commit_case("b", labels=np.full((2, 4, 4), 5, np.uint16), attrs=attrs, label_names={5: "liver"})
    colours = {}
    for case_id in ("a", "b"):
        meta = json.loads((tmp_path / f"{case_id}.ome.zarr/labels/medsam/zarr.json").read_text())
        label = meta["attributes"]["ome"]["image-label"]
        colours[case_id] = {c["label-value"]: c["rgba"] for c in label["colors"]}
        assert store.label_properties(case_id)[-1] == {
            "label-value": 5,
            "name": "liver",
            "category": "Anatomical Structure",
            "snomed-ct-code": "10200004",
            "snomed-ct-meaning": "Liver",
            "review-status": "unreviewed",
            "rgb": list(label_colour(5)),
        }
    assert colours["a"][5] == colours["b"][5]
    assert colours["a"][3] != colours["a"][5]


def test_commit_closes_the_cases_error_and_quarantine_records(tmp_path):
    """A case committed after it failed (fixed input, new model, --retry-quarantined, or a local run after a
    distributed one) keeps no open failure: its error and quarantine records go with the commit."""
    from medsam_engine.pipeline.store.records import quarantine, quarantined

    store = CaseStore(tmp_path)
    store.record_error("c1", stage="read", reason="c1.nii.gz: truncated", run_id="r1")
    quarantine(store, "c1", stage="read", signature={"s": 1}, run_id="r1")
    store.record_error("c2", stage="read", reason="c2.nii.gz: truncated", run_id="r1")
    _commit(store, "c1", 3, {"s": 2})
    assert quarantined(store, "c1") is None
    assert not (tmp_path / "_errors" / "c1.json").exists()
    assert (tmp_path / "_errors" / "c2.json").exists()  # another case's record stays
