"""Box arithmetic shared by quality checks and fine-tuning. Boxes are (B, 4) XYXY arrays in the pixel
coordinates of one slice: x = column, y = row."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def jitter_boxes(
    boxes: np.ndarray,
    fraction: float,
    rng: np.random.Generator,
    shape_yx: tuple[int, int],
    *,
    pixels: bool = True,
) -> np.ndarray:
    """(B, 4) XYXY boxes with each edge moved by a uniform shift of up to ``fraction`` of the box's width
    (x edges) or height (y edges), at least one pixel, clipped to a slice of ``shape_yx``; float32.

    ``pixels``: voxel boxes with inclusive edges (a box's width is x1 - x0 + 1) whose moved edges are rounded
    to whole pixels, as a reviewer draws them; else continuous boxes (the model's frame: width x1 - x0, not
    rounded). Edges that cross are swapped back into order.
    """
    boxes = np.asarray(boxes, dtype=np.float32)
    extent = 1.0 if pixels else 0.0
    size = np.stack([boxes[:, 2] - boxes[:, 0] + extent, boxes[:, 3] - boxes[:, 1] + extent] * 2, axis=1)
    moved = boxes + rng.uniform(-1, 1, size=boxes.shape) * np.maximum(size * fraction, 1.0)
    if pixels:
        moved = np.round(moved)
    low = np.minimum(moved[:, :2], moved[:, 2:])
    high = np.maximum(moved[:, :2], moved[:, 2:])
    limit = np.array([shape_yx[1] - 1, shape_yx[0] - 1], dtype=np.float32)
    return np.concatenate([np.clip(low, 0, limit), np.clip(high, 0, limit)], axis=1).astype(np.float32)


def box_iou(a: tuple[int, ...], b: tuple[int, ...]) -> float:
    """IoU of two inclusive XYXY voxel boxes."""
    ix = min(a[2], b[2]) - max(a[0], b[0]) + 1
    iy = min(a[3], b[3]) - max(a[1], b[1]) + 1
    if ix <= 0 or iy <= 0:
        return 0.0
    inter = ix * iy

    def area(r: Sequence[int]) -> int:
        return (r[2] - r[0] + 1) * (r[3] - r[1] + 1)

    return inter / float(area(a) + area(b) - inter)
