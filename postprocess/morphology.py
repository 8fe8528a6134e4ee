"""Binary opening and closing with a radius in millimetres, respecting anisotropic voxel spacing.

The structuring element is the discrete ball of radius ``radius_mm`` in physical space: every offset
(dz, dy, dx) whose length sqrt((dz*sz)² + (dy*sy)² + (dx*sx)²) is at most the radius. In-plane (the default)
it is the ellipse with half-axes radius/sy and radius/sx pixels in each (y, x) slice; otherwise an ellipsoid
that also spans radius/sz slices. It is applied with OpenCV slice by slice (the ellipsoid as a stack of
elliptical cross-sections). Outside the array counts as background, and closing pads the array first, so an
object never sticks to the border; closing only adds voxels within ``radius_mm`` of the mask.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import cv2
import numpy as np

from medsam_engine.postprocess._checks import (
    RELATIVE_SLACK,
    check_bool,
    check_mask,
    check_number,
    check_spacing,
)
from medsam_engine.postprocess._crop import as_volume, map_in_box

_Layers = list[tuple[int, np.ndarray]]


def _ellipse(limit_sq: float, sy: float, sx: float) -> np.ndarray:
    """uint8 (y, x) element of the offsets with (dy*sy)² + (dx*sx)² <= ``limit_sq`` (mm²)."""
    limit = math.sqrt(max(limit_sq, 0.0))
    ay, ax = int(limit // sy), int(limit // sx)
    dy = (np.arange(-ay, ay + 1) * sy)[:, None]
    dx = (np.arange(-ax, ax + 1) * sx)[None, :]
    return (dy * dy + dx * dx <= limit_sq).astype(np.uint8)


def structuring_element_2d(*, radius_mm: float, spacing_yx: Sequence[float]) -> np.ndarray:
    """The in-plane element: bool (2*ay+1, 2*ax+1) array, ay = floor(radius_mm/sy), ax = floor(radius_mm/sx).

    ``spacing_yx`` is the pixel size (y, x) in mm; True marks offsets within ``radius_mm`` of the centre.
    """
    radius = check_number(radius_mm, name="radius_mm")
    sy, sx = check_spacing(spacing_yx, name="spacing_yx", ndim=2)
    limit = radius * (1 + RELATIVE_SLACK)
    return _ellipse(limit * limit, sy, sx).astype(bool)


def _layers(radius: float, spacing: tuple[float, float, float], in_plane: bool) -> _Layers:
    """The element as (dz, elliptical cross-section) pairs; a single dz = 0 layer when ``in_plane``."""
    sz, sy, sx = spacing
    limit = radius * (1 + RELATIVE_SLACK)
    az = 0 if in_plane else int(limit // sz)
    return [(dz, _ellipse(limit * limit - (dz * sz) ** 2, sy, sx)) for dz in range(-az, az + 1)]


def _dilate(stack: np.ndarray, layers: _Layers) -> np.ndarray:
    """Dilation of a uint8 (z, y, x) stack: slice z gathers each layer's 2D dilation of slice z + dz."""
    out = np.zeros_like(stack)
    filled = stack.any(axis=(1, 2))
    for dz, element in layers:
        for z in range(max(0, -dz), min(len(stack), len(stack) - dz)):
            if filled[z + dz]:
                grown = cv2.dilate(stack[z + dz], element, borderType=cv2.BORDER_CONSTANT, borderValue=0)
                np.maximum(out[z], grown, out=out[z])
    return out


def _erode(stack: np.ndarray, layers: _Layers) -> np.ndarray:
    """Erosion of a uint8 (z, y, x) stack; slices beyond the ends count as background."""
    out = np.ones_like(stack)
    filled = stack.any(axis=(1, 2))
    for dz, element in layers:
        for z in range(len(stack)):
            if not 0 <= z + dz < len(stack) or not filled[z + dz]:
                out[z] = 0
            elif out[z].any():
                shrunk = cv2.erode(stack[z + dz], element, borderType=cv2.BORDER_CONSTANT, borderValue=0)
                np.minimum(out[z], shrunk, out=out[z])
    return out


def _prepare(
    mask: np.ndarray, radius_mm: float, spacing: Sequence[float], in_plane: bool
) -> tuple[np.ndarray, _Layers, Callable[[np.ndarray], np.ndarray]]:
    """Check the arguments; the mask as (z, y, x), the element layers, and the shape-restoring function."""
    check_mask(mask)
    radius = check_number(radius_mm, name="radius_mm")
    values = check_spacing(spacing, name="spacing", ndim=mask.ndim)
    flat = check_bool(in_plane, name="in_plane") or mask.ndim == 2
    volume, restore = as_volume(mask)
    zyx = values if len(values) == 3 else (1.0, *values)
    return volume, _layers(radius, zyx, flat), restore


def binary_opening(
    mask: np.ndarray, *, radius_mm: float, spacing: Sequence[float], in_plane: bool = True
) -> np.ndarray:
    """Erode then dilate with the ball of ``radius_mm``: removes spurs and islands thinner than the ball.

    Args:
        mask: bool array, (y, x) or (z, y, x).
        radius_mm: ball radius in mm; 0 returns a copy.
        spacing: voxel size in mm, (z, y, x) for a volume or (y, x) for an image.
        in_plane: True works on each (y, x) slice alone; False uses the ellipsoid across slices.

    Returns:
        New bool array, same shape; never contains a voxel that ``mask`` lacks.
    """
    volume, layers, restore = _prepare(mask, radius_mm, spacing, in_plane)
    return restore(map_in_box(volume, lambda crop: _dilate(_erode(crop, layers), layers).astype(bool)))


def binary_closing(
    mask: np.ndarray, *, radius_mm: float, spacing: Sequence[float], in_plane: bool = True
) -> np.ndarray:
    """Dilate then erode with the ball of ``radius_mm``: closes gaps and dents narrower than the ball.

    Args:
        mask: bool array, (y, x) or (z, y, x).
        radius_mm: ball radius in mm; 0 returns a copy.
        spacing: voxel size in mm, (z, y, x) for a volume or (y, x) for an image.
        in_plane: True works on each (y, x) slice alone; False uses the ellipsoid across slices.

    Returns:
        New bool array, same shape; contains ``mask`` and adds only voxels within ``radius_mm`` of it.
    """
    volume, layers, restore = _prepare(mask, radius_mm, spacing, in_plane)
    pz = max(dz for dz, _ in layers)
    py, px = (size // 2 for size in layers[len(layers) // 2][1].shape)  # the dz = 0 layer is the widest
    pad = ((pz, pz), (py, py), (px, px))

    def close(crop: np.ndarray) -> np.ndarray:
        closed = _erode(_dilate(np.pad(crop, pad), layers), layers)
        return closed[pz : closed.shape[0] - pz, py : closed.shape[1] - py, px : closed.shape[2] - px].astype(
            bool
        )

    return restore(map_in_box(volume, close))
