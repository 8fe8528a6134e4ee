"""Prompt sources: each turns a Volume (and what the user gave) into a list of BoxPrompts.

The registry maps ``--detector NAME`` to a callable ``(volume, coarse_mask_or_None, options) -> prompts``.
"""
from __future__ import annotations

from collections.abc import Callable

import numpy as np

from detectors.coarse_mask import boxes_from_label_map
from pipeline.types import BoxPrompt, Volume

Detector = Callable[[Volume, "np.ndarray | None", dict], list[BoxPrompt]]


def _coarse_mask(volume: Volume, coarse: np.ndarray | None, options: dict) -> list[BoxPrompt]:
    if coarse is None:
        raise ValueError("the 'coarse-mask' detector needs --coarse-mask for every input")
    return boxes_from_label_map(coarse, margin_px=int(options.get("box_margin", 0)),
                                min_voxels=int(options.get("min_voxels", 1)))


REGISTRY: dict[str, Detector] = {"coarse-mask": _coarse_mask}


def get_detector(name: str) -> Detector:
    try:
        return REGISTRY[name]
    except KeyError:
        raise ValueError(f"Argument 'detector' must be one of {sorted(REGISTRY)}; got '{name}'.") from None
