"""Label tables (`--labels FILE`): JSON, CSV and 3D Slicer colour tables; their names, SNOMED codes and
colours reach the store, the DICOM SEG, the nnU-Net dataset, the QC page and survive a review import."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from medsam_engine.pipeline.cli.main import main
from medsam_engine.pipeline.io.label_table import read_label_table
from medsam_engine.pipeline.store.case_store import CaseStore


def test_json_csv_and_slicer_tables_read_alike(tmp_path):
    (tmp_path / "a.json").write_text(
        json.dumps(
            {
                "5": {"name": "right lung", "colour": "#ff0000"},
                "6": {"name": "left lung", "code": "44029006", "color": [0, 0, 255]},
            }
        )
    )
    (tmp_path / "b.csv").write_text(
        "value,name,code,colour\n5,right lung,,255 0 0\n6,left lung,44029006,#0000ff\n"
    )
    (tmp_path / "c.ctbl").write_text(
        "# Slicer colour table\n0 Background 0 0 0 0\n5 right_lung 255 0 0 255\n6 left_lung 0 0 255 255\n"
    )
    expected = {
        5: {"name": "right lung", "rgb": [255, 0, 0]},
        6: {"name": "left lung", "code": "44029006", "meaning": "left lung", "rgb": [0, 0, 255]},
    }
    assert read_label_table(tmp_path / "a.json") == expected
    assert read_label_table(tmp_path / "b.csv") == expected
    slicer = read_label_table(tmp_path / "c.ctbl")
    assert slicer == {5: expected[5], 6: {"name": "left lung", "rgb": [0, 0, 255]}}
    (tmp_path / "names.csv").write_text("1,liver\n2,spleen\n")  # no header: value,name
    assert read_label_table(tmp_path / "names.csv") == {1: {"name": "liver"}, 2: {"name": "spleen"}}


@pytest.mark.parametrize(
    "name, text, why",
    [
        ("x.csv", "value,name\nfive,liver\n", "line 2: label value 'five'"),
        ("x.csv", "value,name,colour\n1,liver,300 0 0\n", "0..255"),
        ("x.json", '{"1": ""}', "label 1 has no name"),
        ("x.json", "[1, 2", "not a JSON label table"),
        ("x.ctbl", "1 liver 255\n", "'value name r g b [a]'"),
        ("x.csv", "value,name\n", "names no label"),
    ],
)
def test_bad_tables_name_the_file_and_the_fault(tmp_path, name, text, why):
    (tmp_path / name).write_text(text)
    with pytest.raises(ValueError, match=rf"^{name}.*{__import__('re').escape(why)}"):
        read_label_table(tmp_path / name)


def test_a_label_table_reaches_every_output(tmp_path, chest_series, small_chest, box_fill):
    import cv2
    import highdicom as hd

    from medsam_engine.pipeline.report.qc import write_report

    table = tmp_path / "labels.csv"
    table.write_text(
        "value,name,code,colour\n5,right lung,,#e6194b\n6,left lung,44029006,#3cb44b\n"
        "4,Spine ROI,123037004,#4363d8\n"
    )
    store_path = tmp_path / "store"
    assert (
        main(
            [
                "annotate",
                str(chest_series["axial"]),
                "--coarse-mask",
                str(small_chest[1]),
                "--out",
                str(store_path),
                "--labels",
                str(table),
                "--config",
                str(box_fill),
            ]
        )
        == 0
    )
    store = CaseStore(store_path)
    (case_id,) = store.committed_cases()
    properties = {p["label-value"]: p for p in store.label_properties(case_id)}
    assert properties[5]["name"] == "right lung"
    assert properties[5]["snomed-ct-code"] == "3341006"  # from the name
    assert properties[5]["rgb"] == [0xE6, 0x19, 0x4B]
    assert properties[6]["snomed-ct-code"] == "44029006"
    assert properties[6]["rgb"] == [0x3C, 0xB4, 0x4B]
    if 4 in properties:
        assert properties[4]["name"] == "Spine ROI"
        assert properties[4]["snomed-ct-code"] == "123037004"

    assert main(["export", str(store_path), "--format", "dicom-seg", "--out", str(tmp_path / "seg")]) == 0
    seg = hd.seg.segread(str(tmp_path / "seg" / f"{case_id}.seg.dcm"))
    described = {
        seg.get_segment_description(n).SegmentLabel: seg.get_segment_description(n)
        for n in seg.get_segment_numbers()
    }
    assert described["left lung"].SegmentedPropertyTypeCodeSequence[0].CodeValue == "44029006"
    expected_lab = list(hd.color.CIELabColor.from_rgb(0x3C, 0xB4, 0x4B).value)
    assert list(described["left lung"].RecommendedDisplayCIELabValue) == expected_lab

    assert (
        main(
            [
                "export",
                str(store_path),
                "--format",
                "nnunet",
                "--out",
                str(tmp_path / "nn"),
                "--dataset-id",
                "502",
            ]
        )
        == 0
    )
    (dataset,) = (tmp_path / "nn").iterdir()
    names = json.loads((dataset / "dataset.json").read_text())["labels"]
    assert {"right lung", "left lung"} <= set(names)

    page = write_report(store, tmp_path / "qc").read_text()
    assert "right lung" in page
    assert "rgb(230,25,75)" in page  # the legend, in the store's colours
    picture = cv2.imread(str(next((tmp_path / "qc").glob("*.png"))))[:, :, ::-1]
    assert np.any(np.all(picture == [0x3C, 0xB4, 0x4B], axis=-1))  # contours drawn in the same colours

    corrected = tmp_path / "corrections"
    corrected.mkdir()
    shutil.copy(small_chest[1], corrected / f"{case_id}.nrrd")
    assert main(["review", "import", str(store_path), str(corrected), "--reviewer", "dr-labels"]) == 0
    after = {p["label-value"]: p for p in store.label_properties(case_id)}
    for value in (5, 6):  # names, codes and colours kept through the review's new version
        assert {k: after[value][k] for k in ("name", "rgb", "snomed-ct-code")} == {
            k: properties[value][k] for k in ("name", "rgb", "snomed-ct-code")
        }
    labels, _ = store.read_labels(case_id)
    assert np.any(labels == 5)
