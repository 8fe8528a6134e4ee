"""Object-level scores of a prompt source: does every reference object get a box?

An object is a 2D connected component of one label on one slice; a predicted box finds it when their box
IoU is at least ``iou`` (greedy one-to-one matching, best IoU first). Pure numpy/scipy.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from medsam_engine.pipeline.core.boxes import box_iou


def component_boxes(
    label_slice: np.ndarray, label: int, *, min_pixels: int = 1
) -> list[tuple[int, int, int, int]]:
    """XYXY (inclusive) boxes of the 8-connected components of ``label`` in an (H, W) label slice."""
    components, _ = ndimage.label(label_slice == label, structure=np.ones((3, 3), dtype=bool))
    boxes = []
    for index, found in enumerate(ndimage.find_objects(components), start=1):
        if found is not None and int((components[found] == index).sum()) >= min_pixels:
            boxes.append((found[1].start, found[0].start, found[1].stop - 1, found[0].stop - 1))
    return boxes


def match_boxes(predicted: list, reference: list, *, iou: float = 0.5) -> tuple[int, int, int]:
    """(true positives, missed references, unmatched predictions) under greedy one-to-one matching."""
    pairs = sorted(
        ((box_iou(p, r), i, j) for i, p in enumerate(predicted) for j, r in enumerate(reference)),
        reverse=True,
    )
    used_p, used_r = set(), set()
    for score, i, j in pairs:
        if score < iou:
            break
        if i not in used_p and j not in used_r:
            used_p.add(i)
            used_r.add(j)
    return len(used_r), len(reference) - len(used_r), len(predicted) - len(used_p)


def object_scores(
    predicted: np.ndarray, reference: np.ndarray, labels: list[int], *, iou: float = 0.5, min_pixels: int = 10
) -> dict[int, dict[str, float]]:
    """Recall and precision of objects per label for (z, y, x) predicted and reference label maps.

    Reference objects smaller than ``min_pixels`` are not counted (nor are predictions that small).
    """
    out = {}
    for label in labels:
        tp = fn = fp = 0
        for z in range(reference.shape[0]):
            ref = component_boxes(reference[z], label, min_pixels=min_pixels)
            pred = component_boxes(predicted[z], label, min_pixels=min_pixels)
            a, b, c = match_boxes(pred, ref, iou=iou)
            tp, fn, fp = tp + a, fn + b, fp + c
        out[label] = {"objects": tp + fn, "recall": tp / max(tp + fn, 1), "precision": tp / max(tp + fp, 1)}
    return out


def recist_axes(
    mask: np.ndarray, spacing_yx: tuple[float, float] = (1.0, 1.0)
) -> tuple[np.ndarray, np.ndarray]:
    """The RECIST axes a reader draws on a (H, W) boolean mask: the long axis joins the two pixels furthest
    apart (in mm), the short axis is the longest chord perpendicular to it. Returns two (2, 2) arrays of
    x/y pixel indices (end points, pixel centres)."""
    from scipy.spatial import ConvexHull

    ys, xs = np.nonzero(mask)
    if ys.size == 0:
        raise ValueError("Argument 'mask' must hold at least one pixel.")
    scale = np.array([spacing_yx[1], spacing_yx[0]], dtype=float)
    mm = np.column_stack([xs, ys]) * scale
    try:
        hull = mm[ConvexHull(mm).vertices]
    except Exception:  # a line or a point of pixels: every pixel is on the hull
        hull = mm
    far = np.linalg.norm(hull[:, None] - hull[None], axis=-1)
    i, j = np.unravel_index(int(np.argmax(far)), far.shape)
    long_mm = hull[[i, j]]
    direction = (long_mm[1] - long_mm[0]) / max(float(far[i, j]), 1e-9)
    normal = np.array([-direction[1], direction[0]])
    along, across = mm @ direction, mm @ normal
    step = float(min(scale))
    bins = np.round(along / step).astype(int)
    best, short_mm = -1.0, np.array([mm[0], mm[0]])
    for b in np.unique(bins):
        inside = bins == b
        low, high = (
            int(np.argmin(np.where(inside, across, np.inf))),
            int(np.argmax(np.where(inside, across, -np.inf))),
        )
        if across[high] - across[low] > best:
            best, short_mm = float(across[high] - across[low]), mm[[low, high]]
    return long_mm / scale, short_mm / scale
