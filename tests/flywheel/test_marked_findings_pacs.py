"""`round run --marks pacs`: a reviewer's GSPS stored in a real Orthanc (authentication on) beside the
reviewed study's CT (the real chest CT's four slices); the next round takes the new finding from the PACS, a
round after it nothing, and no UID reaches the output."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pydicom
import pytest
from conftest import complete_dicom_headers, write_ct_series
from marks_making import image_xy, images_by_slice, write_gsps
from orthanc import MISSING, ORTHANC, PASSWORD, PLUGIN, USER, running_orthanc

from medsam_engine.detectors.evaluation import recist_axes
from medsam_engine.pipeline.cli.main import main
from medsam_engine.pipeline.core.geometry import align_to
from medsam_engine.pipeline.flywheel.review import import_corrections
from medsam_engine.pipeline.io.dicomweb import stow
from medsam_engine.pipeline.io.readers import read_volume
from medsam_engine.pipeline.store.case_store import CaseStore

pytestmark = pytest.mark.skipif(ORTHANC is None or PLUGIN is None, reason=MISSING)

UID = "1.2.826.0.1.3680043.8.498.78"
SERIES, STUDY, FRAME = f"{UID}01", f"{UID}01.0", f"{UID}09"
SPINE, RIGHT_LUNG, LEFT_LUNG = 3, 5, 6


@pytest.fixture(autouse=True)
def credentials(monkeypatch):
    monkeypatch.setenv("MEDSAM_ENGINE_DICOMWEB_USER", USER)
    monkeypatch.setenv("MEDSAM_ENGINE_DICOMWEB_PASSWORD", PASSWORD)
    monkeypatch.setenv("MEDSAM_ENGINE_DICOMWEB_BACKOFF_S", "0.05")


def _cross(images, volume, reference, label) -> dict:
    mask = reference == label
    z = int(np.argmax(mask.sum(axis=(1, 2))))
    long, short = recist_axes(mask[z], volume.spacing[1:])
    objects = [("POLYLINE", image_xy(images[z], volume, z, line), None) for line in (long, short)]
    return {"image": images[z], "layer": "RECIST", "objects": objects}


def test_a_round_takes_the_new_finding_marked_in_the_pacs(tmp_path, small_chest, box_fill, capsys):
    volume = read_volume(small_chest[0])
    series = tmp_path / "series"
    write_ct_series(volume, series, series_uid=SERIES)
    complete_dicom_headers(series, frame_of_reference_uid=FRAME)
    volume = read_volume(series)
    reference = align_to(read_volume(small_chest[1]), volume, what="reference").astype(np.uint16)
    lungs = np.where(np.isin(reference, (RIGHT_LUNG, LEFT_LUNG)), reference, 0)
    images = images_by_slice(series, volume)
    marks = write_gsps(
        tmp_path / "pr.dcm",
        list(images.values()),
        [_cross(images, volume, reference, SPINE), _cross(images, volume, reference, LEFT_LUNG)],
    )
    store_root = tmp_path / "store"
    (tmp_path / "orthanc").mkdir()
    with running_orthanc(tmp_path / "orthanc") as url:
        root = f"{url}/dicom-web"
        stow(root, sorted(series.iterdir()))
        study = f"{root}/studies/{STUDY}"
        base = ["round", "run", study, "--store", str(store_root), "--detector", "intensity"]
        base += ["--config", str(box_fill)]
        assert main(base) == 0  # round 1: no marks yet
        store = CaseStore(store_root)
        (case_id,) = store.committed_cases()
        ijk = np.moveaxis(lungs, (0, 1, 2), (2, 1, 0)).astype(np.int16)
        correction = tmp_path / f"{case_id}.nii.gz"
        nib.save(nib.Nifti1Image(ijk, volume.geometry.affine[:, [2, 1, 0, 3]]), str(correction))
        assert list(import_corrections(store, [correction], reviewer="dr a").imported) == [case_id]
        accepted, _ = store.read_labels(case_id)

        stow(root, [marks])  # the reviewer marks a missed finding and the accepted left lung
        assert main([*base, "--marks", "pacs", "-v"]) == 0  # round 2
        second, attrs = store.read_labels(case_id)
        assert main([*base, "--marks", "pacs", "-v"]) == 0  # round 3
        third, _ = store.read_labels(case_id)

    (new,) = [i for i in attrs.instances if i.get("prompt_source") == "marks"]
    assert np.array_equal(np.where(second == new["label"], 0, second), accepted)
    assert new["prompt_origin"]["marks"][0]["sop_instance_uid"] == str(pydicom.dcmread(marks).SOPInstanceUID)
    (found,) = attrs.raw["mark_rounds"]
    assert len(found["added"]) == 1
    assert found["covered"][0]["label"] == LEFT_LUNG
    assert attrs.review_status == "review"
    assert np.array_equal(second, third)
    out = capsys.readouterr()
    text = out.out + out.err
    assert "marks: 1 instance(s) added to 1 reviewed case(s), 1 finding(s) already there" in text
    assert "marks: 0 instance(s) added to 0 reviewed case(s)" in text
    for secret in (STUDY, SERIES, str(pydicom.dcmread(marks).SOPInstanceUID)):
        assert secret not in text
