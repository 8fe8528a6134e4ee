"""Dice and normalised surface Dice (NSD) per label, with spacing in mm. numpy/scipy only."""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

import numpy as np
from scipy import ndimage

if TYPE_CHECKING:
    from medsam_engine.pipeline.core.types import BoxPrompt


EXACT_FLOAT32 = 1 << 24  # OpenCV's histogram counts in float32, exact up to this many voxels per call


def label_voxels(label_map: np.ndarray) -> dict[int, int]:
    """Voxels per non-zero value of a label map, exact, ascending by value. One counting pass for small
    non-negative integers (OpenCV's histogram for 8/16-bit maps, over blocks of planes few enough to count
    exactly; ``bincount`` widens to int64 first) instead of ``np.unique``'s sort or hash (measured:
    docs/benchmarks.md)."""
    counts: np.ndarray | None = None
    if label_map.size and label_map.dtype in (np.uint8, np.uint16):
        import cv2

        high = int(label_map.max())
        plane = np.ascontiguousarray(label_map).reshape(-1, label_map.shape[-1] if label_map.ndim else 1)
        rows = max(1, EXACT_FLOAT32 // plane.shape[1])
        counts = np.zeros(high + 1, dtype=np.int64)
        for start in range(0, plane.shape[0], rows):
            block = cv2.calcHist([plane[start : start + rows]], [0], None, [high + 1], [0, high + 1])
            counts += np.rint(block.ravel()).astype(np.int64)
    elif label_map.size and label_map.dtype.kind in "ui" and label_map.dtype.itemsize <= 8:
        low, high = int(label_map.min()), int(label_map.max())
        if low >= 0 and high <= 1 << 20:
            counts = np.bincount(label_map.ravel(), minlength=high + 1)
    if counts is None:
        values, found = np.unique(label_map, return_counts=True)
        return {int(v): int(n) for v, n in zip(values, found, strict=True) if v != 0}
    return {int(v): int(counts[v]) for v in np.flatnonzero(counts) if v != 0}


def present_labels(label_map: np.ndarray) -> list[int]:
    """The non-zero values of a label map, ascending (:func:`label_voxels`'s counting pass)."""
    return list(label_voxels(label_map))


def dice(prediction: np.ndarray, reference: np.ndarray) -> float:
    """Dice of two boolean arrays; 1.0 when both are empty."""
    total = int(prediction.sum()) + int(reference.sum())
    return 1.0 if total == 0 else 2.0 * int(np.logical_and(prediction, reference).sum()) / total


def _surface(mask: np.ndarray) -> np.ndarray:
    inner: np.ndarray = ndimage.binary_erosion(
        mask, structure=ndimage.generate_binary_structure(mask.ndim, 1)
    )
    surface: np.ndarray = mask & ~inner
    return surface


def normalised_surface_dice(
    prediction: np.ndarray, reference: np.ndarray, *, spacing: tuple[float, ...], tolerance_mm: float = 2.0
) -> float:
    """Fraction of both surfaces lying within ``tolerance_mm`` of the other surface (1.0 if both empty)."""
    pred_surface, ref_surface = _surface(prediction), _surface(reference)
    n_pred, n_ref = int(pred_surface.sum()), int(ref_surface.sum())
    if n_pred + n_ref == 0:
        return 1.0
    if n_pred == 0 or n_ref == 0:
        return 0.0
    to_ref = ndimage.distance_transform_edt(~ref_surface, sampling=spacing)
    to_pred = ndimage.distance_transform_edt(~pred_surface, sampling=spacing)
    within = int((to_ref[pred_surface] <= tolerance_mm).sum()) + int(
        (to_pred[ref_surface] <= tolerance_mm).sum()
    )
    return within / (n_pred + n_ref)


def boundary_distance_mm(
    prediction: np.ndarray, reference: np.ndarray, *, spacing: tuple[float, ...]
) -> float | None:
    """The average symmetric surface distance in mm: the mean, over both surfaces' voxels, of the distance to
    the other surface; 0.0 when both masks are empty, None when only one is (no distance exists)."""
    pred_surface, ref_surface = _surface(prediction), _surface(reference)
    n_pred, n_ref = int(pred_surface.sum()), int(ref_surface.sum())
    if n_pred + n_ref == 0:
        return 0.0
    if n_pred == 0 or n_ref == 0:
        return None
    to_ref = ndimage.distance_transform_edt(~ref_surface, sampling=spacing)
    to_pred = ndimage.distance_transform_edt(~pred_surface, sampling=spacing)
    total = float(to_ref[pred_surface].sum()) + float(to_pred[ref_surface].sum())
    return total / (n_pred + n_ref)


def per_label_scores(
    prediction: np.ndarray,
    reference: np.ndarray,
    *,
    spacing: tuple[float, ...],
    labels: list[int] | None = None,
) -> dict[int, dict[str, float]]:
    """{label: {"dice": .., "nsd": ..}} for every label present in the reference (or the given labels)."""
    if prediction.shape != reference.shape:
        raise ValueError(f"prediction {prediction.shape} and reference {reference.shape} differ in shape")
    if labels is None:
        labels = present_labels(reference)
    return {
        label: {
            "dice": dice(prediction == label, reference == label),
            "nsd": normalised_surface_dice(prediction == label, reference == label, spacing=spacing),
        }
        for label in labels
    }


def filled_box_dice(reference: np.ndarray, prompts: Iterable[BoxPrompt]) -> dict[int, float]:
    """Dice per label of the no-model baseline: every prompt box of that label filled."""
    scores = {}
    for label in sorted({p.label for p in prompts}):
        filled = np.zeros(reference.shape, dtype=bool)
        for prompt in (p for p in prompts if p.label == label):
            x0, y0, x1, y1 = prompt.box
            filled[prompt.z, y0 : y1 + 1, x0 : x1 + 1] = True
        scores[label] = dice(filled, reference == label)
    return scores
