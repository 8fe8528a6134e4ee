"""DICOM -> Volume on real files: every transfer syntax, enhanced multi-frame, series geometry rules."""

from __future__ import annotations

import shutil

import numpy as np
import pydicom
import pytest
from conftest import write_ct_series
from pydicom.data import get_testdata_file
from pydicom.uid import JPEG2000Lossless, JPEGLSLossless, RLELossless

from medsam_engine.pipeline.core.errors import ReadError
from medsam_engine.pipeline.core.geometry import to_source_grid
from medsam_engine.pipeline.core.orientation import LPS_TO_RAS
from medsam_engine.pipeline.io.readers import read_volume


@pytest.mark.parametrize(
    "name",
    [
        "MR_small_RLE.dcm",
        "MR_small_jp2klossless.dcm",
        "MR_small_jpeg_ls_lossless.dcm",
        "MR_small_bigendian.dcm",
        "MR_small_implicit.dcm",
        "MR_small_expb.dcm",
    ],
)
def test_every_mr_small_syntax_reads_like_the_uncompressed_file(name):
    reference = read_volume(get_testdata_file("MR_small.dcm"))
    volume = read_volume(get_testdata_file(name))
    assert volume.modality == "MR"
    assert volume.shape == reference.shape
    assert np.array_equal(volume.array, reference.array)
    assert np.allclose(volume.geometry.affine, reference.geometry.affine)


@pytest.mark.parametrize(
    "compressed, raw",
    [
        ("693_J2KR.dcm", "693_UNCR.dcm"),
        ("MR2_J2KR.dcm", "MR2_UNCR.dcm"),
        ("emri_small_RLE.dcm", "emri_small.dcm"),
        ("emri_small_jpeg_ls_lossless.dcm", "emri_small.dcm"),
    ],
)
def test_pydicom_data_lossless_files_match_their_uncompressed_twins(compressed, raw):
    decoded = read_volume(get_testdata_file(compressed))
    assert np.array_equal(decoded.array, read_volume(get_testdata_file(raw)).array)


def test_jpeg_lossless_process_14_decodes():
    volume = read_volume(get_testdata_file("JPGLosslessP14SV1_1s_1f_8b.dcm"))
    raw = pydicom.dcmread(get_testdata_file("JPGLosslessP14SV1_1s_1f_8b.dcm"))
    assert volume.shape == (1, raw.Rows, raw.Columns)
    assert volume.array.std() > 0
    assert volume.array.dtype == np.uint8  # 8-bit data stays 8-bit, like a PNG


@pytest.mark.parametrize("syntax", [RLELossless, JPEGLSLossless, JPEG2000Lossless])
def test_compressed_multi_file_ct_series_round_trips_exactly(tmp_path, chest_volume, syntax):
    write_ct_series(chest_volume, tmp_path / "s", series_uid="1.2.826.0.1.3680043.8.498.81", syntax=syntax)
    volume = read_volume(tmp_path / "s")
    assert volume.modality == "CT"
    assert np.array_equal(volume.array, chest_volume.array)
    assert np.allclose(volume.geometry.affine, chest_volume.geometry.affine, atol=1e-3)


def test_enhanced_ct_uses_per_frame_positions_and_rescale():
    path = get_testdata_file("eCT_Supplemental.dcm")
    ds = pydicom.dcmread(path)
    volume = read_volume(path)
    assert volume.modality == "CT"
    assert volume.shape == (2, 512, 512)
    assert volume.array.min() == -1024  # per-frame Rescale Intercept applied (stored values start at 0)
    assert volume.spacing == pytest.approx((10.0, 0.388672, 0.388672), rel=1e-5)
    for frame in ds.PerFrameFunctionalGroupsSequence:  # each frame's first pixel lands at its own position
        lps = np.asarray(frame.PlanePositionSequence[0].ImagePositionPatient, dtype=float)
        zyx = np.linalg.inv(volume.geometry.affine) @ np.append(LPS_TO_RAS[:3, :3] @ lps, 1)
        assert np.allclose(zyx[:3], np.round(zyx[:3]), atol=1e-3)


def test_monochrome1_radiograph_is_inverted_over_the_stored_range():
    path = get_testdata_file("RG1_J2KR.dcm")
    ds = pydicom.dcmread(path)
    volume = read_volume(path)
    stored = ds.pixel_array.astype(np.int64)
    assert volume.shape == (1, ds.Rows, ds.Columns)
    assert volume.modality == "CR"
    assert np.array_equal(volume.array[0], (1 << ds.BitsStored) - 1 - stored)


def test_colour_ultrasound_and_palette_frames_become_rgb_stacks():
    rgb = read_volume(get_testdata_file("US1_J2KR.dcm"))
    assert rgb.array.shape == (1, 480, 640, 3)
    assert rgb.array.dtype == np.uint8
    assert rgb.modality == "US"
    palette = read_volume(get_testdata_file("OBXXXX1A_rle_2frame.dcm"))
    assert palette.array.shape == (2, 600, 800, 3)
    assert palette.array.dtype == np.uint8
    frames = read_volume(get_testdata_file("SC_rgb_rle_2frame.dcm"))
    assert frames.array.shape == (2, 100, 100, 3)
    assert np.array_equal(to_source_grid(frames.array, frames.geometry).shape[:3], (100, 100, 2))


