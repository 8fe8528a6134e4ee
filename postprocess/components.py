"""Connected components: drop those below a size in mm² (per slice) or mm³ (volume), or keep the k largest.

Slices use 8-connectivity in (y, x); volumes use 26-connectivity in (z, y, x). All functions take a bool mask,
return a new bool array of the same shape, and never modify their input.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import cc3d
import cv2
import numpy as np

from medsam_engine.postprocess._checks import (
    RELATIVE_SLACK,
    check_int,
    check_mask,
    check_number,
    check_spacing,
)
from medsam_engine.postprocess._crop import map_in_box, map_slices

_SLAB = 16  # slices per bincount call


def _plane_components(plane: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """8-connected labels of a uint8 (y, x) plane and the pixel count of each label (index 0: background)."""
    count, labels = cv2.connectedComponents(plane, connectivity=8, ltype=cv2.CV_32S)
    # one component (or none): counted without OpenCV's statistics, which cost more than the labelling
    if count <= 2:
        filled = int(np.count_nonzero(plane))
        return labels, np.array([plane.size - filled, filled][:count], dtype=np.int64)
    _, labels, stats, _ = cv2.connectedComponentsWithStats(plane, connectivity=8, ltype=cv2.CV_32S)
    return labels, stats[:, cv2.CC_STAT_AREA]


def label_components(volume: np.ndarray, connectivity: int = 26) -> tuple[np.ndarray, int]:
    """Connected components of a (z, y, x) mask: (uint32 labels 1..n in raster order of their first voxel, n).

    The labels of ``scipy.ndimage.label`` with the matching structure (``connectivity`` 6, 18 or 26
    neighbours), from cc3d, at less cost (measured: docs/benchmarks.md). cc3d works on a copy padded with
    background: version 4.1 fails on arrays with a side of one voxel (its union-find table is sized too small
    there); the padding changes no label. The labels are a view into that padded result (not contiguous)."""
    padded = np.pad(np.asarray(volume, dtype=bool), 1)
    labels, count = cc3d.connected_components(padded, connectivity=connectivity, return_N=True)
    return labels[1:-1, 1:-1, 1:-1], int(count)


def _volume_components(volume: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """26-connected labels of a (z, y, x) array and the voxel count of each label (index 0: background);
    a single component (the usual case) is counted without a pass over the labels."""
    labels, count = label_components(volume)
    if count <= 1:
        filled = int(np.count_nonzero(volume))
        return labels, np.array([volume.size - filled, filled][: count + 1], dtype=np.int64)
    sizes = np.zeros(count + 1, dtype=np.int64)
    for start in range(0, len(labels), _SLAB):  # bincount widens to int64: slabs keep that copy small
        sizes += np.bincount(labels[start : start + _SLAB].ravel(), minlength=count + 1)
    return labels, sizes


def _at_least(threshold: float) -> Callable[[np.ndarray], np.ndarray]:
    """Keep rule: components whose size (in voxels) reaches ``threshold`` up to floating-point slack."""
    return lambda sizes: sizes >= threshold * (1 - RELATIVE_SLACK)


def _largest(k: int) -> Callable[[np.ndarray], np.ndarray]:
    """Keep rule: the ``k`` largest components; ties go to the component met first in raster order."""

    def rule(sizes: np.ndarray) -> np.ndarray:
        keep = np.zeros(sizes.shape, dtype=bool)
        order = np.argsort(-sizes[1:], kind="stable")[:k] + 1
        keep[order] = True
        return keep

    return rule


def _select(
    mask: np.ndarray, labels: np.ndarray, sizes: np.ndarray, rule: Callable[[np.ndarray], np.ndarray]
) -> np.ndarray:
    """The voxels of ``mask`` in the components ``rule`` keeps; ``labels`` numbers them, ``sizes`` counts
    them (index 0: background). Keeping all or none costs no look-up per voxel."""
    keep = rule(sizes)
    keep[0] = False
    if keep[1:].all():
        return mask.astype(bool)
    if not keep.any():
        return np.zeros(mask.shape, dtype=bool)
    return keep[labels]


def remove_small_components_2d(
    mask: np.ndarray, *, min_area_mm2: float, spacing_yx: Sequence[float]
) -> np.ndarray:
    """Drop 8-connected components whose area is below ``min_area_mm2``, slice by slice.

    Args:
        mask: bool array, (y, x) or (z, y, x).
        min_area_mm2: smallest area kept, in mm²; components with exactly this area stay. 0 keeps all.
        spacing_yx: pixel size (y, x) in mm.

    Returns:
        New bool array, same shape as ``mask``.
    """
    check_mask(mask)
    area = check_number(min_area_mm2, name="min_area_mm2")
    sy, sx = check_spacing(spacing_yx, name="spacing_yx", ndim=2)
    rule = _at_least(area / (sy * sx))
    return map_slices(mask, lambda plane: _select(plane, *_plane_components(plane), rule))


def remove_small_components_3d(
    mask: np.ndarray, *, min_volume_mm3: float, spacing: Sequence[float]
) -> np.ndarray:
    """Drop 26-connected components whose volume is below ``min_volume_mm3``.

    Args:
        mask: bool array, (z, y, x).
        min_volume_mm3: smallest volume kept, in mm³; components with exactly this volume stay. 0 keeps all.
        spacing: voxel size (z, y, x) in mm.

    Returns:
        New bool array, (z, y, x).
    """
    check_mask(mask, ndims=(3,))
    volume = check_number(min_volume_mm3, name="min_volume_mm3")
    sz, sy, sx = check_spacing(spacing, name="spacing", ndim=3)
    rule = _at_least(volume / (sz * sy * sx))
    return map_in_box(mask, lambda crop: _select(crop, *_volume_components(crop), rule))


def keep_largest_components_2d(mask: np.ndarray, *, k: int = 1) -> np.ndarray:
    """Keep the ``k`` largest 8-connected components of each (y, x) slice (by pixel count).

    Ties go to the component met first in raster order. ``mask`` is a bool (y, x) or (z, y, x) array;
    returns a new bool array of the same shape.
    """
    check_mask(mask)
    rule = _largest(check_int(k, name="k", minimum=1))
    return map_slices(mask, lambda plane: _select(plane, *_plane_components(plane), rule))


def keep_largest_components_3d(mask: np.ndarray, *, k: int = 1) -> np.ndarray:
    """Keep the ``k`` largest 26-connected components of a (z, y, x) bool mask (by voxel count).

    Voxel count equals volume on a regular grid, so no spacing is needed. Ties go to the component met first
    in raster order. Returns a new bool (z, y, x) array.
    """
    check_mask(mask, ndims=(3,))
    rule = _largest(check_int(k, name="k", minimum=1))
    return map_in_box(mask, lambda crop: _select(crop, *_volume_components(crop), rule))
