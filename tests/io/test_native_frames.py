"""The reader's own decoding of uncompressed greyscale frames equals pydicom's ``pixel_array`` on every such
file of pydicom's and pydicom-data's test sets (8/16-bit, signed and unsigned, unused high bits masked or
sign-extended), and leaves everything else to pydicom."""

from __future__ import annotations

import warnings
from pathlib import Path

import data_store
import numpy as np
import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.data.data_manager import DATA_ROOT

from medsam_engine.pipeline.io.dicom import native_grey_frame


def _datasets():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the sets hold deliberately broken files
        # the files on disk (pydicom's get_testdata_files would first try to download more)
        local = [
            *Path(DATA_ROOT, "test_files").rglob("*.dcm"),
            *Path(data_store.__file__).parent.rglob("*.dcm"),
        ]
        for path in sorted(map(str, local)):
            try:
                yield path, dcmread(path)
            except Exception:
                continue


def test_native_frames_equal_pydicoms_pixel_array():
    read, shifted = 0, 0
    for path, ds in _datasets():
        plane = native_grey_frame(ds)
        if plane is None:
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            reference = ds.pixel_array
        assert plane.dtype == reference.dtype, path
        assert np.array_equal(plane, reference), path
        assert plane.flags.writeable
        read += 1
        shifted += int(ds.BitsStored) < int(ds.BitsAllocated)
    assert read >= 15, (read, shifted)
    assert shifted >= 8, (read, shifted)  # 21 and 11 with pydicom 3.0 and pydicom-data 1.0


@pytest.mark.parametrize("name", ["JPEG2000.dcm", "SC_rgb.dcm", "emri_small.dcm", "MR_small_bigendian.dcm"])
def test_compressed_colour_multiframe_and_big_endian_data_are_left_to_pydicom(name):
    assert native_grey_frame(dcmread(get_testdata_file(name))) is None


def test_pixel_data_shorter_than_the_frame_is_left_to_pydicom():
    ds = dcmread(get_testdata_file("CT_small.dcm"))
    ds.PixelData = ds.PixelData[:-2]
    assert native_grey_frame(ds) is None
