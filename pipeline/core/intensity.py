"""MedSAM's official intensity handling (numpy only, no torch).

Intensity (per volume, once): CT is windowed (level/width, HU) to 0..255; MR and other scalar modalities are
clipped to the 0.5-99.5 percentiles of their non-zero voxels and scaled to 0..255 (zeros stay zero); 8-bit 2D
images are used as they are. How a slice then becomes the model's input depends on the checkpoint's kind:
pipeline/model/framing.py.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class IntensityConfig:
    """How raw intensities become 8-bit: CT window in HU, percentile clip for everything else."""

    ct_level: float = 40.0
    ct_width: float = 400.0
    lower_percentile: float = 0.5
    upper_percentile: float = 99.5


def to_uint8(
    array: np.ndarray,
    modality: str,
    config: IntensityConfig = IntensityConfig(),
    *,
    slab: int = 16,
    only: Sequence[int] | None = None,
) -> np.ndarray:
    """Map a volume's intensities to uint8 as MedSAM's ``pre_CT_MR.py`` does; returns a new array.

    CT: clip to the window, min-max to 0..255. Other scalar images that are not already uint8: clip to the
    percentiles of the positive voxels, min-max to 0..255, voxels that were 0 stay 0. Values are truncated
    to uint8 like the official script. Works ``slab`` slices at a time, so a 512 x 512 x 300 CT never has a
    float copy of the whole volume in memory; the result equals the whole-volume computation exactly.
    ``only``: compute just these slices (z indices; the statistics still come from the whole volume), the
    others stay 0 — for callers that look at the prompted slices only.
    """
    if modality != "CT" and array.dtype == np.uint8:
        return np.array(array, copy=True)
    if modality == "CT":
        lower = config.ct_level - config.ct_width / 2.0
        upper = config.ct_level + config.ct_width / 2.0
    else:
        positive = array[array > 0]
        if positive.size == 0:
            return np.zeros(array.shape, dtype=np.uint8)
        lower, upper = np.percentile(
            positive.astype(np.float32), [config.lower_percentile, config.upper_percentile]
        )
    smallest, largest = array.min(), array.max()
    low = float(np.clip(np.float32(smallest), lower, upper))  # == clip(volume).min()
    high = float(np.clip(np.float32(largest), lower, upper))

    def scale(data: np.ndarray) -> np.ndarray:
        scaled: np.ndarray = (np.clip(data, lower, upper) - low) / max(high - low, 1e-8) * 255.0
        if modality != "CT":
            scaled[data == 0] = 0.0
        return scaled.astype(np.uint8)

    wanted = range(array.shape[0]) if only is None else sorted({int(z) for z in only})
    out = np.zeros(array.shape, dtype=np.uint8)
    if array.dtype.kind in "ui" and int(largest) - int(smallest) < LUT_RANGE:
        # integer voxels (CT in HU): the same float32 arithmetic once per value, then one look-up per voxel,
        # a slice at a time, so the index array stays in cache
        table = scale(np.arange(int(smallest), int(largest) + 1, dtype=np.float32))
        index = np.empty(array.shape[1:], dtype=np.intp)
        for z in wanted:
            np.subtract(array[z], int(smallest), out=index, dtype=np.intp)
            np.take(table, index, out=out[z])
        return out
    runs = (
        np.split(np.asarray(wanted, dtype=int), np.flatnonzero(np.diff(wanted) != 1) + 1)
        if len(wanted)
        else []
    )
    for run in runs:  # consecutive wanted slices, ``slab`` at a time
        for start in range(int(run[0]), int(run[-1]) + 1, slab):
            stop = min(start + slab, int(run[-1]) + 1)
            out[start:stop] = scale(array[start:stop].astype(np.float32))
    return out


LUT_RANGE = 1 << 20  # integer images spanning fewer values than this are mapped through a look-up table


LUNG_MEDIAN_HU = -400.0  # a label whose coarse-mask median is below this is aerated lung
BONE_MEDIAN_HU = 180.0  # ... above this, bone (or dense contrast): the bone window shows its edges


def choose_ct_windows(
    volume_hu: np.ndarray,
    coarse: np.ndarray | None,
    labels: list[int],
    *,
    default: tuple[float, float],
    lung: tuple[float, float],
    bone: tuple[float, float],
    explicit: dict[int, tuple[float, float]] | None = None,
    auto: bool = True,
    kinds: dict[int, str] | None = None,
) -> dict[int, tuple[float, float]]:
    """(level, width) per label: explicit choice, else (auto) the window kind ("lung", "bone" or "soft") a
    prompt source chose for the label in ``kinds``, else the one the median HU under the coarse mask says."""
    explicit, kinds = explicit or {}, kinds or {}
    named = {"lung": lung, "bone": bone, "soft": default}
    windows = {}
    for label in labels:
        window = explicit.get(label, default)
        if label not in explicit and auto and label in kinds:
            window = named[kinds[label]]
        elif label not in explicit and auto and coarse is not None:
            inside = volume_hu[coarse == label]
            if inside.size:
                window = named[window_kind(float(np.median(inside)))]
        windows[label] = (float(window[0]), float(window[1]))
    return windows


def window_kind(median_hu: float) -> str:
    """The window kind a structure with this median HU is read in: aerated lung, bone, else soft tissue."""
    return "lung" if median_hu < LUNG_MEDIAN_HU else "bone" if median_hu > BONE_MEDIAN_HU else "soft"
