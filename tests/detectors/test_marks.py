"""Marks as prompts: GSPS and TID 1500 marks written with highdicom on the real chest CT, as DICOM series,
made from its reference structures (long axis = the longest in-plane extent on the largest slice, short axis
perpendicular), annotated with ``--detector marks``."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pydicom
import pytest
from conftest import complete_dicom_headers, write_ct_series
from marks_making import image_xy, images_by_slice, write_gsps, write_sr

from medsam_engine.detectors.evaluation import recist_axes
from medsam_engine.detectors.marks import MarksOptions, axes_box, line_box
from medsam_engine.pipeline.cli.main import main
from medsam_engine.pipeline.core.geometry import align_to
from medsam_engine.pipeline.core.metrics import dice
from medsam_engine.pipeline.io.readers import read_volume
from medsam_engine.pipeline.store.case_store import CaseStore

SERIES, FRAME = "1.2.826.0.1.3680043.8.498.301", "1.2.826.0.1.3680043.8.498.302"
RIGHT_LUNG, LEFT_LUNG = 5, 6


def _series(folder: Path, volume, *, series_uid: str, frame: str) -> Path:
    write_ct_series(volume, folder, series_uid=series_uid)
    return complete_dicom_headers(folder, frame_of_reference_uid=frame)


@pytest.fixture(scope="module")
def chest(tmp_path_factory, chest_ct):
    """The whole real chest CT (34 slices) as a DICOM series with a Frame of Reference, its volume as the
    engine reads it, the reference labels on that grid and the series' datasets by slice."""
    root = tmp_path_factory.mktemp("marks_chest")
    folder = _series(root / "series", read_volume(chest_ct[0]), series_uid=SERIES, frame=FRAME)
    volume = read_volume(folder)
    labels = align_to(read_volume(chest_ct[1]), volume, what="reference")
    return {"folder": folder, "volume": volume, "labels": labels, "images": images_by_slice(folder, volume)}


def structure_axes(chest, label: int) -> tuple[int, np.ndarray, np.ndarray]:
    """The structure's largest slice and its long and short axes (volume x/y indices) there."""
    mask = chest["labels"] == label
    z = int(np.argmax(mask.sum(axis=(1, 2))))
    long, short = recist_axes(mask[z], chest["volume"].spacing[1:])
    return z, long, short


def annotate(chest, marks: Path, store: Path, box_fill: Path | None, *extra: str) -> int:
    args = ["annotate", str(chest["folder"]), "--out", str(store), "--detector", "marks"]
    args += ["--detector-option", f"marks={marks}", *extra]
    return main(args + (["--config", str(box_fill)] if box_fill else []))


def committed(store: Path):
    case_store = CaseStore(store)
    (case_id,) = case_store.committed_cases()
    return case_store.read_labels(case_id)


def test_recist_axes_of_a_rectangle_are_its_diagonal_and_the_perpendicular_chord():
    mask = np.zeros((20, 40), dtype=bool)
    mask[5:15, 10:30] = True
    long, short = recist_axes(mask)
    assert np.isclose(np.linalg.norm(long[1] - long[0]), np.hypot(19, 9))
    assert np.linalg.norm(short[1] - short[0]) > 9


def test_a_lone_line_becomes_a_square_around_it_or_its_diagonal_box():
    line = np.array([[10.0, 20.0], [30.0, 20.0]])
    square = line_box(line, MarksOptions(marks="x", lone_line="square"), (1.0, 1.0))
    assert np.allclose(square, [[10, 10], [30, 30]])  # side = the line's length
    diagonal = line_box(line, MarksOptions(marks="x", lone_line="diagonal"), (1.0, 1.0))
    assert np.allclose(diagonal, [[10, 20], [30, 20]])


