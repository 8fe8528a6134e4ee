"""Reading marks' files: headers come through the engine's one DICOM header reader, failures named."""

from __future__ import annotations

import pytest

from medsam_engine.detectors.marks_files import case_planes, read_marks
from medsam_engine.pipeline.core.errors import ReadError


def test_a_file_that_is_not_dicom_is_skipped_with_its_name_and_why(tmp_path):
    (tmp_path / "notes.txt").write_text("key slice 12")
    skipped = read_marks([str(tmp_path)])[2]
    assert skipped == ["notes.txt: not a DICOM file (no 'DICM' marker and no DICOM header)"]


def test_a_case_file_that_cannot_be_read_is_a_read_error(tmp_path):
    with pytest.raises(ReadError, match=r"^gone\.dcm: cannot be read"):
        case_planes((str(tmp_path / "gone.dcm"),))
