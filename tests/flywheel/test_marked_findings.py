"""New findings from reviewers' marks in reviewed cases: rounds on the real chest CT as a DICOM series
(box-fill runner), round 1 from the lungs' coarse masks, the reviewer accepts the lungs and marks one missed
finding (a vertebra's long and short axis), one small finding within the accepted right lung (a nodule's
cross) and one on the accepted left lung itself in a GSPS, round 2 adds the missed one and the nodule and
round 3 with the same marks adds nothing."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pydicom
import pytest
from conftest import complete_dicom_headers, write_ct_series
from marks_making import image_xy, images_by_slice, write_gsps

from medsam_engine.detectors.evaluation import recist_axes
from medsam_engine.detectors.protocol import Detection
from medsam_engine.pipeline.cli.main import main
from medsam_engine.pipeline.core.geometry import align_to
from medsam_engine.pipeline.core.types import BoxPrompt
from medsam_engine.pipeline.flywheel.marked_findings import covering, fit_labels, within
from medsam_engine.pipeline.flywheel.review import import_corrections, review_queue
from medsam_engine.pipeline.flywheel.rounds import round_rows
from medsam_engine.pipeline.io.readers import read_volume
from medsam_engine.pipeline.store.case_store import CaseStore
from medsam_engine.pipeline.store.records import ROUNDS

SPINE, LEFT_LUNG, RIGHT_LUNG = 3, 6, 5


def _nifti(labels: np.ndarray, volume, path):
    """A (z, y, x) label map on the volume's grid as NIfTI (x, y, z axes, RAS affine)."""
    ijk = np.moveaxis(labels, (0, 1, 2), (2, 1, 0)).astype(np.int16)
    nib.save(nib.Nifti1Image(ijk, volume.geometry.affine[:, [2, 1, 0, 3]]), str(path))
    return path


def _cross(images, volume, reference, label):
    """A GSPS annotation: the long and short axis of ``label`` on its largest slice."""
    mask = reference == label
    z = int(np.argmax(mask.sum(axis=(1, 2))))
    long, short = recist_axes(mask[z], volume.spacing[1:])
    ds = images[z]
    objects = [("POLYLINE", image_xy(ds, volume, z, line), None) for line in (long, short)]
    return z, {"image": ds, "layer": "RECIST", "objects": objects}


def _nodule(images, volume, reference, label):
    """A GSPS annotation: a small cross (9 x 5 pixels) deep inside ``label`` on its largest slice."""
    from scipy import ndimage

    mask = reference == label
    z = int(np.argmax(mask.sum(axis=(1, 2))))
    y, x = np.unravel_index(int(np.argmax(ndimage.distance_transform_edt(mask[z]))), mask[z].shape)
    long, short = np.array([[x - 4, y], [x + 4, y]]), np.array([[x, y - 2], [x, y + 2]])
    ds = images[z]
    objects = [("POLYLINE", image_xy(ds, volume, z, line), None) for line in (long, short)]
    return z, (y, x), {"image": ds, "layer": "RECIST", "objects": objects}


def _round(series, store, box_fill, *extra: str) -> int:
    return main(["round", "run", str(series), "--store", str(store), "--config", str(box_fill), *extra])


