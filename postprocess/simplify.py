"""Contour smoothing by polygon simplification, slice by slice, with a tolerance in mm.

Each slice's outlines (outer borders and hole borders, nested to any depth) are traced with OpenCV,
simplified with Douglas-Peucker in millimetre coordinates (so anisotropic pixels are handled) and filled
back.
"""

from __future__ import annotations

from collections.abc import Sequence

import cv2
import numpy as np

from medsam_engine.postprocess._checks import check_mask, check_number, check_spacing
from medsam_engine.postprocess._crop import map_slices


def _depths(parents: np.ndarray) -> np.ndarray:
    """Nesting depth of each contour given its parent index (-1 for none): 0 outer, 1 hole, 2 island..."""
    depth = np.zeros(parents.shape, dtype=int)
    current = parents.copy()
    while (current >= 0).any():
        inside = current >= 0
        depth[inside] += 1
        current[inside] = parents[current[inside]]
    return depth


def _simplify(contour: np.ndarray, scale_xy: np.ndarray, tolerance_mm: float) -> np.ndarray:
    """Douglas-Peucker on an OpenCV (n, 1, 2) int (x, y) contour, in mm; returns int32 (m, 2) pixels."""
    points = contour.reshape(-1, 2).astype(np.float32) * scale_xy
    kept = cv2.approxPolyDP(points, epsilon=tolerance_mm, closed=True).reshape(-1, 2)
    return np.rint(kept / scale_xy).astype(np.int32)


def _simplify_plane(plane: np.ndarray, scale_xy: np.ndarray, tolerance_mm: float) -> np.ndarray:
    contours, hierarchy = cv2.findContours(plane, cv2.RETR_TREE, cv2.CHAIN_APPROX_NONE)
    out = np.zeros_like(plane)
    if not contours:
        return out
    depth = _depths(hierarchy[0][:, 3])
    for level in range(int(depth.max()) + 1):
        polygons = [_simplify(contours[i], scale_xy, tolerance_mm) for i in np.flatnonzero(depth == level)]
        if level % 2 == 0:  # an object's outer border: fill it
            cv2.fillPoly(out, polygons, 1)
        else:  # a hole's border: clear the inside, keep the border pixels (they belong to the object)
            cv2.fillPoly(out, polygons, 0)
            cv2.polylines(out, polygons, isClosed=True, color=1)
    return out


def simplify_contours_2d(mask: np.ndarray, *, tolerance_mm: float, spacing_yx: Sequence[float]) -> np.ndarray:
    """Simplify every outline of each (y, x) slice, moving it by at most about ``tolerance_mm``.

    Outlines run through boundary pixel centres; Douglas-Peucker (cv2.approxPolyDP) drops vertices closer
    than ``tolerance_mm`` to the simplified polygon, which is then filled (holes stay holes, islands inside
    holes stay islands). The result stays inside the slice's bounding box.

    Args:
        mask: bool array, (y, x) or (z, y, x).
        tolerance_mm: Douglas-Peucker epsilon in mm; 0 keeps the outline (the mask comes back unchanged).
        spacing_yx: pixel size (y, x) in mm.

    Returns:
        New bool array, same shape as ``mask``.
    """
    check_mask(mask)
    tolerance = check_number(tolerance_mm, name="tolerance_mm")
    sy, sx = check_spacing(spacing_yx, name="spacing_yx", ndim=2)
    scale_xy = np.array([sx, sy], dtype=np.float32)
    return map_slices(mask, lambda plane: _simplify_plane(plane, scale_xy, tolerance).astype(bool))
