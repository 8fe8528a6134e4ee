"""The input formats the engine reads, in one table: each format's name, file suffixes and the libraries its
reader imports. Discovery, the readers, the reader processes' warm-up and the run's plan (slice counts from
headers) all ask :func:`format_of`; archives (pipeline/io/archives.py) are unpacked before any of them."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class InputFormat:
    """A file format: ``name``, the ``suffixes`` that name its files (lower case, longest first where one
    ends another) and the ``libraries`` its reader imports."""

    name: str
    suffixes: tuple[str, ...]
    libraries: tuple[str, ...]


NIFTI = InputFormat("nifti", (".nii.gz", ".nii"), ("nibabel", "isal.isal_zlib"))
NRRD = InputFormat("nrrd", (".seg.nrrd", ".nrrd", ".nhdr"), ("nrrd",))
IMAGE_2D = InputFormat("2d", (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp"), ("cv2",))
DICOM = InputFormat("dicom", (".dcm", ".dicom", ".ima"), ("pydicom",))
FORMATS = (NIFTI, NRRD, IMAGE_2D, DICOM)
VOLUMES = (NIFTI, NRRD, IMAGE_2D)  # one file, one image (DICOM files group into series)

_BY_SUFFIX = sorted(((s, f) for f in FORMATS for s in f.suffixes), key=lambda item: -len(item[0]))


def format_of(path: str | Path) -> InputFormat | None:
    """The format a file's name says (``a.seg.nrrd`` is NRRD, ``ct.nii.gz`` NIfTI); None for any other name
    (DICOM files often have none: pipeline/io/readers.has_dicom_marker looks inside)."""
    name = Path(path).name.lower()
    return next((fmt for suffix, fmt in _BY_SUFFIX if name.endswith(suffix)), None)


def suffix_of(path: str | Path) -> str:
    """The suffix that names the file's format (``.nrrd`` for ``.seg.nrrd``), else its last suffix."""
    name = Path(path).name.lower()
    for suffix, fmt in _BY_SUFFIX:
        if name.endswith(suffix):
            return ".nrrd" if fmt is NRRD and suffix == ".seg.nrrd" else suffix
    return Path(name).suffix


def stem_of(path: str | Path) -> str:
    """File name without its format's suffix ('ct.nii.gz' -> 'ct', 'a.seg.nrrd' -> 'a')."""
    name = Path(path).name
    for suffix, _ in _BY_SUFFIX:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return Path(name).stem
