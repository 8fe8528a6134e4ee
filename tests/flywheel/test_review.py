"""The review round-trip on real chest CT slices: queue out (NIfTI, OME-Zarr, HTML), corrections in."""

from __future__ import annotations

import json
import shutil

import nibabel as nib
import numpy as np
import pytest
import zarr
from flywheel_data import case_of, lung_inputs

from medsam_engine.pipeline.annotate.config import EngineConfig
from medsam_engine.pipeline.annotate.lazy_runner import LazyRunner
from medsam_engine.pipeline.cli.main import main
from medsam_engine.pipeline.core.metrics import dice
from medsam_engine.pipeline.flywheel.rounds import run_round
from medsam_engine.pipeline.io.discover import discover
from medsam_engine.pipeline.store.case_store import CaseStore

# the queue's files and the import of corrections are the subject, not the proposals' quality: the box-fill
# runner stands in for the network; its thresholds send every instance to review
TO_REVIEW = EngineConfig.model_validate(
    {"model": {"runner": "box-fill"}, "quality": {"accept_above": 1.0, "reject_below": 0.0}}
)


@pytest.fixture(scope="module")
def routed(tmp_path_factory, small_chest, small_chest_nifti):
    """Both lung cases annotated by a round whose thresholds send every instance to review."""
    root = tmp_path_factory.mktemp("review")
    images, masks, reference = lung_inputs(root, small_chest, small_chest_nifti)
    store = CaseStore(root / "store")
    run_round(
        discover([images], store.case_ids(), coarse_masks=[masks]),
        store,
        TO_REVIEW,
        queue_dir=root / "queue0",
        runner=LazyRunner(TO_REVIEW),
    )
    return root, reference


def copy_store(routed, tmp_path) -> CaseStore:
    shutil.copytree(routed[0] / "store", tmp_path / "store")
    return CaseStore(tmp_path / "store")


def test_export_writes_the_queue_worst_first_in_viewer_formats(routed, tmp_path, capsys):
    root, _ = routed
    out = tmp_path / "queue"
    assert main(["review", "export", str(root / "store"), "--out", str(out)]) == 0
    queue = json.loads((out / "queue.json").read_text())
    scores = [c["worst_score"] for c in queue["cases"]]
    assert len(scores) == 2
    assert scores == sorted(scores)
    store = CaseStore(root / "store")
    for entry in queue["cases"]:
        case_id = entry["case_id"]
        labels = nib.load(str(out / entry["files"]["labels"]))
        image = nib.load(str(out / entry["files"]["images"][0]))
        assert labels.shape == image.shape == (128, 128, 4)
        assert np.allclose(labels.affine, image.affine)
        assert set(np.unique(np.asanyarray(labels.dataobj))) <= {0, 5, 6}
        group = zarr.open_group(str(out / entry["files"]["zarr"]), mode="r")
        assert np.array_equal(group["labels/medsam/0"][:], store.read_labels(case_id)[0])
        assert "not a DICOM series" in queue["skipped"][case_id]  # SEG needs a DICOM source
        routes = {i["route"] for i in entry["instances"]}
        assert routes <= {"review", "rejected"}
        assert all(i["features"] for i in entry["instances"])
    page = (out / "report.html").read_text()
    first, second = (page.index(c["case_id"]) for c in queue["cases"])
    assert first < second
    assert page.count("<img") >= 2
    assert "stability" in page


def test_a_bad_correction_imports_nothing(routed, tmp_path, small_chest, capsys):
    store = copy_store(routed, tmp_path)
    before = {c: store.case_attrs(c)["committed_at"] for c in store.committed_cases()}
    wrong_grid = tmp_path / "bad" / f"{case_of(store, 'chest_b')}.nii.gz"
    wrong_grid.parent.mkdir()
    nib.save(nib.Nifti1Image(np.ones((64, 64, 4), np.uint8), np.diag([2.0, 2, 5, 1])), str(wrong_grid))
    good = routed[1] / "chest_a.nrrd"
    code = main(["review", "import", str(store.root), str(good), str(wrong_grid), "--reviewer", "alice"])
    assert code == 1
    assert "not on the image's grid" in capsys.readouterr().out
    assert {c: store.case_attrs(c)["committed_at"] for c in store.committed_cases()} == before
    assert all(store.case_attrs(c)["review_status"] == "review" for c in before)


