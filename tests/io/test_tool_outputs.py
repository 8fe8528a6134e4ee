"""What the tools before the engine write, taken as they are: TotalSegmentator's folder of one mask per
structure (alone, or one folder per case) and its multilabel file with the label table in its header,
nnU-Net's dataset.json and dcmqi's segmentation metadata as label tables."""

from __future__ import annotations

import json
import shutil

import nibabel as nib
import numpy as np
import pytest

from medsam_engine.pipeline.cli.main import main
from medsam_engine.pipeline.io.label_table import read_label_table
from medsam_engine.pipeline.io.nifti_labels import nifti_label_names, nifti_label_table
from medsam_engine.pipeline.io.readers import read_mask_folder
from medsam_engine.pipeline.store.case_store import CaseStore

STRUCTURES = {5: "lung_right", 6: "lung_left", 3: "vertebrae_T5"}  # TotalSegmentator's file names


@pytest.fixture(scope="module")
def totalseg(tmp_path_factory, small_chest_nifti):
    """The real chest CT (NIfTI) with one binary mask per structure, named as TotalSegmentator names them."""
    root = tmp_path_factory.mktemp("totalseg")
    labels = nib.load(str(small_chest_nifti[1]))
    data = np.asarray(labels.dataobj)
    (root / "segmentations").mkdir()
    for value, name in STRUCTURES.items():
        mask = (data == value).astype(np.uint8)
        nib.save(nib.Nifti1Image(mask, labels.affine), str(root / "segmentations" / f"{name}.nii.gz"))
    shutil.copy(small_chest_nifti[0], root / "ct.nii.gz")
    return root, data


def test_a_folder_of_one_mask_per_structure_is_one_label_map(totalseg):
    root, data = totalseg
    volume = read_mask_folder(root / "segmentations")
    names = sorted(STRUCTURES.values())  # label n is the n-th file in name order
    source_order = np.moveaxis(np.asarray(volume.array), (0, 1, 2), (2, 1, 0))
    for value, name in STRUCTURES.items():
        assert np.array_equal(source_order == names.index(name) + 1, data == value)


def test_totalsegmentator_output_prompts_its_ct_with_structure_names(totalseg, box_fill, tmp_path, capsys):
    root, _ = totalseg
    store = tmp_path / "store"
    argv = ["annotate", str(root / "ct.nii.gz"), "--coarse-mask", str(root / "segmentations")]
    assert main([*argv, "--store", str(store), "--config", str(box_fill)]) == 0
    assert "1 done" in capsys.readouterr().out
    s = CaseStore(store)
    (case_id,) = s.committed_cases()
    named = {p["label-value"]: p["name"] for p in s.label_properties(case_id)}
    assert set(named.values()) <= set(STRUCTURES.values())
    assert "lung_left" in named.values()


def test_one_totalsegmentator_folder_per_case_pairs_by_name(totalseg, box_fill, tmp_path, capsys):
    root, _ = totalseg
    (tmp_path / "images").mkdir()
    ct = nib.load(str(root / "ct.nii.gz"))
    for shift, case in enumerate(("chest_a", "chest_b")):  # two scans (one HU apart), two cases
        data = np.asarray(ct.dataobj) + shift
        nib.save(
            nib.Nifti1Image(data.astype(np.int16), ct.affine), str(tmp_path / "images" / f"{case}.nii.gz")
        )
    for case in ("chest_a", "chest_b"):
        shutil.copytree(root / "segmentations", tmp_path / "masks" / case)
    argv = ["annotate", str(tmp_path / "images"), "--coarse-mask", str(tmp_path / "masks")]
    assert main([*argv, "--store", str(tmp_path / "store"), "--config", str(box_fill)]) == 0
    assert "2 done" in capsys.readouterr().out


def test_masks_on_different_grids_fail_their_case_with_the_reason(totalseg, box_fill, tmp_path, capsys):
    root, _ = totalseg
    masks = tmp_path / "segmentations"
    shutil.copytree(root / "segmentations", masks)
    odd = nib.load(str(masks / "vertebrae_T5.nii.gz"))
    nib.save(nib.Nifti1Image(np.asarray(odd.dataobj)[:-1], odd.affine), str(masks / "vertebrae_T5.nii.gz"))
    argv = ["annotate", str(root / "ct.nii.gz"), "--coarse-mask", str(masks)]
    assert main([*argv, "--store", str(tmp_path / "store"), "--config", str(box_fill)]) == 1
    assert "vertebrae_T5.nii.gz: not on the grid of lung_left.nii.gz" in capsys.readouterr().out


def test_nnunet_dataset_json_is_a_label_table(tmp_path):
    v2 = tmp_path / "dataset.json"
    v2.write_text(json.dumps({"labels": {"background": 0, "liver": 1, "spleen": 2, "tumour": [1, 2]}}))
    assert read_label_table(v2) == {1: {"name": "liver"}, 2: {"name": "spleen"}}
    v1 = tmp_path / "v1" / "dataset.json"
    v1.parent.mkdir()
    v1.write_text(json.dumps({"labels": {"0": "background", "1": "liver"}}))
    assert read_label_table(v1) == {1: {"name": "liver"}}


def test_the_engines_own_nnunet_export_reads_back_as_a_label_table(tmp_path, small_chest, box_fill):
    store, out = tmp_path / "store", tmp_path / "nnunet"
    argv = ["annotate", str(small_chest[0]), "--coarse-mask", str(small_chest[1]), "--store", str(store)]
    assert main([*argv, "--config", str(box_fill)]) == 0
    assert main(["export", str(store), "--format", "nnunet", "--out", str(out)]) == 0
    table = read_label_table(out / "dataset.json")
    assert table
    assert all(entry["name"] for entry in table.values())


