"""Run a mask operation on the bounding box of the mask only; outside the array counts as background.

Every operation in this package keeps its result inside the input's bounding box, so working on the crop
gives exactly the result on the whole array, at a fraction of the cost.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from scipy import ndimage


def bounding_box(mask: np.ndarray) -> tuple[slice, ...] | None:
    """Slices of the smallest box holding every True voxel of a bool ``mask``, or None when it is empty.

    Two passes over the array whatever its dimensions: the first axis's projection, then the rest projected
    onto one plane within the first axis's extent (cheaper than three strided projections; measured:
    docs/benchmarks.md)."""
    if mask.size == 0:
        return None
    if mask.ndim == 1:
        hits = np.flatnonzero(mask)
        return None if hits.size == 0 else (slice(int(hits[0]), int(hits[-1]) + 1),)
    rows = mask.reshape(mask.shape[0], -1)
    first = np.flatnonzero(rows.any(axis=1))
    if first.size == 0:
        return None
    head = slice(int(first[0]), int(first[-1]) + 1)
    plane = mask[head].any(axis=0)
    box = [head]
    for axis in range(plane.ndim):
        others = tuple(a for a in range(plane.ndim) if a != axis)
        hits = np.flatnonzero(plane.any(axis=others)) if others else np.flatnonzero(plane)
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


FEW_LABELS = 8  # up to this many labels, boxes come from one comparison and three projections per label


def present_values(label_map: np.ndarray) -> list[int]:
    """The non-zero values of an integer label map, ascending (a histogram for 8/16-bit maps)."""
    if label_map.size and label_map.dtype in (np.uint8, np.uint16):
        import cv2

        high = int(label_map.max())
        rows = np.ascontiguousarray(label_map).reshape(-1, label_map.shape[-1])
        counts = cv2.calcHist([rows], [0], None, [high + 1], [0, high + 1]).ravel()
        return [int(v) for v in np.flatnonzero(counts[1:]) + 1]
    return [int(v) for v in np.unique(label_map) if v != 0]


def label_boxes(label_map: np.ndarray, values: list[int] | None = None) -> dict[int, tuple[slice, ...]]:
    """Each present non-zero value of an integer label map -> the slices of its bounding box.

    A few labels cost one comparison and three projections each, less than a ``find_objects`` pass; many
    (instance maps) one ``find_objects`` pass, whatever their number (measured: docs/benchmarks.md)."""
    values = present_values(label_map) if values is None else values
    if len(values) <= FEW_LABELS or label_map.dtype.kind not in "ui" or max(values) > 1 << 20:
        return {v: box for v in values if (box := bounding_box(label_map == v)) is not None}
    found = ndimage.find_objects(label_map, max_label=max(values))
    return {v: found[v - 1] for v in values if found[v - 1] is not None}
