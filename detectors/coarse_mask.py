"""Coarse-mask prompt compiler: a label map on the image grid -> one box per object per slice.

Each label value is split into 3D connected components (two lesions are two instances); every slice where
an instance is present gets its tight box (MedSAM's protocol), optionally widened by ``margin_px`` and
always clipped to the image.
"""
from __future__ import annotations

import numpy as np
from scipy import ndimage

from pipeline.types import BoxPrompt

SOURCE = "coarse-mask"


def _slice_boxes(component: np.ndarray, z_offset: int, y_offset: int, x_offset: int):
    """Yield (z, (x0, y0, x1, y1)) for each slice of a boolean sub-volume that has foreground."""
    ys_any = component.any(axis=2)  # (z, y)
    xs_any = component.any(axis=1)  # (z, x)
    for z in np.nonzero(ys_any.any(axis=1))[0]:
        ys = np.nonzero(ys_any[z])[0]
        xs = np.nonzero(xs_any[z])[0]
        yield int(z + z_offset), (int(xs[0] + x_offset), int(ys[0] + y_offset),
                                  int(xs[-1] + x_offset), int(ys[-1] + y_offset))


def boxes_from_label_map(label_map: np.ndarray, *, margin_px: int = 0, min_voxels: int = 1,
                         connectivity: int = 3) -> list[BoxPrompt]:
    """Boxes for every (label, 3D component, slice) of a (z, y, x) integer label map.

    Instances are numbered 1.. per label in order of their first voxel. Components smaller than
    ``min_voxels`` are ignored. Boxes are XYXY voxel indices, inclusive, clipped to the slice.
    """
    if label_map.ndim != 3:
        raise ValueError(f"Argument 'label_map' must be (z, y, x); got shape {label_map.shape}.")
    if margin_px < 0:
        raise ValueError(f"Argument 'margin_px' must be >= 0; got {margin_px}.")
    _, height, width = label_map.shape
    structure = ndimage.generate_binary_structure(3, connectivity)
    prompts: list[BoxPrompt] = []
    for label in (int(v) for v in np.unique(label_map) if v != 0):
        components, _ = ndimage.label(label_map == label, structure=structure)
        instance = 0
        for index, found in enumerate(ndimage.find_objects(components), start=1):
            if found is None:
                continue
            component = components[found] == index
            if component.sum() < min_voxels:
                continue
            instance += 1
            for z, (x0, y0, x1, y1) in _slice_boxes(component, found[0].start, found[1].start, found[2].start):
                box = (max(0, x0 - margin_px), max(0, y0 - margin_px),
                       min(width - 1, x1 + margin_px), min(height - 1, y1 + margin_px))
                prompts.append(BoxPrompt(label=label, instance=instance, z=z, box=box, source=SOURCE))
    return prompts
