"""Fill holes slice by slice, optionally only those up to a given area in mm².

A hole is a 4-connected background region of a (y, x) slice that does not touch the slice's border (the dual
of the 8-connected foreground used elsewhere in this package).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import cv2
import numpy as np

from medsam_engine.postprocess._checks import RELATIVE_SLACK, check_mask, check_optional_number, check_spacing
from medsam_engine.postprocess._crop import map_slices

MANY_HOLES = 32  # above this many holes to fill in a plane, one look-up per pixel beats one pass per hole


def _fill_plane(plane: np.ndarray, max_pixels: float) -> np.ndarray:
    """Fill the holes of a uint8 (y, x) plane whose pixel count is at most ``max_pixels``."""
    padded = cv2.copyMakeBorder(plane, 1, 1, 1, 1, cv2.BORDER_CONSTANT, value=0)
    regions, labels = cv2.connectedComponents(1 - padded, connectivity=4, ltype=cv2.CV_32S)
    # the object (0) and the outside: no hole (OpenCV's statistics would cost more than the labelling)
    if regions <= 2:
        return plane.astype(bool)
    _, labels, stats, _ = cv2.connectedComponentsWithStats(1 - padded, connectivity=4, ltype=cv2.CV_32S)
    fill = stats[:, cv2.CC_STAT_AREA] <= max_pixels
    fill[0] = False  # label 0 is the foreground itself
    fill[labels[0, 0]] = False  # the region outside the object, reached from the padded border
    holes = np.flatnonzero(fill)
    if holes.size > MANY_HOLES:
        return (padded.astype(bool) | fill[labels])[1:-1, 1:-1]
    out = plane.astype(bool)
    for hole in holes:  # each within its own box (a hole never touches the padding: shift by one)
        x, y, w, h = (int(v) for v in stats[hole, :4])
        out[y - 1 : y - 1 + h, x - 1 : x - 1 + w] |= labels[y : y + h, x : x + w] == hole
    return out


def fill_holes_2d(
    mask: np.ndarray, *, max_area_mm2: float | None = None, spacing_yx: Sequence[float] | None = None
) -> np.ndarray:
    """Fill holes in each (y, x) slice; with ``max_area_mm2``, only holes of at most that area.

    Args:
        mask: bool array, (y, x) or (z, y, x).
        max_area_mm2: largest hole filled, in mm² (holes of exactly this area are filled, larger ones stay);
            None fills every hole.
        spacing_yx: pixel size (y, x) in mm; required when ``max_area_mm2`` is given.

    Returns:
        New bool array, same shape as ``mask``.
    """
    check_mask(mask)
    limit = check_optional_number(max_area_mm2, name="max_area_mm2")
    if limit is None:
        max_pixels = math.inf
    else:
        if spacing_yx is None:
            raise ValueError("Argument 'spacing_yx' is required when 'max_area_mm2' is given; got None.")
        sy, sx = check_spacing(spacing_yx, name="spacing_yx", ndim=2)
        max_pixels = limit / (sy * sx) * (1 + RELATIVE_SLACK)
    return map_slices(mask, lambda plane: _fill_plane(plane, max_pixels))
