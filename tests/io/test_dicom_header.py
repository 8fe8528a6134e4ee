"""The one DICOM header entry point: pixels never read, tags on request, every failure a named ReadError."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import pytest
from pydicom.data import get_testdata_file

from medsam_engine.pipeline.core.errors import ReadError
from medsam_engine.pipeline.io.dicom_header import HeaderError, read_dicom_header

CT_SMALL = get_testdata_file("CT_small.dcm")


def test_the_header_comes_without_pixel_data():
    ds = read_dicom_header(CT_SMALL)
    assert "PixelData" not in ds
    assert ds.Modality == "CT"


def test_tags_limit_the_read_to_those_elements():
    ds = read_dicom_header(Path(CT_SMALL), tags=["SOPClassUID", "Rows"])
    assert sorted(element.keyword for element in ds) == ["Rows", "SOPClassUID", "SpecificCharacterSet"]


def _failure(path) -> HeaderError:
    with pytest.raises(HeaderError) as caught:
        read_dicom_header(path)
    return caught.value


@pytest.mark.parametrize(
    ("data", "why"),
    [
        (b"", "empty file (0 bytes)"),
        (b"not a header" * 50, "not a DICOM file"),
        (None, "cannot be read (No such file or directory)"),
    ],
    ids=["empty", "not-dicom", "missing"],
)
def test_a_failure_is_a_read_error_naming_the_file_and_why(tmp_path, data, why):
    path = tmp_path / "slice.dcm"
    if data is not None:
        path.write_bytes(data)
    error = _failure(path)
    assert isinstance(error, ReadError)
    assert error.reason.startswith(f"slice.dcm: {why}")


def test_the_failure_chains_pydicom_s_error(tmp_path):
    (tmp_path / "x.dcm").write_bytes(os.urandom(256))
    assert _failure(tmp_path / "x.dcm").__cause__ is not None


def test_a_file_without_the_dicm_marker_is_not_forced():
    assert _failure(get_testdata_file("no_meta.dcm")).why.startswith("not a DICOM file")


def test_a_header_error_survives_a_process_boundary(tmp_path):
    error = pickle.loads(pickle.dumps(_failure(tmp_path / "gone.dcm")))
    assert (error.path, error.why, error.reason) == (
        str(tmp_path / "gone.dcm"),
        "cannot be read (No such file or directory)",
        "gone.dcm: cannot be read (No such file or directory)",
    )
