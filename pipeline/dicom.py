"""DICOM series -> Volume: slices sorted along the normal, spacing from positions, HU via the modality LUT."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from pipeline.errors import ReadError
from pipeline.types import Volume

LOCALIZER_TYPES = {"LOCALIZER", "SCOUT"}


def _is_localizer(ds) -> bool:
    image_type = {str(v).upper() for v in (getattr(ds, "ImageType", None) or [])}
    return bool(image_type & LOCALIZER_TYPES)


def _series_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    files = sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))
    if not files:
        raise ReadError(f"{path.name}: folder holds no files")
    return files


def _headers(files: list[Path]) -> list:
    import pydicom
    from pydicom.errors import InvalidDicomError

    headers = []
    for file in files:
        try:
            ds = pydicom.dcmread(str(file), stop_before_pixels=True)
        except (InvalidDicomError, OSError, EOFError, ValueError):
            continue
        if "Rows" in ds and "Columns" in ds:
            headers.append((file, ds))
    return headers


def _pick_series(headers: list, name: str) -> list:
    groups: dict[tuple, list] = {}
    for file, ds in headers:
        if _is_localizer(ds):
            continue
        orientation = tuple(np.round(np.asarray(getattr(ds, "ImageOrientationPatient", [1, 0, 0, 0, 1, 0]),
                                                dtype=float), 3))
        key = (str(getattr(ds, "SeriesInstanceUID", "")), orientation, int(ds.Rows), int(ds.Columns))
        groups.setdefault(key, []).append((file, ds))
    if not groups:
        raise ReadError(f"{name}: no DICOM image slices found")
    if len(groups) > 1:
        sizes = sorted((len(v) for v in groups.values()), reverse=True)
        raise ReadError(f"{name}: holds {len(groups)} series or orientations (sizes {sizes}); "
                        "give one series per input")
    return next(iter(groups.values()))


def _pixels(ds, name: str) -> np.ndarray:
    from pydicom.pixels import apply_modality_lut

    try:
        pixels = ds.pixel_array
    except Exception as exc:  # decoders raise many types; the message names the syntax
        syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", "unknown")
        raise ReadError(f"{name}: pixel data could not be decoded (transfer syntax {syntax}: {exc})") from exc
    if int(getattr(ds, "NumberOfFrames", 1) or 1) > 1:
        raise ReadError(f"{name}: multi-frame DICOM is not supported by this reader yet")
    values = apply_modality_lut(pixels, ds).astype(np.float32)
    if str(getattr(ds, "PhotometricInterpretation", "")) == "MONOCHROME1":
        values = values.max() + values.min() - values
    return values


def read_dicom_series(path: Path) -> Volume:
    """Read one series (a folder or a single file) into a canonical Volume; see readers.canonical_volume."""
    import pydicom

    from pipeline.readers import LPS_TO_RAS, canonical_volume

    name = path.name
    slices = _pick_series(_headers(_series_files(path)), name)
    first = slices[0][1]
    orientation = np.asarray(getattr(first, "ImageOrientationPatient", [1, 0, 0, 0, 1, 0]), dtype=float)
    row_dir, col_dir = orientation[:3], orientation[3:]
    normal = np.cross(row_dir, col_dir)
    positions = [np.asarray(getattr(ds, "ImagePositionPatient", [0, 0, 0]), dtype=float) for _, ds in slices]
    order = np.argsort([float(p @ normal) for p in positions])
    slices = [slices[i] for i in order]
    positions = [positions[i] for i in order]
    row_spacing, col_spacing = (float(v) for v in getattr(first, "PixelSpacing", [1.0, 1.0]))
    if len(slices) > 1:
        steps = np.diff([p @ normal for p in positions])
        if np.any(steps <= 1e-4):
            raise ReadError(f"{name}: {int(np.sum(steps <= 1e-4)) + 1} slices share a position")
        median = float(np.median(steps))
        gaps = np.nonzero(steps > 1.5 * median)[0]
        if gaps.size:
            raise ReadError(f"{name}: slices missing between positions {gaps[0]} and {gaps[0] + 1} "
                            f"(step {steps[gaps[0]]:.2f} mm, median {median:.2f} mm)")
        slice_vector = (positions[-1] - positions[0]) / (len(slices) - 1)
    else:
        slice_vector = normal * float(getattr(first, "SliceThickness", 1.0) or 1.0)
    stack = np.stack([_pixels(pydicom.dcmread(str(f)), name) for f, _ in slices])  # (k, rows, cols)
    affine_lps = np.eye(4)
    affine_lps[:3, 0] = row_dir * col_spacing  # i: column index
    affine_lps[:3, 1] = col_dir * row_spacing  # j: row index
    affine_lps[:3, 2] = slice_vector
    affine_lps[:3, 3] = positions[0]
    array_ijk = np.transpose(stack, (2, 1, 0))
    modality = str(getattr(first, "Modality", "OT"))
    return canonical_volume(array_ijk, LPS_TO_RAS @ affine_lps, modality=modality if modality in ("CT", "MR")
                            else None, source_format="dicom")