def test_a_long_and_short_axis_become_their_ellipse_box_by_default_or_their_end_points_box():
    long, short = np.array([[0.0, 0.0], [20.0, 20.0]]), np.array([[5.0, 15.0], [15.0, 5.0]])
    ellipse = axes_box([long, short], MarksOptions(marks="x"), (1.0, 1.0))
    half = np.hypot(10, 5)  # an oblique long axis: the outline bulges past the end points
    assert np.allclose(ellipse, [[10 - half, 10 - half], [10 + half, 10 + half]])
    ends = axes_box([long, short], MarksOptions(marks="x", axes_rule="endpoints"), (1.0, 1.0))
    assert np.allclose(ends, [[0, 0], [20, 20]])


def test_gsps_long_and_short_axis_make_one_instance_on_its_key_slice(chest, tmp_path, box_fill):
    z, long, short = structure_axes(chest, LEFT_LUNG)
    rz, _, _ = structure_axes(chest, RIGHT_LUNG)
    ds, rds = chest["images"][z], chest["images"][rz]
    marks = tmp_path / "marks"
    marks.mkdir()
    tip = chest["labels"][rz] == RIGHT_LUNG
    ys, xs = np.nonzero(tip)
    arrow = image_xy(rds, chest["volume"], rz, np.array([[xs.mean(), ys.mean()]]))[0]
    state = write_gsps(
        marks / "pr.dcm",
        list(chest["images"].values()),
        [
            {
                "image": ds,
                "layer": "RECIST",
                "objects": [
                    ("POLYLINE", image_xy(ds, chest["volume"], z, long), None),
                    ("POLYLINE", image_xy(ds, chest["volume"], z, short), None),
                ],
            },
            {"image": rds, "layer": "RECIST", "arrows": [arrow]},
            {"image": rds, "layer": "RECIST", "objects": [("CIRCLE", [[5, 5], [8, 5]], None)]},
            {"image": ds, "layer": "RECIST", "objects": [("POINT", [[10, 10]], None)]},
        ],
    )
    edited = pydicom.dcmread(str(state))
    edited.GraphicAnnotationSequence[2].GraphicObjectSequence[0].GraphicType = "SPLINE"  # not DICOM's
    edited.GraphicAnnotationSequence[3].ReferencedImageSequence[0].ReferencedSOPInstanceUID = "1.2.3.4.5"
    edited.save_as(str(state))

    assert annotate(chest, marks, tmp_path / "store", box_fill) == 0
    labels, attrs = committed(tmp_path / "store")
    records = sorted(attrs.instances, key=lambda r: r["instance"])
    assert [(r["label"], r["instance"]) for r in records] == [(1, 1), (1, 2)]  # the cross is one finding
    cross, pointed = (r["prompt_origin"] for r in records)
    assert cross["key_slice"] == z
    assert cross["rule"] == "long+short axis"
    assert [m["graphic"] for m in cross["marks"]] == ["POLYLINE", "POLYLINE"]
    assert {m["type"] for m in cross["marks"]} == {"GSPS"}
    assert {m["sop_instance_uid"] for m in cross["marks"]} == {str(edited.SOPInstanceUID)}
    assert pointed["key_slice"] == rz
    assert pointed["rule"] == "point"
    assert len(records[0]["slices"]) > 1  # propagated beyond the key slice
    assert labels[z].any()
    assert labels[rz].any()
    warnings = attrs.raw["prompt_warnings"]
    assert len(warnings) == 2
    assert any("unknown graphic type 'SPLINE'" in w for w in warnings)
    assert any("not in this series" in w for w in warnings)
    assert not any(str(edited.SOPInstanceUID) in w or "1.2.3.4.5" in w for w in warnings)


