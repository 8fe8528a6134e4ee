"""Prompt sources: each turns a Volume (and what the user gave) into box prompts.

``build_detector(name, rules=..., options=...)`` returns a callable ``(volume, coarse=None) -> Detection``;
``REGISTRY`` lists what ``--detector NAME`` accepts. Importing this package never loads torch: the learned
detector imports it when it is built.
"""

from medsam_engine.detectors.coarse_mask import BoxRules, boxes_from_label_map, compile_boxes, object_boxes
from medsam_engine.detectors.protocol import Detection, Detector, DetectorOptions
from medsam_engine.detectors.registry import (
    REGISTRY,
    DetectorSpec,
    build_detector,
    get_spec,
    validate_options,
)

__all__ = [
    "REGISTRY",
    "BoxRules",
    "Detection",
    "Detector",
    "DetectorOptions",
    "DetectorSpec",
    "boxes_from_label_map",
    "build_detector",
    "compile_boxes",
    "get_spec",
    "object_boxes",
    "validate_options",
]