def test_spacing_comes_from_positions_not_the_spacing_tag(tmp_path, chest_volume):
    write_ct_series(
        chest_volume, tmp_path / "s", series_uid="1.2.826.0.1.3680043.8.498.82", spacing_between_slices=99.0
    )
    assert read_volume(tmp_path / "s").spacing == pytest.approx(chest_volume.spacing, rel=1e-4)


def test_oblique_series_keeps_its_rotated_affine(tmp_path, chest_volume):
    angle = np.deg2rad(20)
    rotation = np.eye(4)
    rotation[:2, :2] = [[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]]
    lps = rotation @ np.diag([-1.0, -1.0, 1.0, 1.0]) @ chest_volume.geometry.affine
    write_ct_series(chest_volume, tmp_path / "s", series_uid="1.2.826.0.1.3680043.8.498.83", affine_lps=lps)
    volume = read_volume(tmp_path / "s")
    assert np.array_equal(volume.array, chest_volume.array)
    assert np.allclose(volume.geometry.affine, LPS_TO_RAS @ lps, atol=1e-3)


def test_missing_slices_are_refused_with_the_positions(tmp_path, chest_volume):
    write_ct_series(chest_volume, tmp_path / "s", series_uid="1.2.826.0.1.3680043.8.498.84", slices=[0, 1, 3])
    with pytest.raises(ReadError, match=r"1 slice missing between z=-?\d+\.\d\d mm and z=-?\d+\.\d\d mm"):
        read_volume(tmp_path / "s")


def test_repeated_positions_are_refused_but_duplicate_files_are_not(tmp_path, chest_volume):
    files = write_ct_series(chest_volume, tmp_path / "s", series_uid="1.2.826.0.1.3680043.8.498.85")
    shutil.copy(files[0], tmp_path / "s" / "same-instance-again")
    assert read_volume(tmp_path / "s").shape == chest_volume.shape
    second_echo = pydicom.dcmread(files[0])
    second_echo.SOPInstanceUID = "1.2.826.0.1.3680043.8.498.86"
    second_echo.file_meta.MediaStorageSOPInstanceUID = second_echo.SOPInstanceUID
    second_echo.save_as(str(tmp_path / "s" / "echo2"))
    with pytest.raises(ReadError, match="2 slices share a position"):
        read_volume(tmp_path / "s")


def test_single_sagittal_slice_is_one_image_not_a_stack_of_lines():
    root = pydicom.data.get_testdata_file("dicomdirtests")
    volume = read_volume(f"{root}/98892003/MR1/15820")
    assert volume.shape == (1, 16, 16)


def test_unsupported_transfer_syntax_is_named(tmp_path):
    from pydicom.encaps import encapsulate

    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    ds.PixelData = encapsulate([ds.PixelData])
    ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.100"  # MPEG2: no decoder exists
    ds.save_as(str(tmp_path / "mpeg.dcm"))
    with pytest.raises(ReadError, match="unsupported transfer syntax MPEG2"):
        read_volume(tmp_path / "mpeg.dcm")


def _turn(degrees: float, axes: tuple[int, int]) -> np.ndarray:
    turn, (a, b), angle = np.eye(4), axes, np.deg2rad(degrees)
    turn[[a, a, b, b], [a, b, a, b]] = [np.cos(angle), -np.sin(angle), np.sin(angle), np.cos(angle)]
    return turn


@pytest.mark.parametrize(
    "name, change",
    [
        ("axial", np.eye(4)),
        ("feet first", np.diag([1.0, 1.0, -1.0, 1.0])),  # slices run the other way along the normal
        ("mirrored rows", np.diag([1.0, -1.0, 1.0, 1.0])),
        ("oblique", _turn(20, (0, 1))),
        ("sagittal", _turn(90, (0, 2))),  # the canonical order swaps axes: the reorienting copy as before
        ("coronal", _turn(90, (1, 2))),
    ],
)
def test_series_flipped_while_stacked_equal_the_reoriented_stack(
    tmp_path, chest_volume, monkeypatch, name, change
):
    """An axial series is reoriented as its planes are written into the stack; the Volume (array, its
    layout, geometry and source grid) is exactly the one the separate reorienting copy made."""
    import medsam_engine.pipeline.io.dicom as dicom

    lps = change @ np.diag([-1.0, -1.0, 1.0, 1.0]) @ chest_volume.geometry.affine
    write_ct_series(chest_volume, tmp_path / "s", series_uid="1.2.826.0.1.3680043.8.498.84", affine_lps=lps)
    fast = read_volume(tmp_path / "s")
    monkeypatch.setattr(dicom, "canonical_flips", lambda affine: None)
    plain = read_volume(tmp_path / "s")
    assert fast.array.dtype == plain.array.dtype
    assert fast.array.flags.c_contiguous
    assert np.array_equal(fast.array, plain.array)
    for field in ("affine", "source_affine"):
        assert np.array_equal(getattr(fast.geometry, field), getattr(plain.geometry, field)), field
    assert fast.geometry.shape == plain.geometry.shape
    assert fast.geometry.source_shape == plain.geometry.source_shape
    assert fast.geometry.source_format == plain.geometry.source_format
    assert fast.modality == plain.modality
