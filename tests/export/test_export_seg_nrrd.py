"""`export --format seg-nrrd`: every case as a 3D Slicer segmentation on its input's grid, named and coloured
segments with their SNOMED CT terminology, read back by slicerio as Slicer reads it."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import commit_from_source

from medsam_engine.pipeline.cli.main import main
from medsam_engine.pipeline.io.readers import read_volume
from medsam_engine.pipeline.store.case_store import CaseStore


@pytest.fixture(scope="module")
def exported(tmp_path_factory, small_chest, small_chest_nifti, chest_label_names):
    root = tmp_path_factory.mktemp("seg-nrrd")
    store = CaseStore(root / "store")
    labels = read_volume(small_chest[1]).array.astype(np.uint16)
    ids = [
        commit_from_source(store, small_chest[0], labels, names=chest_label_names),
        commit_from_source(store, small_chest_nifti[0], read_volume(small_chest_nifti[1]).array),
    ]
    assert (
        main(["export", "--store", str(store.root), "--format", "seg-nrrd", "--out", str(root / "out")]) == 0
    )
    return store, ids, root / "out", labels


def test_every_case_is_a_segmentation_on_its_input_grid(exported):
    store, ids, out, _ = exported
    for case_id in ids:
        written = read_volume(out / f"{case_id}.seg.nrrd")
        labels, attrs = store.read_labels(case_id)
        assert np.array_equal(written.array, labels)
        assert np.allclose(written.geometry.affine, attrs.geometry.affine, atol=1e-4)


def test_segments_carry_names_colours_and_terminology(exported, chest_label_names):
    import slicerio

    _, ids, out, labels = exported
    segmentation = slicerio.read_segmentation(str(out / f"{ids[0]}.seg.nrrd"))
    by_name = {s["name"]: s for s in segmentation["segments"]}
    present = {int(v) for v in np.unique(labels) if v}
    assert set(by_name) == {chest_label_names[v] for v in present}
    lung = by_name["right lung"]["terminology"]
    assert lung["type"] == ["SCT", "3341006", "Right lung"]
    assert lung["category"][0] == "SCT"
    assert all(0 <= c <= 1 for c in by_name["right lung"]["color"])


def test_the_export_names_its_cases_in_cases_csv(exported):
    _, ids, out, _ = exported
    rows = (out / "cases.csv").read_text().splitlines()
    assert len(rows) == 1 + len(ids)
    assert all(any(row.startswith(case_id) for row in rows) for case_id in ids)


def test_a_2d_case_s_exports_read_back_onto_the_case(nuclei_2d, box_fill, tmp_path):
    """A PNG case's NIfTI and seg.nrrd exports (as a reviewer gets them) land on the case pixel for pixel when
    read back, as review import reads a correction: through their geometry, not flipped."""
    from medsam_engine.pipeline.core.geometry import align_to

    store = tmp_path / "store"
    argv = ["annotate", str(nuclei_2d[0]), "--coarse-mask", str(nuclei_2d[1]), "--store", str(store)]
    assert main([*argv, "--config", str(box_fill)]) == 0
    s = CaseStore(store)
    (case_id,) = s.committed_cases()
    labels, attrs = s.read_labels(case_id)
    for fmt, suffix in (("nifti", ".nii.gz"), ("seg-nrrd", ".seg.nrrd")):
        assert main(["export", str(store), "--format", fmt, "--out", str(tmp_path / fmt)]) == 0
        back = align_to(read_volume(tmp_path / fmt / f"{case_id}{suffix}"), attrs.volume(labels))
        assert np.array_equal(back, labels), fmt
