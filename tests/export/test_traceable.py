"""Traceable exports: inputs recorded so that exports work from any working directory, cases.csv in every
export folder, and files named by input (`export --name-by input`)."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pydicom
import pytest
from conftest import commit_from_source

from medsam_engine.pipeline.cli.main import main
from medsam_engine.pipeline.io.readers import read_volume
from medsam_engine.pipeline.store.case_store import CaseStore

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

AXIAL_SERIES = "1.2.826.0.1.3680043.8.498.70"  # conftest's chest_series["axial"]


def _series_copy(source: Path, folder: Path, *, number: int, tag: str) -> None:
    """The files of ``source`` as another series (new UIDs, SeriesNumber ``number``) in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    for file in sorted(source.iterdir()):
        ds = pydicom.dcmread(str(file))
        ds.SeriesInstanceUID = f"{AXIAL_SERIES}.{number}"
        ds.SOPInstanceUID = pydicom.uid.generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.SeriesNumber = number
        ds.save_as(str(folder / f"{tag}{file.name}"), enforce_file_format=True)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, small_chest, small_chest_nifti, chest_series, box_fill) -> Path:
    """A working directory where `annotate inputs --coarse-mask masks --out store` ran with relative paths:
    two volumes both named ct (NIfTI, NRRD), a DICOM series folder (axial) and a folder holding two series
    (both, SeriesNumber 3 and 5)."""
    root = tmp_path_factory.mktemp("traceable")
    inputs, masks = root / "inputs", root / "masks"
    inputs.mkdir()
    masks.mkdir()
    shutil.copy(small_chest_nifti[0], inputs / "ct.nii.gz")
    shutil.copy(small_chest[0], inputs / "ct.nrrd")
    shutil.copytree(chest_series["axial"], inputs / "axial")
    _series_copy(chest_series["axial"], inputs / "both", number=3, tag="a")
    _series_copy(chest_series["axial"], inputs / "both", number=5, tag="b")
    for stem in ("ct", "axial", "both"):
        shutil.copy(small_chest_nifti[1], masks / f"{stem}.nii.gz")
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(root)
        argv = ["annotate", "inputs", "--coarse-mask", "masks", "--out", "store", "--config", str(box_fill)]
        assert main(argv) == 0
    return root


def test_a_later_run_reads_relative_inputs_of_its_own_working_directory(
    workdir, tmp_path, monkeypatch, small_chest_nifti, box_fill
):
    shutil.copy(small_chest_nifti[0], tmp_path / "later.nii.gz")
    shutil.copy(small_chest_nifti[1], tmp_path / "later-mask.nii.gz")
    monkeypatch.chdir(tmp_path)  # the reader processes started in workdir's run, elsewhere
    argv = ["annotate", "later.nii.gz", "--coarse-mask", "later-mask.nii.gz", "--out", "store"]
    assert main([*argv, "--config", str(box_fill)]) == 0


def _by_given(store: Path) -> dict[str, str]:
    """{input as given: case id} of the store's committed cases."""
    s = CaseStore(store)
    return {s.manifest(c)["given"]: c for c in s.committed_cases()}


def _rows(folder: Path) -> dict[str, dict]:
    with (folder / "cases.csv").open(newline="") as handle:
        return {row["case_id"]: row for row in csv.DictReader(handle)}


@pytest.fixture(scope="module")
def seg_export(workdir, tmp_path_factory) -> Path:
    """`export --format dicom-seg` run from another working directory."""
    elsewhere = tmp_path_factory.mktemp("elsewhere")
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(elsewhere)
        code = main(["export", str(workdir / "store"), "--format", "dicom-seg", "--out", "seg"])
    assert code == 1  # the two volumes have no DICOM source
    return elsewhere / "seg"


def test_the_manifest_keeps_the_input_as_given(workdir):
    assert set(_by_given(workdir / "store")) == {
        "inputs/ct.nii.gz",
        "inputs/ct.nrrd",
        "inputs/axial",
        "inputs/both",
    }


def test_the_manifest_records_absolute_paths(workdir):
    s = CaseStore(workdir / "store")
    case_id = _by_given(workdir / "store")["inputs/axial"]
    manifest = s.manifest(case_id)
    assert manifest["image"] == str(workdir / "inputs" / "axial")
    assert all(Path(f).parent == workdir / "inputs" / "axial" for f in manifest["files"])
    assert manifest["coarse_mask"] == str(workdir / "masks" / "axial.nii.gz")


def test_seg_export_from_another_directory_writes_the_dicom_case(workdir, seg_export):
    case_id = _by_given(workdir / "store")["inputs/axial"]
    assert _rows(seg_export)[case_id]["output"] == f"{case_id}.seg.dcm"


def test_cases_csv_names_the_series_of_a_dicom_case(workdir, seg_export):
    row = _rows(seg_export)[_by_given(workdir / "store")["inputs/axial"]]
    assert (row["study_uid"], row["series_uid"]) == (f"{AXIAL_SERIES}.0", AXIAL_SERIES)


