"""The explicit registry behind ``--detector NAME`` (the protocol is in detectors.protocol)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from pydantic import Field, ValidationError

from medsam_engine.detectors.coarse_mask import BoxRules, compile_boxes
from medsam_engine.detectors.intensity import IntensityDetector, IntensityOptions
from medsam_engine.detectors.marks import MarksDetector, MarksOptions
from medsam_engine.detectors.protocol import Detection, Detector, DetectorOptions
from medsam_engine.pipeline.core.types import CaseRef, Volume


@dataclass(frozen=True)
class DetectorSpec:
    """A registry entry: how to build the detector from box rules, validated options and (optionally)
    a model provider (an object with ``get()`` returning a LiteMedSAMRunner, loaded on first use); with
    ``needs_case`` the builder also takes the case (``case=``), whose files the detector reads."""

    name: str
    options: type[DetectorOptions]
    build: Callable[..., Detector]
    needs_coarse_mask: bool = False
    needs_model: bool = False
    description: str = ""
    needs_case: bool = False


class CoarseMaskOptions(DetectorOptions):
    """The coarse-mask compiler has no options beyond the shared box rules."""


@dataclass(frozen=True)
class CoarseMaskDetector:
    """Boxes from a label map the user gives (TotalSegmentator output, last round's masks, ...)."""

    rules: BoxRules
    name: str = "coarse-mask"

    def __call__(self, volume: Volume, coarse: np.ndarray | None = None) -> Detection:
        if coarse is None:
            raise ValueError("the 'coarse-mask' detector needs --coarse-mask for every input")
        return Detection(compile_boxes(coarse, spacing=volume.spacing, rules=self.rules), coarse)


def _build_intensity(rules: BoxRules, options: Any, runner: Any) -> Detector:
    return IntensityDetector(rules=rules, options=options)


def _build_learned(rules: BoxRules, options: Any, runner: Any) -> Detector:
    from medsam_engine.detectors.learned import LearnedDetector

    return LearnedDetector.from_artefact(
        options.artefact, rules=rules, runner=runner, threshold=options.threshold
    )


def _build_marks(rules: BoxRules, options: Any, runner: Any, *, case: CaseRef | None = None) -> Detector:
    return MarksDetector(rules=rules, options=options, case=case)


class LearnedOptions(DetectorOptions):
    """The trained head to use and where its heat maps become objects."""

    artefact: str = Field(description="file written by `medsam-engine detector train` (e.g. detector.pt)")
    threshold: float = Field(0.5, description="heat-map value above which a voxel belongs to an object")


REGISTRY: dict[str, DetectorSpec] = {
    "coarse-mask": DetectorSpec(
        "coarse-mask",
        CoarseMaskOptions,
        lambda r, o, m: CoarseMaskDetector(r),
        needs_coarse_mask=True,
        description="boxes from a label map per input",
    ),
    "intensity": DetectorSpec(
        "intensity",
        IntensityOptions,
        _build_intensity,
        description="CT body/lungs/bone by HU, MR head, 2D blobs by Otsu; no labels",
    ),
    "learned": DetectorSpec(
        "learned",
        LearnedOptions,
        _build_learned,
        needs_model=True,
        description="a head on LiteMedSAM embeddings trained by `detector train`",
    ),
    "marks": DetectorSpec(
        "marks",
        MarksOptions,
        _build_marks,
        description="seed boxes from radiologists' GSPS/SR marks (marks=PATH), propagated through slices",
        needs_case=True,
    ),
}


def get_spec(name: str) -> DetectorSpec:
    try:
        return REGISTRY[name]
    except KeyError:
        raise ValueError(f"Argument 'detector' must be one of {sorted(REGISTRY)}; got '{name}'.") from None


def validate_options(name: str, options: dict) -> DetectorOptions:
    """The detector's options as its pydantic model; ValueError naming the detector and the field."""
    spec = get_spec(name)
    try:
        return spec.options.model_validate(options)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors())
        raise ValueError(f"options of detector '{name}' are invalid: {problems}") from None


def build_detector(
    name: str,
    *,
    rules: BoxRules = BoxRules(),
    options: dict | None = None,
    runner: Any = None,
    case: CaseRef | None = None,
) -> Detector:
    """The registered detector ``name`` with validated ``options``; ``runner`` serves detectors that need
    the model (it must have ``get()``), ``case`` those that read the case's files (``needs_case``)."""
    spec = get_spec(name)
    if spec.needs_model and runner is None:
        raise ValueError(f"detector '{name}' needs the model; pass a runner")
    validated = validate_options(name, options or {})
    if spec.needs_case:
        return spec.build(rules, validated, runner, case=case)
    return spec.build(rules, validated, runner)
