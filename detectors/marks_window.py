"""What the run reads a marked finding's CT window from: the pixels along its lines, and where it lies.

A measured axis runs across its lesion, so the median HU along a finding's lines is the lesion's own: the
run's median rule (pipeline/core/intensity.py) then picks the bone window for a cross on a vertebra, where
its box, mostly soft tissue around the bone, would not. A solid lesion in aerated lung (soft tissue along
its lines, aerated lung in a band around its box) is read in the lung window instead, as radiologists
measure lung nodules: the soft-tissue window clips the lung around it, and a part-solid nodule's ground-glass
rim with it, to black.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np

from medsam_engine.pipeline.core.intensity import window_kind
from medsam_engine.pipeline.core.types import BoxPrompt, Volume

BAND = 0.25  # the band around a finding's box is this share of the box's smaller side wide


def line_pixels(xy: np.ndarray, shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """(ys, xs) of the pixels a (2, 2) x/y segment crosses on an (H, W) slice, clipped to it."""
    steps = int(np.ceil(np.linalg.norm(xy[1] - xy[0]))) * 2 + 2
    along = np.linspace(xy[0], xy[1], steps)
    xs = np.clip(np.rint(along[:, 0]).astype(int), 0, shape[1] - 1)
    ys = np.clip(np.rint(along[:, 1]).astype(int), 0, shape[0] - 1)
    return ys, xs


def seed_map(
    prompts: list[BoxPrompt], shape: tuple[int, int, int], lines: list[list[np.ndarray]]
) -> np.ndarray:
    """A (z, y, x) uint16 label map of what each seed says lies inside its object on its key slice: the
    pixels along its lines, else its whole box. The run reads each label's CT window from it (the median
    HU under it)."""
    out = np.zeros(shape, dtype=np.uint16)
    for p, drawn in zip(prompts, lines, strict=True):
        if not drawn:
            x0, y0, x1, y1 = p.box
            out[p.z, y0 : y1 + 1, x0 : x1 + 1] = p.label
        for xy in drawn:
            out[p.z][line_pixels(xy, shape[1:])] = p.label
    return out


def in_aerated_lung(hu: np.ndarray, box: tuple[int, int, int, int], drawn: list[np.ndarray]) -> bool:
    """Whether a finding drawn as ``drawn`` lines on an (H, W) HU slice is a solid lesion in aerated lung:
    soft tissue along its lines, aerated lung in a band around its XYXY ``box``."""
    if not drawn:
        return False
    along = np.concatenate([hu[line_pixels(xy, hu.shape)] for xy in drawn])
    x0, y0, x1, y1 = box
    pad = max(1, int(BAND * (min(x1 - x0, y1 - y0) + 1)))
    top, left = max(0, y0 - pad), max(0, x0 - pad)
    outer = hu[top : y1 + pad + 1, left : x1 + pad + 1].astype(np.float32)
    outer[y0 - top : y1 - top + 1, x0 - left : x1 - left + 1] = np.nan
    band = outer[np.isfinite(outer)]
    if not band.size:
        return False
    return window_kind(float(np.median(along))) == "soft" and window_kind(float(np.median(band))) == "lung"


def window_kinds(volume: Volume, prompts: list[BoxPrompt], lines: list[list[np.ndarray]]) -> dict[int, str]:
    """ "lung" for each label of a CT whose findings are all solid lesions in aerated lung; the other labels
    are left to the run's median rule along their lines."""
    if volume.modality != "CT":
        return {}
    votes: dict[int, list[bool]] = defaultdict(list)
    for p, drawn in zip(prompts, lines, strict=True):
        votes[p.label].append(in_aerated_lung(volume.array[p.z], p.box, drawn))
    return {label: "lung" for label, found in votes.items() if all(found)}