@pytest.fixture(scope="module")
def rounds(tmp_path_factory, chest_ct, box_fill):
    root = tmp_path_factory.mktemp("marked_findings")
    series = root / "series"
    write_ct_series(read_volume(chest_ct[0]), series, series_uid="1.2.826.0.1.3680043.8.498.401")
    complete_dicom_headers(series, frame_of_reference_uid="1.2.826.0.1.3680043.8.498.402")
    volume = read_volume(series)
    reference = align_to(read_volume(chest_ct[1]), volume, what="reference").astype(np.uint16)
    lungs = np.where(np.isin(reference, (LEFT_LUNG, RIGHT_LUNG)), reference, 0)
    coarse = _nifti(lungs, volume, root / "lungs.nii.gz")
    store_root = root / "store"
    assert _round(series, store_root, box_fill, "--coarse-mask", str(coarse)) == 0  # round 1
    store = CaseStore(store_root)
    (case_id,) = store.committed_cases()
    imported = import_corrections(store, [_nifti(lungs, volume, root / f"{case_id}.nii.gz")], reviewer="dr a")
    assert list(imported.imported) == [case_id]
    accepted, accepted_attrs = store.read_labels(case_id)

    images = images_by_slice(series, volume)
    marks = root / "marks"
    marks.mkdir()
    new_z, new_mark = _cross(images, volume, reference, SPINE)
    lung_z, lung_mark = _cross(images, volume, reference, LEFT_LUNG)
    odd = {"image": images[new_z], "layer": "RECIST", "objects": [("POINT", [[5, 5]], None)]}
    nodule_z, nodule_yx, nodule_mark = _nodule(images, volume, reference, RIGHT_LUNG)
    write_gsps(marks / "pr.dcm", list(images.values()), [new_mark, lung_mark, odd, nodule_mark])
    edited = pydicom.dcmread(str(marks / "pr.dcm"))
    edited.GraphicAnnotationSequence[2].GraphicObjectSequence[0].GraphicType = "SPLINE"  # not DICOM's
    edited.save_as(str(marks / "pr.dcm"))

    again = ["--coarse-mask", str(coarse), "--marks", str(marks)]
    assert _round(series, store_root, box_fill, *again) == 0  # round 2
    second, second_attrs = store.read_labels(case_id)
    assert _round(series, store_root, box_fill, *again) == 0  # round 3
    third, third_attrs = store.read_labels(case_id)
    return {
        "queue": review_queue(store),
        "store": store,
        "case_id": case_id,
        "accepted": (accepted, accepted_attrs),
        "second": (second, second_attrs),
        "third": (third, third_attrs),
        "new_z": new_z,
        "lung_z": lung_z,
        "nodule": (nodule_z, *nodule_yx),
        "uid": str(edited.SOPInstanceUID),
        "reference": reference,
        "root": root,
    }


def _record(store, number: int) -> dict:
    return json.loads((store.root / ROUNDS / f"round-{number:03d}.json").read_text())


def _added(attrs, key_slice: int) -> dict:
    (new,) = [
        i
        for i in attrs.instances
        if i.get("prompt_source") == "marks" and i["prompt_origin"]["key_slice"] == key_slice
    ]
    return new


def _boxes(instance: dict, shape) -> np.ndarray:
    region = np.zeros(shape, dtype=bool)
    for z, (x0, y0, x1, y1) in zip(instance["slices"], instance["boxes_xyxy"], strict=True):
        region[z, y0 : y1 + 1, x0 : x1 + 1] = True
    return region


def test_round_two_keeps_the_accepted_instances_and_adds_the_missed_finding(rounds):
    accepted, accepted_attrs = rounds["accepted"]
    second, attrs = rounds["second"]
    added = [i for i in attrs.instances if i.get("prompt_source") == "marks"]
    assert len(added) == 2
    new = _added(attrs, rounds["new_z"])
    kept = attrs.instances[: len(accepted_attrs.instances)]
    assert [i for i in kept if i["label"] != RIGHT_LUNG] == [
        i for i in accepted_attrs.instances if i["label"] != RIGHT_LUNG
    ]
    assert new["label"] not in (LEFT_LUNG, RIGHT_LUNG)
    assert "within" not in new
    assert new["round"] == 2
    assert new["stage"].startswith("auto")  # a proposal, not yet seen by a person
    added_labels = [i["label"] for i in added]
    unchanged = ~np.isin(second, added_labels)
    assert np.array_equal(second[unchanged], accepted[unchanged])  # byte for byte but for the additions
    taken = np.isin(second, added_labels) & np.isin(accepted, [LEFT_LUNG, RIGHT_LUNG])
    assert not (taken & ~_boxes(_added(attrs, rounds["nodule"][0]), second.shape)).any()  # only the nodule
    assert (second == new["label"]).any()
    assert not (accepted == new["label"]).any()
    on_spine = (second == new["label"]) & (rounds["reference"] == SPINE)
    assert on_spine[rounds["new_z"]].any()
    origin = new["prompt_origin"]
    assert origin["key_slice"] == rounds["new_z"]
    assert origin["rule"] == "long+short axis"
    assert {m["type"] for m in origin["marks"]} == {"GSPS"}
    assert {m["sop_instance_uid"] for m in origin["marks"]} == {rounds["uid"]}
    assert attrs.review_status == "review"
    assert attrs.round == 2
    assert (new.get("quality") or {}).get("score") is not None