def test_sr_findings_become_labels_by_finding_code(chest, tmp_path, box_fill):
    z, long, short = structure_axes(chest, LEFT_LUNG)
    rz, rlong, rshort = structure_axes(chest, RIGHT_LUNG)
    ds, rds = chest["images"][z], chest["images"][rz]
    marks = tmp_path / "marks"
    marks.mkdir()
    volume = chest["volume"]
    elsewhere = copy.deepcopy(ds)  # an image of the study that is not in the series
    elsewhere.SOPInstanceUID = "1.2.3.4.6"
    report = write_sr(
        marks / "sr.dcm",
        [*chest["images"].values(), elsewhere],
        [
            {"image": ds, "long": image_xy(ds, volume, z, long), "short": image_xy(ds, volume, z, short)},
            {
                "image": rds,
                "long": image_xy(rds, volume, rz, rlong),
                "short": image_xy(rds, volume, rz, rshort),
                "finding": ("4147007", "SCT", "Mass"),
            },
            {"image": elsewhere, "long": image_xy(ds, volume, z, long)},
        ],
    )
    empty = pydicom.dcmread(str(write_sr(marks / "empty.dcm", [ds], [{"image": ds, "long": long}])))
    empty.ContentSequence = [i for i in empty.ContentSequence if i.ValueType != "CONTAINER"]
    empty.save_as(
        str(marks / "empty.dcm")
    )  # a report whose measurements were taken out: it references nothing
    assert annotate(chest, marks, tmp_path / "store", box_fill) == 0
    labels, attrs = committed(tmp_path / "store")
    by_label = {r["label"]: r for r in attrs.instances}
    assert sorted(by_label) == [1, 2]
    assert by_label[1]["prompt_origin"]["key_slice"] == z
    assert by_label[2]["prompt_origin"]["key_slice"] == rz
    assert by_label[1]["prompt_origin"]["rule"] == "long+short axis"
    uid = str(pydicom.dcmread(str(report)).SOPInstanceUID)
    assert {m["type"] for m in by_label[1]["prompt_origin"]["marks"]} == {"SR"}
    assert {m["sop_instance_uid"] for m in by_label[1]["prompt_origin"]["marks"]} == {uid}
    case_store = CaseStore(tmp_path / "store")
    (case_id,) = case_store.committed_cases()
    label_meta = json.dumps(dict(case_store.open_case(case_id)["labels/medsam"].attrs))
    assert '"Lesion"' in label_meta
    assert '"Mass"' in label_meta
    warnings = attrs.raw["prompt_warnings"]
    assert any(w.startswith("empty.dcm: a structured report that references nothing") for w in warnings)
    assert [w for w in warnings if "empty.dcm" not in w]
    assert all("not in this series" in w for w in warnings if "empty.dcm" not in w)
    # the box on the key slice holds the structure's long and short axis
    x0, x1 = int(np.floor(long[:, 0].min())), int(np.ceil(long[:, 0].max()))
    assert labels[z, int(long[:, 1].mean()), x0:x1].any()


def test_a_case_whose_marks_are_all_unusable_fails_at_prompt_with_the_reasons(chest, tmp_path, box_fill):
    z, long, short = structure_axes(chest, LEFT_LUNG)
    ds = chest["images"][z]
    marks = tmp_path / "marks"
    marks.mkdir()
    write_sr(marks / "sr.dcm", [ds], [{"image": ds, "long": long + 5000, "short": short + 5000}])
    assert annotate(chest, marks, tmp_path / "store", box_fill) == 1
    (error,) = CaseStore(tmp_path / "store").errors().values()
    assert error["stage"] == "prompt"
    assert "none of the marks is usable" in error["reason"]
    assert "off the image" in error["reason"]


