"""A SEG for any series the engine reads: the geometry written is the one the engine used (frame positions,
true spacing), not a header that contradicts it; a SEG that cannot be written fails its case only."""

from __future__ import annotations

import numpy as np
import pydicom
import pytest
from conftest import commit_from_source, complete_dicom_headers, write_ct_series

from medsam_engine.pipeline.export import dicom_seg
from medsam_engine.pipeline.export.formats import export_store
from medsam_engine.pipeline.io.readers import read_volume
from medsam_engine.pipeline.store.case_store import CaseStore


@pytest.fixture(scope="module")
def contradicting(tmp_path_factory, chest_volume, small_chest):
    """A store with two committed DICOM cases: a series whose SpacingBetweenSlices (as some scanners write
    it) disagrees with its slice positions, and one whose header agrees."""
    root = tmp_path_factory.mktemp("seg-spacing")
    true_spacing = float(chest_volume.geometry.spacing[0])
    folders = {}
    for name, header_spacing, uid in (
        ("contradicting", 2.5 * true_spacing, "1.2.826.0.1.3680043.8.498.91"),
        ("agreeing", true_spacing, "1.2.826.0.1.3680043.8.498.92"),
    ):
        folder = root / name
        write_ct_series(chest_volume, folder, series_uid=uid, spacing_between_slices=header_spacing)
        folders[name] = complete_dicom_headers(folder, frame_of_reference_uid=uid + ".1")
    store = CaseStore(root / "store")
    labels = read_volume(small_chest[1]).array.astype(np.uint16)
    ids = {name: commit_from_source(store, folder, labels) for name, folder in folders.items()}
    return store, ids, labels, true_spacing, root


def test_the_seg_describes_the_spacing_of_the_positions_not_the_header(contradicting):
    import highdicom as hd

    store, ids, labels, true_spacing, root = contradicting
    report = export_store(store, "dicom-seg", root / "out")
    assert report.skipped == {}
    assert len(report.written) == 2
    seg = hd.seg.segread(str(root / "out" / f"{ids['contradicting']}.seg.dcm"))
    measures = seg.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0]
    assert float(measures.SpacingBetweenSlices) == pytest.approx(true_spacing, abs=1e-3)
    volume = seg.get_volume(combine_segments=True, relabel=False)  # raised on the header's spacing
    assert volume.array.shape[0] == labels.shape[0]
    assert int(np.count_nonzero(volume.array)) == int(np.count_nonzero(labels))


def test_a_seg_that_cannot_be_written_fails_its_case_and_the_export_goes_on(contradicting, monkeypatch):
    store, ids, _labels, _spacing, root = contradicting
    real = dicom_seg._frames_on_grid

    def broken_for_one(files, geometry):
        datasets = real(files, geometry)
        if str(datasets[0].SeriesInstanceUID).endswith(".91"):
            for ds in datasets:
                ds.PixelSpacing = [0.0, 0.0]  # a header highdicom refuses
        return datasets

    monkeypatch.setattr(dicom_seg, "_frames_on_grid", broken_for_one)
    report = export_store(store, "dicom-seg", root / "out-broken")
    assert list(report.skipped) == [ids["contradicting"]]
    assert "DICOM SEG" in report.skipped[ids["contradicting"]]
    assert len(report.written) == 1
    assert pydicom.dcmread(report.written[0]).Modality == "SEG"
