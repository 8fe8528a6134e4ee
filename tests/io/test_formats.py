"""One table of input formats: what a file's name says, for discovery, readers, warm-up and the plan alike."""

from __future__ import annotations

import pytest

from medsam_engine.pipeline.core.types import CaseRef
from medsam_engine.pipeline.io.formats import DICOM, IMAGE_2D, NIFTI, NRRD, format_of, stem_of, suffix_of
from medsam_engine.pipeline.io.readers import libraries_for


@pytest.mark.parametrize(
    ("name", "fmt", "suffix", "stem"),
    [
        ("ct.nii.gz", NIFTI, ".nii.gz", "ct"),
        ("CT.NII", NIFTI, ".nii", "CT"),
        ("lungs.seg.nrrd", NRRD, ".nrrd", "lungs"),
        ("scan.nhdr", NRRD, ".nhdr", "scan"),
        ("tile.tiff", IMAGE_2D, ".tiff", "tile"),
        ("IM0001.dcm", DICOM, ".dcm", "IM0001"),
        ("IM0001", None, "", "IM0001"),
        ("notes.txt", None, ".txt", "notes"),
        ("case_0000.nii.gz", NIFTI, ".nii.gz", "case_0000"),
    ],
)
def test_a_file_name_says_its_format(name, fmt, suffix, stem):
    assert format_of(name) is fmt
    assert suffix_of(name) == suffix
    assert stem_of(name) == stem


def test_reader_warm_up_imports_the_libraries_of_the_formats_read():
    cases = [CaseRef("a", "ct.nii.gz"), CaseRef("b", "tile.png"), CaseRef("c", "folder", files=("x.dcm",))]
    assert libraries_for(cases) == (*IMAGE_2D.libraries, *DICOM.libraries, *NIFTI.libraries)
    assert libraries_for(None) == (*DICOM.libraries, *NIFTI.libraries)