def test_import_records_the_edit_and_accepts_the_case(routed, tmp_path, capsys):
    from medsam_engine.pipeline.io.readers import read_volume

    store = copy_store(routed, tmp_path)
    case_a = case_of(store, "chest_a")
    proposal, _ = store.read_labels(case_a)
    correction = routed[1] / "chest_a.nrrd"
    assert main(["review", "import", str(store.root), str(correction), "--reviewer", "alice"]) == 0
    corrected, attrs = store.read_labels(case_a)
    reference = read_volume(routed[1] / "chest_a.nrrd").array
    assert np.array_equal(corrected, reference)
    assert attrs.review_status == "accepted"
    assert attrs.raw["review"]["reviewer"] == "alice"
    assert attrs.raw["review"]["edit_voxels"] == int((proposal != reference).sum())
    counts = {label: sum(i["label"] == label for i in attrs.instances) for label in (5, 6)}
    assert counts[5] == 1
    assert counts[6] > 1  # the left lung's reference has stray fragments: more instances
    for inst in attrs.instances:
        label = inst["label"]
        whole = dice(proposal == label, reference == label)
        changed = int(((proposal == label) != (reference == label)).sum())
        assert inst["reviewer"] == "alice"
        assert inst["stage"] == "reviewed"
        assert attrs.raw["review"]["edit_dice_per_label"][str(label)] == pytest.approx(whole, abs=1e-5)
        if counts[label] == 1:  # the only instance of its label: compared on the whole map
            assert inst["edit_dice"] == pytest.approx(whole, abs=1e-5)
            assert inst["edit_voxels"] == changed
        else:  # one of several: compared around its own boxes
            assert 0.0 <= inst["edit_dice"] <= 1.0
            assert inst["edit_voxels"] <= changed
        assert inst["quality"]["features"]["predicted_iou"] is not None  # kept for calibration
    (previous,) = attrs.raw["previous_versions"]
    assert (store.root / previous["path"]).is_dir()  # the proposal is kept
    out = tmp_path / "nnunet"
    assert main(["export", str(store.root), "--format", "nnunet", "--out", str(out)]) == 0
    dataset = json.loads((out / "dataset.json").read_text())
    assert dataset["medsam_cases"] == [case_a]  # the unreviewed case stays out


def test_an_edited_ome_zarr_from_napari_imports_too(routed, tmp_path):
    from medsam_engine.pipeline.flywheel.review import export_queue, import_corrections

    store = copy_store(routed, tmp_path)
    case_b = case_of(store, "chest_b")
    export_queue(store, tmp_path / "queue", formats=("zarr",))
    edited = tmp_path / "queue" / "zarr" / f"{case_b}.ome.zarr"
    labels = zarr.open_array(str(edited / "labels" / "medsam" / "0"), mode="r+")
    erased = int((labels[0] == 6).sum())
    plane = labels[0]
    plane[plane == 6] = 0
    labels[0] = plane
    report = import_corrections(store, [edited], reviewer="bob")
    assert report.imported[case_b]["edit_voxels"] == erased > 0
    attrs = store.attributes(case_b)
    left = max((i for i in attrs.instances if i["label"] == 6), key=lambda i: i["voxels"])
    assert 0 < left["edit_voxels"] <= erased
    assert left["edit_dice"] < 1.0
    assert attrs.raw["review"]["reviewer"] == "bob"
    assert attrs.review_status == "accepted"


def test_queue_of_a_dicom_series_carries_a_dicom_seg(routed, chest_series, tmp_path):
    from medsam_engine.pipeline.flywheel.review import export_queue

    store = CaseStore(tmp_path / "store")
    cases = discover(
        [chest_series["axial"]], store.case_ids(), coarse_masks=[routed[0] / "masks" / "chest_b.nii.gz"]
    )
    run_round(cases, store, TO_REVIEW, queue_dir=tmp_path / "queue0", runner=LazyRunner(TO_REVIEW))
    result = export_queue(store, tmp_path / "queue", formats=("dicom-seg",))
    (entry,) = result.cases
    assert not result.skipped
    assert (tmp_path / "queue" / entry["files"]["seg"]).stat().st_size > 0
