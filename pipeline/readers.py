"""Readers: files and DICOM series -> Volume with explicit geometry. No torch here.

Every 3D volume is brought to one canonical voxel order so the model always sees axial slices the way
radiologists display them (row 0 anterior, column 0 the patient's right; slices inferior to superior): the
array axes (x, y, z) follow L, P, S, the nearest-axis reorientation that nibabel computes from the affine
(no resampling). ``Geometry.source_affine``/``source_shape`` keep the input's own grid so exports land on it.
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from pipeline.errors import ReadError
from pipeline.types import Geometry, Volume

log = logging.getLogger(__name__)

NIFTI_SUFFIXES = (".nii", ".nii.gz")
NRRD_SUFFIXES = (".nrrd", ".nhdr")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
DICOM_SUFFIXES = (".dcm", ".dicom", ".ima")
CANONICAL_AXCODES = ("L", "P", "S")
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


def suffix_of(path: str | Path) -> str:
    name = Path(path).name.lower()
    for suffix in NIFTI_SUFFIXES + (".seg.nrrd",) + NRRD_SUFFIXES + IMAGE_SUFFIXES + DICOM_SUFFIXES:
        if name.endswith(suffix):
            return ".nrrd" if suffix == ".seg.nrrd" else suffix
    return Path(name).suffix


def stem_of(path: str | Path) -> str:
    """File name without its image suffix ('ct.nii.gz' -> 'ct', 'a.seg.nrrd' -> 'a')."""
    name = Path(path).name
    for suffix in (".seg.nrrd",) + NIFTI_SUFFIXES + NRRD_SUFFIXES + IMAGE_SUFFIXES + DICOM_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return Path(name).stem


def guess_modality(array: np.ndarray) -> str:
    """'CT' when the intensities look like Hounsfield units (air near -1000), else 'MR'."""
    if array.size == 0 or not np.issubdtype(array.dtype, np.number):
        return "OT"
    sample = array.ravel()[:: max(1, array.size // 200_000)]
    return "CT" if np.percentile(sample, 1) < -500 else "MR"


def canonical_volume(array_ijk: np.ndarray, affine_ijk: np.ndarray, *, modality: str | None,
                     source_format: str) -> Volume:
    """Reorient an (i, j, k) array with its voxel->RAS affine to canonical (z, y, x) and build the Volume."""
    import nibabel.orientations as nio

    transform = nio.ornt_transform(nio.io_orientation(affine_ijk), nio.axcodes2ornt(CANONICAL_AXCODES))
    canonical = nio.apply_orientation(array_ijk, transform)
    affine_can = affine_ijk @ nio.inv_ornt_aff(transform, array_ijk.shape[:3])
    zyx = np.ascontiguousarray(np.moveaxis(canonical, (0, 1, 2), (2, 1, 0)))
    geometry = Geometry(
        affine=affine_can[:, [2, 1, 0, 3]],
        shape=tuple(int(s) for s in zyx.shape[:3]),  # type: ignore[arg-type]
        source_affine=np.asarray(affine_ijk, dtype=float),
        source_shape=tuple(int(s) for s in array_ijk.shape[:3]),  # type: ignore[arg-type]
        source_format=source_format,
    )
    return Volume(zyx, geometry, modality or guess_modality(zyx))


def read_nifti(path: Path) -> Volume:
    import nibabel as nib

    image = nib.load(str(path))
    data = np.asanyarray(image.dataobj)
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim == 2:
        data = data[:, :, None]
    if data.ndim != 3:
        raise ReadError(f"{path.name}: NIfTI with shape {data.shape} is not a 3D volume")
    return canonical_volume(data, image.affine, modality=None, source_format="nifti")


def _nrrd_affine(header: dict, name: str) -> np.ndarray:
    directions = np.asarray(header.get("space directions"), dtype=float)
    if directions.shape != (3, 3) or not np.all(np.isfinite(directions)):
        raise ReadError(f"{name}: NRRD without 3 spatial 'space directions' (got {directions.shape})")
    origin = np.asarray(header.get("space origin", np.zeros(3)), dtype=float)
    affine = np.eye(4)
    affine[:3, :3] = directions.T
    affine[:3, 3] = origin
    space = str(header.get("space", "left-posterior-superior")).lower()
    if space in ("left-posterior-superior", "lps"):
        return LPS_TO_RAS @ affine
    if space in ("right-anterior-superior", "ras"):
        return affine
    if space in ("left-anterior-superior", "las"):
        return np.diag([-1.0, 1.0, 1.0, 1.0]) @ affine
    raise ReadError(f"{name}: NRRD space '{space}' is not supported")


def read_nrrd(path: Path) -> Volume:
    import nrrd

    data, header = nrrd.read(str(path))
    if data.ndim == 4 and data.shape[0] == 1:
        data = data[0]
        header = dict(header, **{"space directions": np.asarray(header["space directions"])[1:]})
    if data.ndim != 3:
        raise ReadError(f"{path.name}: NRRD with shape {data.shape} is not a single 3D volume "
                        "(multi-layer segmentations must be flattened first)")
    return canonical_volume(data, _nrrd_affine(header, path.name), modality=None, source_format="nrrd")


def read_image_2d(path: Path) -> Volume:
    """PNG/JPEG/TIFF/BMP (8 or 16 bit, grey or RGB) -> Volume of shape (1, H, W) or (1, H, W, 3)."""
    import cv2

    if suffix_of(path) in (".tif", ".tiff"):
        import tifffile

        data = tifffile.imread(str(path))
    else:
        data = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
        if data is None:
            raise ReadError(f"{path.name}: not a readable image")
        if data.ndim == 3:
            data = cv2.cvtColor(data[..., :3], cv2.COLOR_BGR2RGB)
    data = np.asarray(data)
    if data.ndim == 3 and data.shape[-1] == 4:
        data = data[..., :3]
    if data.ndim == 3 and data.shape[-1] == 1:
        data = data[..., 0]
    if not (data.ndim == 2 or (data.ndim == 3 and data.shape[-1] == 3)):
        raise ReadError(f"{path.name}: image of shape {data.shape} is neither grey nor RGB 2D")
    array = data[None]
    affine = np.array([[0.0, 0, 1, 0], [0, 1, 0, 0], [1, 0, 0, 0], [0, 0, 0, 1]])
    geometry = Geometry(affine=affine, shape=array.shape[:3], source_affine=np.eye(4),
                        source_shape=(array.shape[2], array.shape[1], 1), source_format="2d")
    return Volume(array, geometry, "2D")


def read_volume(path: str | Path) -> Volume:
    """Read one image or label map; raises ReadError naming the file and the reason."""
    path = Path(path)
    if not path.exists():
        raise ReadError(f"{path.name}: no such file or folder")
    suffix = suffix_of(path)
    try:
        if path.is_dir() or suffix in DICOM_SUFFIXES:
            from pipeline.dicom import read_dicom_series

            return read_dicom_series(path)
        if suffix in NIFTI_SUFFIXES:
            return read_nifti(path)
        if suffix in NRRD_SUFFIXES:
            return read_nrrd(path)
        if suffix in IMAGE_SUFFIXES:
            return read_image_2d(path)
    except ReadError:
        raise
    except Exception as exc:  # corrupt input makes third-party readers raise anything; keep the cause
        detail = str(exc)
        for where in (str(path.resolve()), str(path)):  # folders may carry names: keep only the file name
            detail = detail.replace(where, path.name)
        raise ReadError(f"{path.name}: unreadable {suffix or 'file'} ({type(exc).__name__}: {detail})") from exc
    raise ReadError(f"{path.name}: unsupported file type '{suffix}'")
