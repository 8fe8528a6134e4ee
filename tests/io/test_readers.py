"""Readers give canonical (z, y, x) volumes whose source grid is restored exactly."""

from __future__ import annotations

import nibabel as nib
import nrrd
import numpy as np
import pytest

from medsam_engine.pipeline.core.errors import ReadError
from medsam_engine.pipeline.core.geometry import align_to, to_source_grid
from medsam_engine.pipeline.io.readers import read_volume


def test_lps_nrrd_with_negative_directions_is_reoriented_and_restored(chest_ct):
    raw, _header = nrrd.read(str(chest_ct[0]))
    volume = read_volume(chest_ct[0])
    assert volume.modality == "CT"
    assert volume.shape == (34, 128, 128)
    assert volume.spacing == pytest.approx((10.0, 3.046876, 3.046876), rel=1e-5)
    # canonical: x to the patient's left, y to posterior, z to superior (RAS signs -, -, +)
    assert volume.geometry.affine[0, 2] < 0
    assert volume.geometry.affine[1, 1] < 0
    assert volume.geometry.affine[2, 0] > 0
    assert np.array_equal(to_source_grid(volume.array, volume.geometry), raw)


def test_same_voxel_world_position_after_reorientation(chest_ct):
    raw, header = nrrd.read(str(chest_ct[0]))
    volume = read_volume(chest_ct[0])
    i, j, k = 10, 100, 7
    lps = np.asarray(header["space origin"]) + np.asarray(header["space directions"]).T @ [i, j, k]
    ras = lps * [-1, -1, 1]
    zyx = np.linalg.inv(volume.geometry.affine) @ np.append(ras, 1)
    z, y, x = np.round(zyx[:3]).astype(int)
    assert volume.array[z, y, x] == raw[i, j, k]


def test_nifti_mask_matches_nrrd_image_through_affines(small_chest, small_chest_nifti):
    image = read_volume(small_chest[0])
    mask_nifti = read_volume(small_chest_nifti[1])
    mask_nrrd = read_volume(small_chest[1])
    assert np.array_equal(align_to(mask_nifti, image), align_to(mask_nrrd, image))


def test_permuted_nifti_mask_is_matched_whatever_the_axis_order(tmp_path, small_chest):
    image = read_volume(small_chest[0])
    labels = read_volume(small_chest[1])
    ijk = np.moveaxis(labels.array, (0, 1, 2), (2, 1, 0))
    affine = labels.geometry.affine[:, [2, 1, 0, 3]]
    permuted = np.transpose(ijk, (2, 0, 1))  # store as (z, x, y)
    nib.save(nib.Nifti1Image(permuted.astype(np.uint8), affine[:, [2, 0, 1, 3]]), str(tmp_path / "p.nii.gz"))
    assert np.array_equal(align_to(read_volume(tmp_path / "p.nii.gz"), image), labels.array)


def test_mask_on_another_grid_is_a_geometry_error(tmp_path, small_chest):
    from medsam_engine.pipeline.core.errors import GeometryError

    image = read_volume(small_chest[0])
    nib.save(
        nib.Nifti1Image(np.zeros((64, 64, 4), np.uint8), np.diag([6.0, 6.0, 10.0, 1.0])),
        str(tmp_path / "coarse.nii.gz"),
    )
    with pytest.raises(GeometryError, match="not on the image's grid"):
        align_to(read_volume(tmp_path / "coarse.nii.gz"), image)


def test_png_grey_and_rgb_are_single_slice_volumes(tmp_path, nuclei_2d):
    import cv2

    grey = read_volume(nuclei_2d[0])
    assert grey.shape == (1, 256, 256)
    assert grey.modality == "2D"
    assert grey.array.dtype == np.uint8
    rgb = np.stack([grey.array[0], grey.array[0] // 2, 255 - grey.array[0]], axis=-1)
    cv2.imwrite(str(tmp_path / "rgb.png"), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    colour = read_volume(tmp_path / "rgb.png")
    assert colour.array.shape == (1, 256, 256, 3)
    assert np.array_equal(colour.array[0], rgb)


def test_dicom_single_file_reads_hounsfield_units():
    from pydicom.data import get_testdata_file

    volume = read_volume(get_testdata_file("CT_small.dcm"))
    assert volume.modality == "CT"
    assert volume.shape == (1, 128, 128)
    assert volume.array.min() < -500  # rescale applied: air is negative HU


@pytest.mark.parametrize("content", [b"", b"not an image at all", b"\x89PNG\r\n\x1a\n" + b"\x00" * 20])
def test_unreadable_files_raise_read_error_naming_the_file(tmp_path, content):
    path = tmp_path / "broken.png"
    path.write_bytes(content)
    with pytest.raises(ReadError, match=r"broken.png"):
        read_volume(path)


def test_truncated_nifti_is_a_read_error(tmp_path, small_chest_nifti):
    data = small_chest_nifti[0].read_bytes()
    (tmp_path / "cut.nii.gz").write_bytes(data[: len(data) // 3])
    with pytest.raises(ReadError, match=r"cut.nii.gz"):
        read_volume(tmp_path / "cut.nii.gz")


def test_dicom_series_sorted_by_position_not_instance_number(small_chest, small_chest_dicom):
    expected = read_volume(small_chest[0])
    volume = read_volume(small_chest_dicom)
    assert volume.modality == "CT"
    assert np.array_equal(volume.array, expected.array)
    assert np.allclose(volume.geometry.affine, expected.geometry.affine, atol=1e-3)


def test_16_bit_tiff_reads_as_one_slice(tmp_path):
    from pathlib import Path

    import stardist
    import tifffile

    source = Path(stardist.__file__).parent / "data" / "images" / "img2d.tif"
    data = tifffile.imread(str(source))[:64, :64]
    tifffile.imwrite(str(tmp_path / "crop.tif"), data.astype(np.uint16))
    volume = read_volume(tmp_path / "crop.tif")
    assert volume.shape == (1, 64, 64)
    assert volume.array.dtype == np.uint16
    assert np.array_equal(volume.array[0], data.astype(np.uint16))