def test_a_small_finding_within_an_accepted_organ_is_added_inside_it(rounds):
    accepted, _ = rounds["accepted"]
    second, attrs = rounds["second"]
    z, y, x = rounds["nodule"]
    nodule = _added(attrs, z)
    assert nodule["within"] == {"label": RIGHT_LUNG, "instance": 1}
    assert nodule["label"] not in (LEFT_LUNG, RIGHT_LUNG)
    inside = (second == nodule["label"]) & _boxes(nodule, second.shape)
    assert inside[z, y, x]
    assert (accepted[inside] == RIGHT_LUNG).any()  # its voxels left the lung's mask
    assert not (accepted[inside] == LEFT_LUNG).any()
    assert inside.sum() < 0.1 * (accepted == RIGHT_LUNG).sum()
    (lung,) = [i for i in attrs.instances if i["label"] == RIGHT_LUNG]
    assert lung["voxels"] == int((second == RIGHT_LUNG).sum())  # the voxels the lung keeps


def test_the_mark_on_the_accepted_lung_is_that_instance_and_bad_marks_are_named(rounds):
    store, case_id = rounds["store"], rounds["case_id"]
    section = _record(store, 2)["marks"]
    assert section["added"] == 2
    assert section["covered"] == 1
    assert section["refused"] == 1
    assert section["cases_amended"] == 1
    assert not section["failed"]
    found = section["cases"][case_id]
    (covered,) = found["covered"]
    assert covered["label"] == LEFT_LUNG
    assert covered["instance"] == 1
    assert covered["key_slice"] == rounds["lung_z"]
    assert all(name.startswith("pr.dcm annotation 2 ") for name in covered["marks"])
    (refused,) = found["refused"]
    assert refused.startswith("pr.dcm annotation 3 ")
    assert "unknown graphic type 'SPLINE'" in refused
    _, attrs = rounds["second"]
    assert attrs.raw["mark_rounds"] == [found]
    assert len(attrs.raw["marks_used"]) == 7  # two axes per cross and the refused mark, each once
    assert rounds["uid"] not in json.dumps([section, attrs.raw["marks_used"]])  # in the lineage only


def test_the_case_goes_back_to_review_for_the_new_instance_only(rounds):
    store, case_id = rounds["store"], rounds["case_id"]
    _, attrs = rounds["second"]
    (entry,) = [e for e in rounds["queue"] if e["case_id"] == case_id]
    listed = {(i["label"], i["instance"]) for i in entry["instances"]}
    new = {(i["label"], i["instance"]) for i in attrs.instances if i.get("prompt_source") == "marks"}
    assert listed == new
    queue = json.loads((store.root / "_review" / "round-002" / "queue.json").read_text())
    assert [c["case_id"] for c in queue["cases"]] == [case_id]
    rows = {row["round"]: row for row in round_rows(store)}
    assert rows[2]["marks_added"] == 2
    assert rows[2]["annotated"] == 0
    assert _record(store, 2)["cases"]["kept_accepted"] == 1


def test_round_three_with_the_same_marks_adds_nothing(rounds):
    store = rounds["store"]
    second, second_attrs = rounds["second"]
    third, third_attrs = rounds["third"]
    assert np.array_equal(second, third)
    assert third_attrs.raw == second_attrs.raw  # not committed again
    section = _record(store, 3)["marks"]
    assert section["added"] == 0
    assert section["cases_with_new_marks"] == 0
    assert section["cases"] == {}
    record = _record(store, 3)
    assert record["cases"]["annotated"] == 0
    assert record["cases"]["kept_accepted"] == 1
    assert {row["round"]: row for row in round_rows(store)}[3]["marks_added"] == 0