def test_dcmqi_metadata_is_a_label_table_with_codes_and_colours(tmp_path):
    meta = tmp_path / "seg-meta.json"
    meta.write_text(
        json.dumps(
            {
                "ContentCreatorName": "TotalSegmentator",
                "segmentAttributes": [
                    [
                        {
                            "labelID": 1,
                            "SegmentLabel": "liver",
                            "SegmentedPropertyTypeCodeSequence": {
                                "CodeValue": "10200004",
                                "CodingSchemeDesignator": "SCT",
                                "CodeMeaning": "Liver",
                            },
                            "recommendedDisplayRGBValue": [221, 130, 101],
                        }
                    ],
                    [{"labelID": 2, "SegmentDescription": "spleen"}],
                ],
            }
        )
    )
    table = read_label_table(meta)
    assert table[1] == {"name": "liver", "code": "10200004", "meaning": "Liver", "rgb": [221, 130, 101]}
    assert table[2] == {"name": "spleen"}


def write_multilabel(path, data, affine, names: dict[int, str], *, table: bytes | None = None) -> None:
    """A multilabel NIfTI as TotalSegmentator's ``--ml`` writes it: uint8 values, and a header extension
    (code 0) holding a Caret label table with each value's name and a colour in 0..1."""
    rows = "".join(
        f'<Label Key="{value}" Red="1" Green="{value / 10}" Blue="0" Alpha="1"><![CDATA[{name}]]></Label>\n'
        for value, name in names.items()
    )
    xml = (
        '<?xml version="1.0" encoding="UTF-8"?> <CaretExtension> <VolumeInformation Index="0"> <LabelTable>\n'
        f"{rows}</LabelTable> <VolumeType><![CDATA[Label]]></VolumeType> </VolumeInformation>"
        "</CaretExtension>"
    )
    image = nib.Nifti1Image(np.asarray(data, dtype=np.uint8), affine)
    image.header.extensions.append(nib.nifti1.Nifti1Extension(0, table or xml.encode()))
    nib.save(image, str(path))


ML_NAMES = {
    1: "ribs",
    2: "vertebrae_T4",
    3: "vertebrae_T5",
    4: "vertebrae_T6",
    5: "lung_right",
    6: "lung_left",
}


@pytest.fixture(scope="module")
def multilabel(tmp_path_factory, small_chest_nifti):
    """The real chest CT and its labels as one TotalSegmentator-style multilabel file (body, label 7, left
    out as TotalSegmentator's total task has no body class)."""
    root = tmp_path_factory.mktemp("totalseg_ml")
    labels = nib.load(str(small_chest_nifti[1]))
    data = np.asarray(labels.dataobj)
    write_multilabel(root / "segmentations.nii.gz", np.where(data == 7, 0, data), labels.affine, ML_NAMES)
    shutil.copy(small_chest_nifti[0], root / "ct.nii.gz")
    return root


def test_the_multilabel_files_header_names_its_values(multilabel):
    table = nifti_label_table(multilabel / "segmentations.nii.gz")
    assert {value: entry["name"] for value, entry in table.items()} == ML_NAMES
    assert table[5]["rgb"] == [255, 128, 0]
    assert read_label_table(multilabel / "segmentations.nii.gz") == table  # also good as --labels


def test_totalsegmentator_multilabel_prompts_with_its_names(multilabel, box_fill, tmp_path, capsys):
    store = tmp_path / "store"
    argv = [
        "annotate",
        str(multilabel / "ct.nii.gz"),
        "--coarse-mask",
        str(multilabel / "segmentations.nii.gz"),
    ]
    assert main([*argv, "--store", str(store), "--config", str(box_fill)]) == 0
    assert "1 done" in capsys.readouterr().out
    s = CaseStore(store)
    (case_id,) = s.committed_cases()
    named = {p["label-value"]: p["name"] for p in s.label_properties(case_id)}
    assert named[5] == "lung_right"
    assert named[6] == "lung_left"
    assert set(named.items()) <= set(ML_NAMES.items())


def test_a_label_table_names_the_multilabel_file_over_its_header(multilabel, box_fill, tmp_path, capsys):
    table = tmp_path / "total.csv"
    table.write_text("value,name,code\n5,right lung,3341006\n6,left lung,44029006\n")
    store = tmp_path / "store"
    argv = [
        "annotate",
        str(multilabel / "ct.nii.gz"),
        "--coarse-mask",
        str(multilabel / "segmentations.nii.gz"),
    ]
    argv += ["--labels", str(table), "--store", str(store), "--config", str(box_fill)]
    assert main(argv) == 0
    s = CaseStore(store)
    (case_id,) = s.committed_cases()
    named = {p["label-value"]: p["name"] for p in s.label_properties(case_id)}
    assert named[5] == "right lung"
    assert named[6] == "left lung"
    assert named[3] == "vertebrae_T5"  # values the table leaves out keep the header's names


def test_a_broken_header_table_leaves_the_values_unnamed(small_chest_nifti, tmp_path):
    labels = nib.load(str(small_chest_nifti[1]))
    path = tmp_path / "broken.nii.gz"
    write_multilabel(path, np.asarray(labels.dataobj), labels.affine, {}, table=b"<LabelTable><Label Key=")
    assert nifti_label_names(path) == {}
    with pytest.raises(ValueError, match=r"broken\.nii\.gz: its header's label table is not well-formed XML"):
        nifti_label_table(path)