def test_marks_on_another_series_map_through_the_frame_of_reference(chest, tmp_path, box_fill, chest_ct):
    """The same chest written as two more series (a 'reformat' sharing the Frame of Reference, and one on
    another): the first places its mark on the same slice, the second is refused with the reason."""
    volume = read_volume(chest_ct[0])
    shared = _series(tmp_path / "reformat", volume, series_uid=SERIES + ".5", frame=FRAME)
    other = _series(tmp_path / "other", volume, series_uid=SERIES + ".6", frame=FRAME + ".1")
    z, long, short = structure_axes(chest, LEFT_LUNG)
    shared_ds = images_by_slice(shared, chest["volume"])[z]
    other_ds = images_by_slice(other, chest["volume"])[z]
    marks = tmp_path / "marks"
    marks.mkdir()
    cross = [image_xy(shared_ds, chest["volume"], z, long), image_xy(shared_ds, chest["volume"], z, short)]
    write_sr(marks / "a.dcm", [shared_ds], [{"image": shared_ds, "long": cross[0], "short": cross[1]}])
    write_sr(marks / "b.dcm", [other_ds], [{"image": other_ds, "long": cross[0], "short": cross[1]}])
    code = annotate(
        chest, marks, tmp_path / "store", box_fill, "--detector-option", f"images={shared},{other}"
    )
    assert code == 0
    _, attrs = committed(tmp_path / "store")
    (record,) = attrs.instances
    assert record["prompt_origin"]["key_slice"] == z
    assert all("another Frame of Reference" in w for w in attrs.raw["prompt_warnings"])
    assert len(attrs.raw["prompt_warnings"]) == 2  # long axis and short axis of b.dcm


def test_a_mark_on_a_tilted_plane_is_refused(chest, tmp_path, box_fill, chest_series):
    """The oblique series (20 degrees about x) shares no slice plane with the axial one: refused."""
    oblique = sorted(chest_series["oblique"].iterdir())
    ds = pydicom.dcmread(str(oblique[0]))
    ds.FrameOfReferenceUID = FRAME
    tilted = tmp_path / "tilted"
    tilted.mkdir()
    ds.save_as(str(tilted / "im.dcm"))
    marks = tmp_path / "marks"
    marks.mkdir()
    write_sr(marks / "sr.dcm", [ds], [{"image": ds, "long": np.array([[10, 10], [40, 40]])}])
    code = annotate(chest, marks, tmp_path / "store", box_fill, "--detector-option", f"images={tilted}")
    assert code == 1
    (error,) = CaseStore(tmp_path / "store").errors().values()
    assert "degrees to the series' slices" in error["reason"]


def test_the_real_model_segments_the_right_lung_from_its_long_and_short_axis(
    chest_series, small_chest, tmp_path
):
    """LiteMedSAM, four real slices: one cross on the right lung's key slice gives its mask on all four."""
    folder = chest_series["axial"]
    volume = read_volume(folder)
    reference = align_to(read_volume(small_chest[1]), volume, what="reference") == RIGHT_LUNG
    chest = {"folder": folder, "volume": volume, "labels": reference * RIGHT_LUNG}
    chest["images"] = images_by_slice(folder, volume)
    z, long, short = structure_axes(chest, RIGHT_LUNG)
    ds = chest["images"][z]
    marks = tmp_path / "marks"
    marks.mkdir()
    cross = [image_xy(ds, volume, z, long), image_xy(ds, volume, z, short)]
    write_gsps(
        marks / "pr.dcm",
        [ds],
        [{"image": ds, "layer": "L", "objects": [("POLYLINE", c, None) for c in cross]}],
    )
    assert annotate(chest, marks, tmp_path / "store", None, "--device", "cpu") == 0
    labels, _ = committed(tmp_path / "store")
    assert (labels > 0).any(axis=(1, 2)).all()  # every slice, from one key slice
    assert dice(labels > 0, reference) > 0.75  # measured 0.841 (CPU, fp32); bench/marks_prompts.py for more


