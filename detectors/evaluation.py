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
