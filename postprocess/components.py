"""Connected-component clean-up, per slice, with sizes in mm². Pure numpy/scipy; inputs never mutated."""
from __future__ import annotations

import numpy as np
from scipy import ndimage


def remove_small_components_2d(mask: np.ndarray, *, min_area_mm2: float,
                               spacing_yx: tuple[float, float]) -> np.ndarray:
    """Drop 8-connected components smaller than ``min_area_mm2`` from each (y, x) slice of a bool mask.

    ``mask`` is (y, x) or (z, y, x) boolean; ``spacing_yx`` is the pixel size in mm. Returns a new array.
    """
    if min_area_mm2 <= 0:
        return mask.copy()
    pixel_area = float(spacing_yx[0]) * float(spacing_yx[1])
    min_pixels = min_area_mm2 / pixel_area
    slices = mask[None] if mask.ndim == 2 else mask
    out = np.zeros_like(slices, dtype=bool)
    structure = np.ones((3, 3), dtype=bool)
    for z, plane in enumerate(slices):
        if not plane.any():
            continue
        labels, count = ndimage.label(plane, structure=structure)
        sizes = np.bincount(labels.ravel(), minlength=count + 1)
        keep = sizes >= min_pixels
        keep[0] = False
        out[z] = keep[labels]
    return out[0] if mask.ndim == 2 else out
