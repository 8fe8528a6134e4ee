"""Orientation: an (i, j, k) array with its voxel->RAS affine becomes a canonical (z, y, x) Volume.

Canonical order is LPS+ axis codes read as (x, y, z) = (L, P, S), stored (z, y, x); the Volume keeps the
source affine and shape so exports land on exactly the input's grid. LPS_TO_RAS turns DICOM's patient (LPS)
affines into NIfTI's RAS convention.
"""

from __future__ import annotations

import numpy as np

from medsam_engine.pipeline.core.errors import ReadError
from medsam_engine.pipeline.core.types import Geometry, Volume

CANONICAL_AXCODES = ("L", "P", "S")
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


CANONICAL_AXCODES = ("L", "P", "S")


LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


def guess_modality(array: np.ndarray) -> str:
    """'CT' when the intensities look like Hounsfield units (air near -1000), else 'MR'."""
    if array.size == 0 or not np.issubdtype(array.dtype, np.number):
        return "OT"
    sample = array.ravel()[:: max(1, array.size // 200_000)]
    return "CT" if np.percentile(sample, 1) < -500 else "MR"


def _check_affine(affine_ijk: np.ndarray) -> None:
    linear = np.asarray(affine_ijk, dtype=float)[:3, :3]
    if not np.all(np.isfinite(affine_ijk)) or abs(float(np.linalg.det(linear))) < 1e-12:
        spacing = (
            ", ".join(f"{v:g}" for v in np.linalg.norm(linear, axis=0))
            if np.all(np.isfinite(linear))
            else "not finite"
        )
        raise ReadError(
            f"the voxel-to-world transform is degenerate (voxel spacing {spacing} mm): zero, "
            "missing or non-finite spacing or orientation in the header"
        )


def _transform(affine_ijk: np.ndarray) -> np.ndarray:
    import nibabel.orientations as nio

    transform: np.ndarray = nio.ornt_transform(
        nio.io_orientation(affine_ijk), nio.axcodes2ornt(CANONICAL_AXCODES)
    )
    return transform


def canonical_flips(affine_ijk: np.ndarray) -> tuple[bool, bool, bool] | None:
    """Whether each of i, j, k is reversed on the way to the canonical order, when that order keeps the
    axes in place (the usual axial series); None when it swaps axes (or the affine is degenerate). A reader
    that writes its array with these flips already applied passes ``flipped=True`` to
    :func:`canonical_volume` and saves the reorienting copy."""
    try:
        _check_affine(affine_ijk)
    except ReadError:
        return None
    transform = _transform(affine_ijk)
    if [int(a) for a in transform[:, 0]] != [0, 1, 2]:
        return None
    return tuple(bool(f < 0) for f in transform[:, 1])  # type: ignore[return-value]


def canonical_volume(
    array_ijk: np.ndarray,
    affine_ijk: np.ndarray,
    *,
    modality: str | None,
    source_format: str,
    flipped: bool = False,
) -> Volume:
    """Reorient an (i, j, k) array with its voxel->RAS affine to canonical (z, y, x) and build the Volume.

    ``flipped``: the array is already reversed along the axes :func:`canonical_flips` names for this affine
    (the affine still describes the unflipped array, which the Volume keeps as its source grid)."""
    import nibabel.orientations as nio

    _check_affine(affine_ijk)
    transform = _transform(affine_ijk)
    if flipped:
        if [int(a) for a in transform[:, 0]] != [0, 1, 2]:
            raise ValueError("flipped=True for an affine whose canonical order swaps axes")
        canonical = array_ijk
    else:
        canonical = nio.apply_orientation(array_ijk, transform)
    affine_can = affine_ijk @ nio.inv_ornt_aff(transform, array_ijk.shape[:3])
    zyx = np.moveaxis(canonical, (0, 1, 2), (2, 1, 0))
    affine_zyx = affine_can[:, [2, 1, 0, 3]]
    if zyx.shape[0] != 1 and 1 in zyx.shape[1:3]:
        zyx, affine_zyx = _single_slice_first(zyx, affine_zyx)
    zyx = np.ascontiguousarray(zyx)
    geometry = Geometry(
        affine=affine_zyx,
        shape=tuple(int(s) for s in zyx.shape[:3]),  # type: ignore[arg-type]
        source_affine=np.asarray(affine_ijk, dtype=float),
        source_shape=tuple(int(s) for s in array_ijk.shape[:3]),  # type: ignore[arg-type]
        source_format=source_format,
    )
    return Volume(zyx, geometry, modality or guess_modality(zyx))


def _single_slice_first(zyx: np.ndarray, affine_zyx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A single sagittal or coronal slice as one (1, rows, cols) image: rows run superior -> inferior.

    The canonical (z, y, x) order would spread such a slice over many one-voxel-wide axial slices.
    """
    single = 1 if zyx.shape[1] == 1 else 2
    other = 2 if single == 1 else 1
    order = [single, 0, other, *list(range(3, zyx.ndim))]
    array = np.transpose(zyx, order)[:, ::-1]
    affine = affine_zyx.copy()
    affine[:, :3] = affine_zyx[:, [single, 0, other]]
    affine[:, 3] = affine[:, 3] + affine[:, 1] * (array.shape[1] - 1)
    affine[:, 1] = -affine[:, 1]
    return array, affine
