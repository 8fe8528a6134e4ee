"""Consistency along z: drop slices cut off from the main run of slices, bridge single empty slices.

Both functions take a bool (z, y, x) mask and return a new bool (z, y, x) array; a 2D image is a volume
with z == 1 (nothing to do then).
"""

from __future__ import annotations

import numpy as np

from medsam_engine.postprocess._checks import check_int, check_mask


def drop_disconnected_slices(mask: np.ndarray, *, max_gap: int = 0) -> np.ndarray:
    """Keep only the run of non-empty slices with the most voxels; empty every other slice.

    A run is a stretch of non-empty slices in which consecutive ones are separated by at most ``max_gap``
    empty slices (0: strictly consecutive). Ties go to the run with the lowest z.

    Args:
        mask: bool array, (z, y, x).
        max_gap: number of empty slices a run may span, >= 0.

    Returns:
        New bool array, (z, y, x); slices of the kept run are unchanged.
    """
    check_mask(mask, ndims=(3,))
    gap = check_int(max_gap, name="max_gap", minimum=0)
    counts = np.count_nonzero(mask, axis=(1, 2))
    filled = np.flatnonzero(counts)
    out = np.zeros_like(mask)
    if filled.size == 0:
        return out
    breaks = np.flatnonzero(np.diff(filled) > gap + 1)
    starts = np.concatenate([[0], breaks + 1])
    ends = np.concatenate([breaks, [filled.size - 1]])
    best = int(np.argmax(np.add.reduceat(counts[filled], starts)))
    first, last = filled[starts[best]], filled[ends[best]]
    out[first : last + 1] = mask[first : last + 1]
    return out


def bridge_slice_gaps(mask: np.ndarray) -> np.ndarray:
    """Fill each single empty slice between two non-empty slices with the intersection of its neighbours.

    Neighbours are read from the input, so every gap of exactly one slice is bridged independently; wider gaps
    stay empty, and a gap whose neighbours do not overlap stays empty too.

    Args:
        mask: bool array, (z, y, x).

    Returns:
        New bool array, (z, y, x); only previously empty slices change.
    """
    check_mask(mask, ndims=(3,))
    filled = mask.any(axis=(1, 2))
    out = mask.copy()
    gaps = np.flatnonzero(~filled[1:-1] & filled[:-2] & filled[2:]) + 1
    out[gaps] = mask[gaps - 1] & mask[gaps + 1]
    return out