def test_cases_csv_gives_the_input_and_its_absolute_path(workdir, seg_export):
    row = _rows(seg_export)[_by_given(workdir / "store")["inputs/axial"]]
    assert (row["input"], row["input_resolved"]) == ("inputs/axial", str(workdir / "inputs" / "axial"))


def test_cases_csv_marks_a_volume_skipped_for_seg_with_the_reason(workdir, seg_export):
    row = _rows(seg_export)[_by_given(workdir / "store")["inputs/ct.nii.gz"]]
    assert (row["status"], row["output"]) == ("skipped", "")
    assert "not a DICOM series" in row["reason"]


def test_cases_csv_leaves_uids_empty_for_a_volume(workdir, seg_export):
    row = _rows(seg_export)[_by_given(workdir / "store")["inputs/ct.nrrd"]]
    assert (row["study_uid"], row["series_uid"]) == ("", "")


def test_nifti_export_from_another_directory_lists_every_case_written(workdir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["export", str(workdir / "store"), "--format", "nifti", "--out", "nifti"]) == 0
    rows = _rows(tmp_path / "nifti")
    assert {r["status"] for r in rows.values()} == {"written"}
    assert all((tmp_path / "nifti" / r["output"]).is_file() for r in rows.values())
    assert set(rows) == set(CaseStore(workdir / "store").committed_cases())


def _input_names(workdir: Path) -> dict[str, str]:
    """The names --name-by input must give, by case id."""
    store = workdir / "store"
    s = CaseStore(store)
    ids = _by_given(store)
    both = {
        f"both_s{pydicom.dcmread(s.manifest(c)['files'][0]).SeriesNumber}": c
        for c in s.committed_cases()
        if s.manifest(c)["given"] == "inputs/both"
    }
    nifti, nrrd = ids["inputs/ct.nii.gz"], ids["inputs/ct.nrrd"]
    return {
        nifti: f"ct_{nifti[:8]}",
        nrrd: f"ct_{nrrd[:8]}",
        ids["inputs/axial"]: "axial",
        **{case_id: name for name, case_id in both.items()},
    }


@pytest.fixture(scope="module")
def named_by_input(workdir, tmp_path_factory) -> Path:
    """The store's NIfTI export with files named after their inputs."""
    out = tmp_path_factory.mktemp("named-by-input")
    argv = ["export", str(workdir / "store"), "--format", "nifti", "--out", str(out), "--name-by", "input"]
    assert main(argv) == 0
    return out


def test_nifti_files_named_by_input(workdir, named_by_input):
    expected = {f"{name}.nii.gz" for name in _input_names(workdir).values()}
    assert {p.name for p in named_by_input.glob("*.nii.gz")} == expected


def test_names_by_input_separate_two_series_of_one_folder(workdir):
    assert {"both_s3", "both_s5"} <= set(_input_names(workdir).values())


def test_cases_csv_maps_each_name_to_its_case(workdir, named_by_input):
    mapped = {case_id: row["output"] for case_id, row in _rows(named_by_input).items()}
    assert mapped == {case_id: f"{name}.nii.gz" for case_id, name in _input_names(workdir).items()}


def test_seg_files_named_by_input(workdir, tmp_path):
    argv = ["export", str(workdir / "store"), "--format", "dicom-seg", "--out", str(tmp_path)]
    assert main([*argv, "--name-by", "input"]) == 1
    assert {p.name for p in tmp_path.glob("*.seg.dcm")} == {
        "axial.seg.dcm",
        "both_s3.seg.dcm",
        "both_s5.seg.dcm",
    }