def test_sr_3d_coordinates_are_placed_through_the_frame_of_reference(chest, tmp_path, box_fill):
    """A TID 1410 outline as SCOORD3D (patient mm): on the series' Frame of Reference it is used, on
    another it is refused."""
    z, _, _ = structure_axes(chest, LEFT_LUNG)
    ys, xs = np.nonzero(chest["labels"][z] == LEFT_LUNG)
    corners = [(xs.min(), ys.min()), (xs.max(), ys.min()), (xs.max(), ys.max()), (xs.min(), ys.max())]
    zyx = np.array([[z, y, x, 1.0] for x, y in [*corners, corners[0]]])
    lps = (chest["volume"].geometry.affine @ zyx.T).T[:, :3] * [-1, -1, 1]
    ds = chest["images"][z]
    marks = tmp_path / "marks"
    marks.mkdir()
    write_sr(
        marks / "sr.dcm",
        [ds],
        [
            {"image": ds, "region3d": lps, "frame_of_reference": FRAME, "long": None},
            {"image": ds, "region3d": lps, "frame_of_reference": FRAME + ".9", "long": None},
        ],
    )
    assert annotate(chest, marks, tmp_path / "store", box_fill) == 0
    _, attrs = committed(tmp_path / "store")
    (record,) = attrs.instances
    assert record["prompt_origin"]["key_slice"] == z
    assert record["prompt_origin"]["marks"][0]["graphic"] == "POLYGON"
    box = record["boxes_xyxy"][record["slices"].index(z)]
    assert box == [int(xs.min()), int(ys.min()), int(xs.max()), int(ys.max())]
    (warning,) = attrs.raw["prompt_warnings"]
    assert "another Frame of Reference" in warning


def test_a_rerun_skips_the_case_and_other_marks_are_another_signature(chest, tmp_path, box_fill):
    z, long, short = structure_axes(chest, LEFT_LUNG)
    ds = chest["images"][z]
    marks = tmp_path / "marks"
    marks.mkdir()
    cross = {"image": ds, "long": image_xy(ds, chest["volume"], z, long)}
    write_sr(marks / "sr.dcm", [ds], [dict(cross, short=image_xy(ds, chest["volume"], z, short))])
    assert annotate(chest, marks, tmp_path / "store", box_fill) == 0
    _, first = committed(tmp_path / "store")
    assert annotate(chest, marks, tmp_path / "store", box_fill) == 0  # skipped: same signature
    write_sr(marks / "sr.dcm", [ds], [cross])  # the report now holds the long axis alone
    assert annotate(chest, marks, tmp_path / "store", box_fill, "--overwrite") == 0
    _, second = committed(tmp_path / "store")
    assert first.signature["marks_sha256"] != second.signature["marks_sha256"]
    assert second.instances[0]["prompt_origin"]["rule"] == "lone line"


def test_a_cross_on_a_solid_spot_in_aerated_lung_is_read_in_the_lung_window(chest, tmp_path, box_fill):
    """The largest solid spot inside the real chest CT's lungs (a vessel, where a nodule would lie) gets the
    lung window; a cross on a vertebra keeps the bone window its lines' HU give."""
    from scipy import ndimage

    volume, labels = chest["volume"], chest["labels"]
    lungs = np.isin(labels, [RIGHT_LUNG, LEFT_LUNG])
    spots = []
    for z in range(volume.shape[0]):
        solid = ndimage.binary_fill_holes(lungs[z]) & ~lungs[z] & (volume.array[z] > -400)
        found, count = ndimage.label(solid)
        spots += [(int((found == i).sum()), z, found == i) for i in range(1, count + 1)]
    _, z, spot = max(spots, key=lambda s: s[0])
    spine_z, spine_long, spine_short = structure_axes(chest, 2)
    annotations = []
    for layer, at, axes in (
        ("SPOT", z, recist_axes(spot, volume.spacing[1:])),
        ("SPINE", spine_z, (spine_long, spine_short)),
    ):
        ds = chest["images"][at]
        lines = [("POLYLINE", image_xy(ds, volume, at, axis), None) for axis in axes]
        annotations.append({"image": ds, "layer": layer, "objects": lines})
    marks = tmp_path / "marks"
    marks.mkdir()
    write_gsps(marks / "pr.dcm", list(chest["images"].values()), annotations)
    assert annotate(chest, marks, tmp_path / "store", box_fill) == 0
    _, attrs = committed(tmp_path / "store")
    assert attrs.raw["ct_windows"] == {"1": [-600.0, 1500.0], "2": [400.0, 1800.0]}
