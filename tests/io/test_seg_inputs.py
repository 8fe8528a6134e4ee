"""DICOM SEG as input, made from the source series with highdicom as another tool would write it: a folder of
SEGs as `--coarse-mask` (each matched to the series it references, names carried), and a reviewer's SEG
correction imported by `review import` (matched by series, whatever its file name)."""

from __future__ import annotations

import numpy as np
import pytest
from seg_making import reviewer_seg

from medsam_engine.pipeline.cli.main import main
from medsam_engine.pipeline.core.geometry import align_to
from medsam_engine.pipeline.io.readers import read_volume
from medsam_engine.pipeline.store.case_store import CaseStore


@pytest.fixture(scope="module")
def lungs(chest_series, small_chest):
    volume = read_volume(chest_series["axial"])
    labels = align_to(read_volume(small_chest[1]), volume)
    return np.where(np.isin(labels, (5, 6)), labels, 0).astype(np.uint16)


def test_seg_coarse_masks_are_matched_by_series_and_corrections_imported(tmp_path, chest_series, lungs):
    masks = tmp_path / "masks"
    masks.mkdir()
    reviewer_seg(
        chest_series["axial"], lungs, {5: "Right lung", 6: "Left lung"}, masks / "AB12CD.dcm"
    )  # any name
    store_path = tmp_path / "store"
    assert (
        main(["annotate", str(chest_series["axial"]), "--coarse-mask", str(masks), "--out", str(store_path)])
        == 0
    )
    store = CaseStore(store_path)
    (case_id,) = store.committed_cases()
    assert store.manifest(case_id)["coarse_mask"].endswith("AB12CD.dcm")
    names = {p["label-value"]: p["name"] for p in store.label_properties(case_id)}
    assert names == {1: "Right lung", 2: "Left lung"}  # segment numbers as values, segment labels as names
    volume = read_volume(chest_series["axial"])
    read_back = align_to(read_volume(masks / "AB12CD.dcm"), volume)  # the SEG lands on the series' voxels
    assert np.array_equal(read_back, np.where(lungs == 5, 1, np.where(lungs == 6, 2, 0)))
    labels, _ = store.read_labels(case_id)
    from medsam_engine.pipeline.core.metrics import dice

    assert dice(labels == 1, lungs == 5) > 0.7
    assert dice(labels == 2, lungs == 6) > 0.7  # prompts from the SEG

    corrected = np.where(lungs == 5, 1, np.where(lungs == 6, 2, 0)).astype(np.uint16)
    corrected[:, :, :20] = 0  # the reviewer erased a strip
    corrections = tmp_path / "corrections"
    corrections.mkdir()
    reviewer_seg(
        chest_series["axial"], corrected, {1: "Right lung", 2: "Left lung"}, corrections / "1.2.3.dcm"
    )
    assert main(["review", "import", str(store_path), str(corrections), "--reviewer", "dr-seg"]) == 0
    after, attrs = store.read_labels(case_id)
    assert attrs.review_status == "accepted"
    assert np.array_equal(after, corrected)


def test_review_export_writes_named_slicer_segmentations_and_layered_ones_import(tmp_path, small_chest):
    import slicerio
    from flywheel_data import commit_lungs_case

    store = commit_lungs_case(tmp_path / "store", small_chest, review_status="review")
    labels, attrs = store.read_labels("c0ffee")
    assert main(["review", "export", str(store.root), "--out", str(tmp_path / "queue")]) == 0
    written = tmp_path / "queue" / "slicer" / "c0ffee.seg.nrrd"
    segmentation = slicerio.read_segmentation(str(written))
    assert {s["name"] for s in segmentation["segments"]} == {"right lung", "left lung"}
    assert np.array_equal(
        align_to(read_volume(written), attrs.volume(labels)), labels
    )  # values and grid kept

    # a reviewer's file where the two lungs overlap (Slicer keeps them in two layers), named as the case
    layered = slicerio.create_segmentation(segmentation["voxels"].shape[-3:], segmentation["ijkToLPS"])
    right = (
        np.asarray(segmentation["voxels"])
        == next(s for s in segmentation["segments"] if s["name"] == "right lung")["labelValue"]
    )
    slicerio.add_segment(layered, right, {"id": "label_5", "name": "right lung"})
    slicerio.add_segment(
        layered, right, {"id": "label_6", "name": "left lung"}
    )  # the same voxels: a 2nd layer
    slicerio.write_segmentation(str(tmp_path / "c0ffee.seg.nrrd"), layered)
    assert np.asarray(slicerio.read_segmentation(str(tmp_path / "c0ffee.seg.nrrd"))["voxels"]).ndim == 4
    assert (
        main(["review", "import", str(store.root), str(tmp_path / "c0ffee.seg.nrrd"), "--reviewer", "dr-s"])
        == 0
    )
    after, _ = store.read_labels("c0ffee")
    assert set(np.unique(after)) == {0, 6}
    assert np.array_equal(after > 0, labels == 5)  # later segment wins
