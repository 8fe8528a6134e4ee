"""`medsam-engine export STORE --format F --out DIR` for every format, on a store built without the model."""

from __future__ import annotations

import json

import pytest
from conftest import commit_from_source

from medsam_engine.pipeline.cli.main import main
from medsam_engine.pipeline.io.readers import read_volume
from medsam_engine.pipeline.store.case_store import CaseStore


@pytest.fixture(scope="module")
def store_path(tmp_path_factory, chest_series, small_chest, nuclei_2d, chest_label_names):
    root = tmp_path_factory.mktemp("export_cli") / "store"
    store = CaseStore(root)
    labels = read_volume(small_chest[1]).array
    commit_from_source(store, chest_series["axial"], labels, names=chest_label_names)
    commit_from_source(store, nuclei_2d[0], read_volume(nuclei_2d[1]).array)
    return root


@pytest.mark.parametrize(
    "fmt, expected_code, produced",
    [
        ("nifti", 0, "*.nii.gz"),
        ("dicom-seg", 1, "*.seg.dcm"),  # the PNG case has no DICOM source: skipped, with its reason printed
        ("nnunet", 1, "dataset.json"),  # one modality per dataset: the PNG case is skipped
        ("coco", 1, "annotations.json"),  # the CT volume is not 2D: skipped
    ],
)
def test_every_format_through_the_command_line(store_path, tmp_path, capsys, fmt, expected_code, produced):
    out = tmp_path / fmt
    assert main(["export", str(store_path), "--format", fmt, "--out", str(out)]) == expected_code
    printed = capsys.readouterr().out
    assert len(list(out.glob(produced))) == (2 if fmt == "nifti" else 1)
    assert printed.count("skipped  ") == expected_code
    if fmt == "nnunet":
        assert json.loads((out / "dataset.json").read_text())["numTraining"] == 1


def test_unknown_format_and_missing_store_are_usage_errors(store_path, tmp_path):
    with pytest.raises(SystemExit) as info:
        main(["export", str(store_path), "--format", "png", "--out", str(tmp_path)])
    assert info.value.code == 2
    missing = str(tmp_path / "no-store")
    assert main(["export", missing, "--format", "nifti", "--out", str(tmp_path / "o")]) == 2
