"""Run a mask operation on the bounding box of the mask only; outside the array counts as background.

Every operation in this package keeps its result inside the input's bounding box, so working on the crop
gives exactly the result on the whole array, at a fraction of the cost.
"""
from __future__ import annotations

from collections.abc import Callable

import numpy as np


def bounding_box(mask: np.ndarray) -> tuple[slice, ...] | None:
    """Slices of the smallest box holding every True voxel of a bool ``mask``, or None when it is empty."""
    box = []
    for axis in range(mask.ndim):
        others = tuple(a for a in range(mask.ndim) if a != axis)
        hits = np.flatnonzero(mask.any(axis=others))
        if hits.size == 0:
            return None
        box.append(slice(int(hits[0]), int(hits[-1]) + 1))
    return tuple(box)


def map_in_box(mask: np.ndarray, operation: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    """New bool array: ``operation`` applied to the bounding-box crop of ``mask``, background elsewhere.

    ``operation`` receives a contiguous uint8 (0/1) crop with the same dimensions as ``mask`` and returns a
    bool (or 0/1) array of the same shape.
    """
    out = np.zeros(mask.shape, dtype=bool)
    box = bounding_box(mask)
    if box is not None:
        out[box] = operation(np.ascontiguousarray(mask[box], dtype=np.uint8))
    return out


def map_slices(mask: np.ndarray, operation: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    """New bool array: ``operation`` applied to every non-empty (y, x) slice of a (y, x) or (z, y, x) mask.

    ``operation`` receives a contiguous uint8 (0/1) plane cropped to the mask's bounding box and returns a
    bool (or 0/1) plane of the same shape; empty slices stay empty.
    """
    stack = mask[None] if mask.ndim == 2 else mask

    def per_slice(crop: np.ndarray) -> np.ndarray:
        result = np.zeros(crop.shape, dtype=bool)
        for z in np.flatnonzero(crop.any(axis=(1, 2))):
            result[z] = operation(crop[z])
        return result

    out = map_in_box(stack, per_slice)
    return out[0] if mask.ndim == 2 else out


def as_volume(mask: np.ndarray) -> tuple[np.ndarray, Callable[[np.ndarray], np.ndarray]]:
    """A (z, y, x) view of a (y, x) or (z, y, x) mask, and the function that restores the input's shape."""
    if mask.ndim == 2:
        return mask[None], lambda volume: volume[0]
    return mask, lambda volume: volume
