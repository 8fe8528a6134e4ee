"""DICOM SEG export: it references the source series and lands on the same voxels (axial and oblique series),
read back with highdicom and with dcmqi's segimage2itkimage (how 3D Slicer reads SEG)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest
from conftest import commit_from_source

from medsam_engine.pipeline.core.geometry import align_to
from medsam_engine.pipeline.export.dicom_seg import algorithm_type
from medsam_engine.pipeline.export.formats import export_store
from medsam_engine.pipeline.io.readers import read_volume
from medsam_engine.pipeline.store.case_store import CaseStore


@pytest.fixture(scope="module")
def exported(tmp_path_factory, chest_series, small_chest, small_chest_nifti, chest_label_names):
    """Three committed cases (axial series, oblique series with an empty first slice, a NIfTI volume) and
    the SEG export of the store."""
    root = tmp_path_factory.mktemp("seg")
    store = CaseStore(root / "store")
    labels = read_volume(small_chest[1]).array.astype(np.uint16)
    oblique = labels.copy()
    oblique[0] = 0  # an empty slice: its frame is left out of the SEG and must still read back as empty
    reviewed = [
        {
            "label": v,
            "instance": 1,
            "prompt_source": "coarse-mask",
            "reviewer": "reviewer-1" if v == 5 else None,
            "stage": "manual" if v == 7 else "auto",
        }
        for v in chest_label_names
    ]
    ids = {
        "axial": commit_from_source(store, chest_series["axial"], labels, names=chest_label_names),
        "oblique": commit_from_source(
            store, chest_series["oblique"], oblique, names=chest_label_names, instances=reviewed
        ),
        "nifti": commit_from_source(store, small_chest_nifti[0], read_volume(small_chest_nifti[1]).array),
    }
    report = export_store(store, "dicom-seg", root / "out")
    return store, ids, report, root / "out", {"axial": labels, "oblique": oblique}


def _value_of_segment(seg) -> dict[int, int]:
    return {n: int(seg.get_segment_description(n).tracking_id.split()[-1]) for n in seg.get_segment_numbers()}


@pytest.mark.parametrize("series", ["axial", "oblique"])
def test_seg_references_the_series_and_each_frame_lands_on_its_source_slice(exported, chest_series, series):
    import highdicom as hd

    _store, ids, _report, out, expected = exported
    seg = hd.seg.segread(str(out / f"{ids[series]}.seg.dcm"))
    files = sorted(chest_series[series].iterdir())
    sources = [pydicom.dcmread(str(f), stop_before_pixels=True) for f in files]
    assert seg.SegmentationType == "BINARY"
    assert seg.FrameOfReferenceUID == sources[0].FrameOfReferenceUID
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == sources[0].SeriesInstanceUID
    # independent of the exporter: a file's slice is where its position sits along the volume's z axis
    volume = read_volume(chest_series[series])
    lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ volume.geometry.affine
    values = _value_of_segment(seg)
    for ds in sources:
        z = np.linalg.solve(lps[:3, :3], np.asarray(ds.ImagePositionPatient, float) - lps[:3, 3])
        assert np.allclose(z[1:], 0, atol=1e-3)
        assert np.isclose(z[0], round(z[0]), atol=1e-3)
        (frame,) = seg.get_pixels_by_source_instance(
            [ds.SOPInstanceUID], combine_segments=True, relabel=False
        )
        as_values = np.vectorize(lambda n: values.get(int(n), 0))(frame)
        assert np.array_equal(as_values, expected[series][round(z[0])])


def test_segments_carry_names_codes_colours_and_algorithm_types(exported):
    import highdicom as hd

    _store, ids, _report, out, _ = exported
    seg = hd.seg.segread(str(out / f"{ids['oblique']}.seg.dcm"))
    by_value = {v: seg.get_segment_description(n) for n, v in _value_of_segment(seg).items()}
    assert set(by_value) == {1, 3, 5, 6, 7}  # the labels present in these four slices
    lung = by_value[5]
    assert lung.segment_label == "right lung"
    assert lung.segmented_property_type.value == "3341006"  # SNOMED CT "Right lung"
    assert lung.segmented_property_type.scheme_designator == "SCT"
    assert lung.segmented_property_category.meaning == "Anatomical Structure"
    assert lung.algorithm_type == hd.seg.SegmentAlgorithmTypeValues.SEMIAUTOMATIC  # a reviewer touched it
    assert by_value[7].algorithm_type == hd.seg.SegmentAlgorithmTypeValues.MANUAL
    assert by_value[3].algorithm_type == hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC
    assert by_value[3].algorithm_identification[0].AlgorithmName == "LiteMedSAM"
    assert by_value[3].segmented_property_type.meaning == "Thoracic spine"
    assert "RecommendedDisplayCIELabValue" in by_value[3]


def test_a_case_without_a_dicom_source_is_skipped_with_the_reason(exported):
    _, ids, report, out, _ = exported
    assert set(report.skipped) == {ids["nifti"]}
    assert "not a DICOM series" in report.skipped[ids["nifti"]]
    assert not (out / f"{ids['nifti']}.seg.dcm").exists()
    expected = sorted(f"{ids[s]}.seg.dcm" for s in ("axial", "oblique"))
    assert sorted(Path(p).name for p in report.written) == expected


def _segimage2itkimage() -> str | None:
    here = Path(sys.executable).parent / "segimage2itkimage"
    return str(here) if here.exists() else shutil.which("segimage2itkimage")


@pytest.mark.skipif(_segimage2itkimage() is None, reason="dcmqi (pip install dcmqi) is not installed")
@pytest.mark.parametrize("series", ["axial", "oblique"])
def test_dcmqi_reads_each_segment_onto_the_store_voxels(exported, tmp_path, series):
    store, ids, _, out, expected = exported
    subprocess.run(
        [
            _segimage2itkimage(),
            "--inputDICOM",
            str(out / f"{ids[series]}.seg.dcm"),
            "--outputDirectory",
            str(tmp_path),
            "-t",
            "nifti",
        ],
        check=True,
        capture_output=True,
    )
    labels, attrs = store.read_labels(ids[series])
    case = attrs.volume(labels)
    meta = json.loads((tmp_path / "meta.json").read_text())
    for index, (segment,) in enumerate(meta["segmentAttributes"], start=1):
        value = int(segment["TrackingIdentifier"].split()[-1])
        on_case_grid = align_to(read_volume(tmp_path / f"{index}.nii.gz"), case, what="dcmqi output")
        assert np.array_equal(on_case_grid > 0, expected[series] == value), (series, value)


def test_algorithm_type_from_lineage():
    auto = {"prompt_source": "coarse-mask", "reviewer": None, "stage": "auto"}
    assert algorithm_type([auto]) == "AUTOMATIC"
    assert algorithm_type([auto, dict(auto, reviewer="r")]) == "SEMIAUTOMATIC"
    assert algorithm_type([dict(auto, prompt_source="user-box")]) == "SEMIAUTOMATIC"
    assert algorithm_type([dict(auto, stage="manual")]) == "MANUAL"


def test_other_images_in_the_folder_are_left_out_and_a_changed_source_is_refused(
    tmp_path, chest_series, small_chest
):
    from pydicom.uid import SecondaryCaptureImageStorage

    folder = shutil.copytree(chest_series["axial"], tmp_path / "study")
    derived = pydicom.dcmread(str(sorted(folder.iterdir())[0]))  # a derived image on one of the same slices
    derived.SeriesInstanceUID = "1.2.826.0.1.3680043.8.498.99"
    derived.SOPInstanceUID = "1.2.826.0.1.3680043.8.498.991"
    derived.SOPClassUID = derived.file_meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    derived.file_meta.MediaStorageSOPInstanceUID = derived.SOPInstanceUID
    derived.ImageType = ["DERIVED", "SECONDARY"]
    derived.save_as(str(folder / "SC0001"), enforce_file_format=True)
    store = CaseStore(tmp_path / "store")
    case_id = commit_from_source(store, folder, read_volume(small_chest[1]).array)
    first = export_store(store, "dicom-seg", tmp_path / "out")
    assert first.skipped == {}
    assert len(first.written) == 1

    (folder / "SC0001").unlink()  # the source changed after annotation: the SEG would reference other data
    second = export_store(store, "dicom-seg", tmp_path / "out2")
    assert "changed since it was annotated" in second.skipped[case_id]
