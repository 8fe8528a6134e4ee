"""The detector protocol: ``detector(volume, coarse=None) -> Detection``.

A Detection carries the prompts plus the coarse label map they were compiled from (the pipeline uses it to
pick CT windows per label) and the names of the labels it produced. Each detector declares a pydantic model
for its own options, validated when the run configuration is loaded, before any case is read.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
from pydantic import BaseModel, ConfigDict

from medsam_engine.pipeline.core.types import BoxPrompt, ObjectBox, Volume


@dataclass(frozen=True)
class Detection:
    """What a detector found on one Volume: prompts (XYXY voxel boxes), and the (z, y, x) label map they
    came from (None when there is none), and label names where the detector knows them.

    ``objects`` is set by detectors that know only a seed per object (a mark on its key slice): each
    object's range is open and the run propagates from the seed whatever the configured mode. ``warnings``
    names what the detector could not use and why (kept in the case's record); ``origins`` adds to the
    lineage record of (label, instance) where its prompt came from. ``window_kinds`` names the CT window
    ("lung", "bone" or "soft") the detector chose for a label from what it knows beyond the label map (a
    nodule in the lung is read in the lung window); the run's automatic window follows it, a configured
    label window wins."""

    prompts: list[BoxPrompt]
    label_map: np.ndarray | None = None
    label_names: dict[int, str] = field(default_factory=dict)
    objects: list[ObjectBox] | None = None
    warnings: tuple[str, ...] = ()
    origins: dict[tuple[int, int], dict[str, Any]] = field(default_factory=dict)
    window_kinds: dict[int, str] = field(default_factory=dict)


class Detector(Protocol):
    name: str

    def __call__(self, volume: Volume, coarse: np.ndarray | None = None) -> Detection: ...


class DetectorOptions(BaseModel):
    """Base of every detector's options: frozen, unknown keys refused."""

    model_config = ConfigDict(extra="forbid", frozen=True)
