"""Physical grid matching: put a label map on an image's voxel grid, and a Volume back on its source grid."""

from __future__ import annotations

import numpy as np

from medsam_engine.pipeline.core.errors import GeometryError
from medsam_engine.pipeline.core.types import Geometry, Volume

TOLERANCE_MM = 1e-3


def align_to(labels: Volume, reference: Volume, *, what: str = "coarse mask") -> np.ndarray:
    """Return ``labels``' array on ``reference``'s (z, y, x) grid, matched through the two affines.

    The grids must coincide physically up to a permutation/flip of axes and a whole-voxel shift; a mask
    covering only part of the image (a cropped extent, as 3D Slicer writes them) is zero-padded. Anything
    that would need resampling raises GeometryError with the reason.
    """
    if labels.shape == reference.shape and np.allclose(
        labels.geometry.affine, reference.geometry.affine, atol=TOLERANCE_MM
    ):
        return labels.array
    try:
        return _placed(labels, reference, what)
    except GeometryError:
        if reference.is_2d and labels.is_2d and labels.shape == reference.shape:
            return labels.array  # 2D images carry no physical frame: pixel for pixel
        raise


def _placed(labels: Volume, reference: Volume, what: str) -> np.ndarray:
    """``labels``' array placed on ``reference``'s grid through the two affines (see :func:`align_to`)."""
    to_ref = np.linalg.inv(reference.geometry.affine) @ labels.geometry.affine  # label voxel -> ref voxel
    linear, shift = to_ref[:3, :3], to_ref[:3, 3]
    rounded = np.round(linear)
    if (
        not np.allclose(linear, rounded, atol=1e-3)
        or sorted(np.abs(rounded).sum(axis=0)) != [1, 1, 1]
        or not np.allclose(shift, np.round(shift), atol=1e-3)
    ):
        raise GeometryError(
            f"{what} is not on the image's grid (spacing {np.round(labels.spacing, 3).tolist()} vs "
            f"{np.round(reference.spacing, 3).tolist()} mm, shape {list(labels.shape)} vs "
            f"{list(reference.shape)}); resample it onto the image first"
        )
    shape = np.asarray(labels.shape)
    corners = np.array(
        [[a, b, c] for a in (0, shape[0] - 1) for b in (0, shape[1] - 1) for c in (0, shape[2] - 1)]
    )
    mapped = np.round(corners @ rounded.T + shift).astype(int)
    low, high = mapped.min(axis=0), mapped.max(axis=0)
    if np.any(low < 0) or np.any(high >= np.asarray(reference.shape)):
        raise GeometryError(
            f"{what} extends outside the image (voxels {low.tolist()}..{high.tolist()} "
            f"of an image of shape {list(reference.shape)})"
        )
    out = np.zeros(reference.shape, dtype=labels.array.dtype)
    index = np.indices(labels.shape).reshape(3, -1).T
    target = np.round(index @ rounded.T + shift).astype(int)
    out[target[:, 0], target[:, 1], target[:, 2]] = labels.array.reshape(-1)
    return out


def to_source_grid(array_zyx: np.ndarray, volume_geometry: Geometry) -> np.ndarray:
    """Inverse of the reader's canonical reorientation: a (z, y, x) array -> the input file's (i, j, k)."""
    import nibabel.orientations as nio

    canonical_ijk = np.moveaxis(array_zyx, (0, 1, 2), (2, 1, 0))
    affine_can = np.asarray(volume_geometry.affine)[:, [2, 1, 0, 3]]
    transform = nio.ornt_transform(
        nio.io_orientation(affine_can), nio.io_orientation(np.asarray(volume_geometry.source_affine))
    )
    source = nio.apply_orientation(canonical_ijk, transform)
    if tuple(source.shape[:3]) != tuple(volume_geometry.source_shape):
        raise GeometryError(
            f"cannot restore the source grid: got {source.shape[:3]}, "
            f"expected {tuple(volume_geometry.source_shape)}"
        )
    return np.ascontiguousarray(source)