@pytest.fixture(scope="module")
def nnunet_by_input(workdir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("nnunet") / "Dataset001"
    argv = ["export", str(workdir / "store"), "--format", "nnunet", "--out", str(out), "--name-by", "input"]
    assert main(argv) == 0
    return out


def test_nnunet_case_identifiers_named_by_input(workdir, nnunet_by_input):
    expected = sorted(f"{name}.nii.gz" for name in _input_names(workdir).values())
    assert sorted(p.name for p in (nnunet_by_input / "labelsTr").iterdir()) == expected


def test_nnunet_dataset_json_maps_identifiers_to_case_ids(workdir, nnunet_by_input):
    dataset = json.loads((nnunet_by_input / "dataset.json").read_text())
    assert dataset["medsam_case_ids"] == {name: c for c, name in _input_names(workdir).items()}


def test_nnunet_cases_csv_lists_label_and_image_files(workdir, nnunet_by_input):
    case_id = _by_given(workdir / "store")["inputs/axial"]
    assert _rows(nnunet_by_input)[case_id]["output"] == "labelsTr/axial.nii.gz;imagesTr/axial_0000.nii.gz"


@pytest.fixture(scope="module")
def coco_store(tmp_path_factory, two_tiles) -> tuple[CaseStore, dict[str, str]]:
    """Two 2D cases whose inputs are both named tile00.png (in two folders) and a third, tile11.png."""
    root = tmp_path_factory.mktemp("coco-names")
    images, masks = two_tiles
    other = root / "other"
    other.mkdir()
    pixels = cv2.imread(str(images / "tile00.png"), cv2.IMREAD_UNCHANGED)
    pixels[0, 0] += 1
    cv2.imwrite(str(other / "tile00.png"), pixels)  # the same name, other pixels
    store = CaseStore(root / "store")
    ids = {}
    for key, image, mask in (
        ("first", images / "tile00.png", masks / "tile00.png"),
        ("second", other / "tile00.png", masks / "tile00.png"),
        ("third", images / "tile11.png", masks / "tile11.png"),
    ):
        ids[key] = commit_from_source(store, image, read_volume(mask).array.astype(np.uint16))
    return store, ids


def test_coco_images_named_by_input_with_shared_names_made_unique(coco_store, tmp_path):
    store, ids = coco_store
    argv = ["export", str(store.root), "--format", "coco", "--out", str(tmp_path), "--name-by", "input"]
    assert main(argv) == 0
    annotations = json.loads((tmp_path / "annotations.json").read_text())
    assert {i["medsam_case_id"]: i["file_name"] for i in annotations["images"]} == {
        ids["first"]: f"images/tile00_{ids['first'][:8]}.png",
        ids["second"]: f"images/tile00_{ids['second'][:8]}.png",
        ids["third"]: "images/tile11.png",
    }


def test_coco_cases_csv_lists_the_png_and_the_annotations(coco_store, tmp_path):
    store, ids = coco_store
    assert main(["export", str(store.root), "--format", "coco", "--out", str(tmp_path)]) == 0
    assert _rows(tmp_path)[ids["third"]]["output"] == f"annotations.json;images/{ids['third']}.png"


def test_names_by_id_are_the_case_ids(coco_store, tmp_path):
    store, ids = coco_store
    assert main(["export", str(store.root), "--format", "nifti", "--out", str(tmp_path)]) == 0
    assert {p.name for p in tmp_path.glob("*.nii.gz")} == {f"{c}.nii.gz" for c in ids.values()}


@pytest.fixture(scope="module")
def review_queue(workdir, tmp_path_factory) -> tuple[Path, dict[str, str]]:
    """`round run` (every instance routed to review) over the axial series and the NIfTI volume, then
    `annotate` of the NRRD volume (never routed), then `review export` from another directory."""
    root = tmp_path_factory.mktemp("review")
    config = root / "to-review.yaml"
    config.write_text("model: {runner: box-fill}\nquality: {accept_above: 1.0, reject_below: 0.0}\n")
    store = root / "store"
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(workdir)
        masks = ["--coarse-mask", "masks/axial.nii.gz", "masks/ct.nii.gz", "--config", str(config)]
        assert main(["round", "run", "inputs/axial", "inputs/ct.nii.gz", "--store", str(store), *masks]) == 0
        masks = ["--coarse-mask", "masks/ct.nii.gz", "--config", str(config)]
        assert main(["annotate", "inputs/ct.nrrd", "--out", str(store), *masks]) == 0
        patch.chdir(root)
        assert (
            main(["review", "export", str(store), "--out", "queue", "--formats", "nifti", "dicom-seg"]) == 0
        )
    return root / "queue", _by_given(store)


def test_review_export_lists_a_queued_dicom_case_with_its_seg(review_queue):
    queue, ids = review_queue
    case_id = ids["inputs/axial"]
    assert f"seg/{case_id}.seg.dcm" in _rows(queue)[case_id]["output"].split(";")


def test_review_export_names_the_format_a_queued_volume_could_not_take(review_queue):
    queue, ids = review_queue
    row = _rows(queue)[ids["inputs/ct.nii.gz"]]
    assert (row["status"], row["reason"].split(":")[0]) == ("written", "dicom-seg")


def test_review_export_lists_an_unrouted_case_as_excluded(review_queue):
    queue, ids = review_queue
    assert _rows(queue)[ids["inputs/ct.nrrd"]]["status"] == "excluded"


def test_cases_csv_reaches_an_s3_export_target(s3_endpoint, coco_store, tmp_path):
    import fsspec
    from conftest import use_s3

    store, ids = coco_store
    with pytest.MonkeyPatch.context() as env:
        bucket = use_s3(env, s3_endpoint, "traceable")
        assert main(["export", str(store.root), "--format", "nifti", "--out", f"{bucket}/nifti"]) == 0
        fsspec.filesystem("s3").get_file("traceable/nifti/cases.csv", str(tmp_path / "cases.csv"))
    assert set(_rows(tmp_path)) == set(ids.values())
