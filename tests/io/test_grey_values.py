"""Modality values of real DICOM files (pydicom's test data): the whole-number rescale path (int32) gives
exactly pydicom's float arithmetic, for CT's slope/intercept, MONOCHROME1 and plain stored values."""
from __future__ import annotations

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.pixels import apply_modality_lut

from pipeline.io.dicom import _compact, grey_values

FILES = ["CT_small.dcm", "MR_small.dcm", "RG1_UNCI.dcm", "MR2_UNCI.dcm", "emri_small.dcm", "JPEG2000.dcm"]


def _reference(ds, pixels: np.ndarray) -> np.ndarray:
    """The float path: pydicom's modality transform as float32, MONOCHROME1 inverted over the stored range."""
    values = np.asarray(apply_modality_lut(pixels, ds), dtype=np.float32)
    if str(getattr(ds, "PhotometricInterpretation", "")) == "MONOCHROME1":
        bits, signed = int(ds.BitsStored), int(ds.PixelRepresentation) == 1
        stored = np.array([-(1 << (bits - 1)), (1 << (bits - 1)) - 1] if signed else [0, (1 << bits) - 1])
        low, high = np.asarray(apply_modality_lut(stored, ds), dtype=np.float32)
        values = (low + high) - values
    return values


@pytest.mark.parametrize("name", FILES)
def test_grey_values_equal_pydicoms_float_modality_transform(name):
    ds = dcmread(get_testdata_file(name))
    pixels = ds.pixel_array
    if pixels.ndim == 3:
        pixels = pixels[0]
    values = grey_values(ds, pixels)
    assert np.array_equal(values.astype(np.float64), _reference(ds, pixels).astype(np.float64)), name
    assert np.array_equal(_compact(values), _compact(_reference(ds, pixels)))


def test_a_whole_number_rescale_stays_integer_and_a_fractional_one_does_not():
    ds = dcmread(get_testdata_file("CT_small.dcm"))
    pixels = ds.pixel_array
    ds.RescaleSlope, ds.RescaleIntercept = 2, -1024
    assert grey_values(ds, pixels).dtype == np.int32
    assert np.array_equal(grey_values(ds, pixels), pixels.astype(np.int64) * 2 - 1024)
    ds.RescaleSlope = 0.5
    assert grey_values(ds, pixels).dtype == np.float32
    assert np.array_equal(grey_values(ds, pixels), _reference(ds, pixels))
