"""Modality values of real DICOM files (pydicom's test data): the whole-number rescale path (int32) gives
exactly pydicom's float arithmetic, for CT's slope/intercept, MONOCHROME1 and plain stored values."""

from __future__ import annotations

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.pixels import apply_modality_lut

from medsam_engine.pipeline.io.dicom import _compact, grey_values

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


@pytest.mark.parametrize(
    "name, slope, intercept, dtype",
    [
        ("CT_small.dcm", 1, -1024, None),  # int16 stored, CT's usual rescale: written straight into int16
        ("CT_small.dcm", 1, 0, np.uint16),  # unsigned stored values
        ("CT_small.dcm", 1, 40000, None),  # beyond int16: float32, as the general path gives
        ("CT_small.dcm", 2, -1024, None),  # a slope: the general path
        ("RG1_UNCI.dcm", 1, 0, None),  # MONOCHROME1: the general path
    ],
)
def test_a_series_stack_equals_the_modality_values_compacted(name, slope, intercept, dtype):
    """The series stack taken straight from the stored values equals grey_values + _compact_stack, for
    every combination of flips, dtype and all."""
    import itertools

    from medsam_engine.pipeline.io.dicom import _compact_stack, _modality_stack

    ds = dcmread(get_testdata_file(name))
    ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
    pixels = ds.pixel_array
    frames = [(ds, (pixels if dtype is None else np.abs(pixels).astype(dtype)) + k) for k in range(3)]
    for flips in [None, *itertools.product([False, True], repeat=3)]:
        expected = _compact_stack([grey_values(d, p) for d, p in frames], flips)
        got = _modality_stack(frames, flips)
        assert got.dtype == expected.dtype, flips
        assert np.array_equal(got, expected), flips
