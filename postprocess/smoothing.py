"""Contour smoothing by Gaussian blur: blur the mask with a sigma in mm, keep where the blur exceeds 0.5."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage

from medsam_engine.postprocess._checks import check_bool, check_mask, check_number, check_spacing
from medsam_engine.postprocess._crop import map_in_box

_TRUNCATE = 3.0  # kernel half-width in sigmas


def smooth_gaussian(
    mask: np.ndarray, *, sigma_mm: float, spacing: Sequence[float], in_plane: bool = True
) -> np.ndarray:
    """Smooth the outline: Gaussian-blur the mask (as float32) and keep voxels whose value is > 0.5.

    The sigma in voxels is ``sigma_mm / spacing`` on each axis, so the blur is isotropic in millimetres;
    with ``in_plane`` the z axis is not blurred. Outside the array counts as background. Small islands and
    thin parts (narrower than about a sigma) vanish, and narrow dents fill.

    Args:
        mask: bool array, (y, x) or (z, y, x).
        sigma_mm: standard deviation of the Gaussian in mm; 0 returns a copy.
        spacing: voxel size in mm, (z, y, x) for a volume or (y, x) for an image.
        in_plane: True blurs each (y, x) slice alone; False blurs along z too.

    Returns:
        New bool array, same shape as ``mask``.
    """
    check_mask(mask)
    sigma = check_number(sigma_mm, name="sigma_mm")
    values = check_spacing(spacing, name="spacing", ndim=mask.ndim)
    sigmas = [sigma / s for s in values]
    if check_bool(in_plane, name="in_plane") and mask.ndim == 3:
        sigmas[0] = 0.0
    if sigma == 0:
        return mask.copy()

    def blur(crop: np.ndarray) -> np.ndarray:
        smooth = ndimage.gaussian_filter(
            crop.astype(np.float32), sigma=sigmas, mode="constant", cval=0.0, truncate=_TRUNCATE
        )
        return smooth > 0.5

    return map_in_box(mask, blur)