def test_a_review_of_the_new_instance_keeps_the_accepted_records(rounds):
    store, case_id = rounds["store"], rounds["case_id"]
    third, attrs = store.read_labels(case_id)
    volume = read_volume(rounds["root"] / "series")
    (rounds["root"] / "review2").mkdir()
    correction = _nifti(third, volume, rounds["root"] / "review2" / f"{case_id}.nii.gz")
    imported = import_corrections(store, [correction], reviewer="dr b")
    assert list(imported.imported) == [case_id]
    _, after = store.read_labels(case_id)
    before = {(i["label"], i["instance"]): i for i in attrs.instances}
    for record in after.instances:
        if record.get("prompt_source") == "marks":
            assert record["reviewer"] == "dr b"
            assert record["edit_voxels"] == 0
        else:
            assert record == before[(record["label"], record["instance"])]  # dr a's review, untouched
    assert after.review_status == "accepted"


def test_covering_takes_the_instance_holding_most_of_the_seed():
    labels = np.zeros((2, 10, 10), dtype=np.uint16)
    labels[1, 0:6, 0:10] = 4
    instances = ({"label": 4, "instance": 1, "slices": [0]}, {"label": 4, "instance": 2, "slices": [1]})
    seed = np.zeros((10, 10), dtype=bool)
    seed[:, 5] = True  # a vertical line: 6 of its 10 pixels lie in label 4
    assert covering(labels, instances, 1, seed) == (4, 2)
    seed[:3, 5] = False  # 3 of its 7 pixels
    assert covering(labels, instances, 1, seed) is None
    assert covering(labels, instances, 0, seed) is None


def test_a_finding_is_within_an_instance_when_its_box_is_under_a_quarter_of_its_area():
    organ = np.zeros((40, 40), dtype=bool)
    organ[5:35, 5:35] = True  # 900 pixels
    assert within((18, 18, 24, 24), organ)  # a 7 x 7 nodule's box: 49 pixels
    assert within((10, 10, 23, 24), organ)  # 210 pixels: under a quarter
    assert not within((10, 10, 24, 24), organ)  # 225 pixels: a quarter
    assert not within((5, 5, 34, 34), organ)  # a cross measuring the organ spans it


def test_new_findings_take_a_named_label_or_a_free_value():
    prompts = [BoxPrompt(1, 1, 0, (0, 0, 1, 1), "marks"), BoxPrompt(2, 1, 0, (2, 2, 3, 3), "marks")]
    seeds = np.zeros((1, 4, 4), dtype=np.uint16)
    seeds[0, 0, 0], seeds[0, 3, 3] = 1, 2
    detection = Detection(prompts, seeds, {1: "Lesion", 2: "Mass"}, origins={(1, 1): {"a": 1}, (2, 1): {}})
    labels = np.zeros((1, 4, 4), dtype=np.uint16)
    labels[0, 1, 1] = 2
    specs = {2: {"name": "lesion"}}
    instances = ({"label": 2, "instance": 1},)
    fitted = fit_labels(detection, labels, instances, specs)
    assert [(p.label, p.instance) for p in fitted.prompts] == [(2, 2), (3, 1)]  # by name, else above all
    assert fitted.label_map[0, 0, 0] == 2
    assert fitted.label_map[0, 3, 3] == 3
    assert fitted.origins == {(2, 2): {"a": 1}, (3, 1): {}}
    assert fitted.label_names == {2: "Lesion", 3: "Mass"}


def test_round_run_refuses_marks_it_cannot_take(tmp_path, capsys, box_fill):
    series = tmp_path / "series"
    series.mkdir()
    args = ["--detector", "intensity", "--marks", str(tmp_path / "nowhere")]
    assert _round(series, tmp_path / "store", box_fill, *args) == 2
    assert "--marks: no such file or folder" in capsys.readouterr().err
    args = ["--detector", "intensity", "--marks", "pacs", "--marks", str(series)]
    assert _round(series, tmp_path / "store", box_fill, *args) == 2
    assert "--marks pacs takes the marks of each case's study: give it alone" in capsys.readouterr().err
