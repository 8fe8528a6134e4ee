"""nnU-Net v2 raw dataset: accepted (or unreviewed) cases, consecutive labels, images on the input grid."""

from __future__ import annotations

import json

import nibabel as nib
import nrrd
import numpy as np
import pytest
from conftest import commit_from_source

from medsam_engine.pipeline.export.formats import export_store
from medsam_engine.pipeline.io.readers import read_volume
from medsam_engine.pipeline.store.case_store import CaseStore


@pytest.fixture(scope="module")
def dataset(tmp_path_factory, chest_series, small_chest, small_chest_nifti, nuclei_2d, chest_label_names):
    root = tmp_path_factory.mktemp("nnunet")
    store = CaseStore(root / "store")
    chest = read_volume(small_chest[1]).array
    only_spine_and_lungs = np.where(np.isin(chest, [3, 5, 6]), chest, 0)
    ids = {
        "dicom": commit_from_source(
            store, chest_series["axial"], only_spine_and_lungs, names=chest_label_names
        ),
        "nrrd": commit_from_source(
            store, small_chest[0], only_spine_and_lungs, names=chest_label_names, keep_image=False
        ),  # the image then comes from the source file
        "accepted": commit_from_source(
            store,
            small_chest_nifti[0],
            read_volume(small_chest_nifti[1]).array,
            names=chest_label_names,
            review_status="accepted",
        ),
        "rejected": commit_from_source(store, chest_series["oblique"], chest, review_status="rejected"),
        "2d": commit_from_source(store, nuclei_2d[0], read_volume(nuclei_2d[1]).array),
    }
    out = root / "Dataset501_Chest"
    return store, ids, export_store(store, "nnunet", out), out


def test_dataset_json_lists_accepted_cases_with_consecutive_labels(dataset):
    _store, ids, report, out = dataset
    meta = json.loads((out / "dataset.json").read_text())
    assert meta["channel_names"] == {"0": "CT"}
    assert meta["file_ending"] == ".nii.gz"
    assert meta["numTraining"] == 3
    assert sorted(meta["medsam_cases"]) == sorted(ids[k] for k in ("dicom", "nrrd", "accepted"))
    assert list(meta["labels"].values()) == list(range(len(meta["labels"])))
    assert meta["labels"]["background"] == 0
    assert meta["medsam_label_values"]["right lung"] == 5
    expected = sorted(f"{c}.nii.gz" for c in meta["medsam_cases"])
    assert sorted(p.name for p in (out / "labelsTr").iterdir()) == expected
    assert report.excluded == {ids["rejected"]: "review status is 'rejected', not 'accepted'"}
    assert set(report.skipped) == {ids["2d"]}
    assert "modality" in report.skipped[ids["2d"]]


def test_labels_and_images_sit_on_the_input_grid(dataset, small_chest):
    _store, ids, _, out = dataset
    meta = json.loads((out / "dataset.json").read_text())
    to_store = {meta["labels"][name]: value for name, value in meta["medsam_label_values"].items()}
    raw, _header = nrrd.read(str(small_chest[0]))
    image = nib.load(str(out / "imagesTr" / f"{ids['nrrd']}_0000.nii.gz"))
    assert np.array_equal(np.asanyarray(image.dataobj), raw)  # read from the source, on its own voxel grid
    label_file = nib.load(str(out / "labelsTr" / f"{ids['nrrd']}.nii.gz"))
    assert np.allclose(label_file.affine, image.affine)
    labels = np.vectorize(lambda v: to_store.get(int(v), 0))(np.asanyarray(label_file.dataobj))
    mask = nrrd.read(str(small_chest[1]))[0]
    assert np.array_equal(labels, np.where(np.isin(mask, [3, 5, 6]), mask, 0))


def _two_case_store(root, small_chest, small_chest_nifti, chest_label_names, *, cases: int) -> CaseStore:
    store = CaseStore(root)
    for source in (small_chest[0], small_chest_nifti[0])[:cases]:
        labels = (
            read_volume(small_chest[1]).array
            if source == small_chest[0]
            else read_volume(small_chest_nifti[1]).array
        )
        commit_from_source(store, source, labels, names=chest_label_names)
    return store


def test_an_export_over_an_older_one_holds_exactly_its_own_cases(
    tmp_path, small_chest, small_chest_nifti, chest_label_names
):
    from medsam_engine.pipeline.cli.main import main

    two = _two_case_store(tmp_path / "two", small_chest, small_chest_nifti, chest_label_names, cases=2)
    one = _two_case_store(tmp_path / "one", small_chest, small_chest_nifti, chest_label_names, cases=1)
    raw = tmp_path / "nnUNet_raw"
    assert (
        main(
            [
                "export",
                str(two.root),
                "--format",
                "nnunet",
                "--out",
                str(raw),
                "--dataset-id",
                "7",
                "--dataset-name",
                "Chest",
            ]
        )
        == 0
    )
    folder = raw / "Dataset007_Chest"
    assert json.loads((folder / "dataset.json").read_text())["numTraining"] == 2
    assert (
        main(
            [
                "export",
                str(one.root),
                "--format",
                "nnunet",
                "--out",
                str(raw),
                "--dataset-id",
                "7",
                "--dataset-name",
                "Chest",
            ]
        )
        == 0
    )
    meta = json.loads((folder / "dataset.json").read_text())
    assert meta["numTraining"] == 1
    assert meta["name"] == "Chest"
    assert sorted(p.name for p in (folder / "labelsTr").iterdir()) == [f"{meta['medsam_cases'][0]}.nii.gz"]
    assert len(list((folder / "imagesTr").iterdir())) == 1
    assert sorted(p.name for p in raw.iterdir()) == ["Dataset007_Chest"]  # no staging or old copy left


def test_a_folder_the_engine_did_not_write_is_refused_and_left_alone(
    tmp_path, small_chest, small_chest_nifti, chest_label_names, capsys
):
    from medsam_engine.pipeline.cli.main import main

    store = _two_case_store(tmp_path / "store", small_chest, small_chest_nifti, chest_label_names, cases=1)
    foreign = tmp_path / "someone-elses"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    assert main(["export", str(store.root), "--format", "nnunet", "--out", str(foreign)]) == 2
    assert "no nnunet export of medsam-engine wrote" in capsys.readouterr().err
    assert sorted(p.name for p in foreign.iterdir()) == ["notes.txt"]
    assert (
        main(
            [
                "export",
                str(store.root),
                "--format",
                "nifti",
                "--out",
                str(tmp_path / "n"),
                "--dataset-id",
                "3",
            ]
        )
        == 2
    )
    assert (
        main(
            [
                "export",
                str(store.root),
                "--format",
                "nnunet",
                "--out",
                str(tmp_path / "raw"),
                "--dataset-id",
                "1000",
            ]
        )
        == 2
    )
