"""Pure post-processing of masks and label maps (numpy, scipy, OpenCV, cc3d only; inputs are never modified).

Axis order is (z, y, x), spacing is in millimetres per axis. Mask functions take bool arrays; the chain
(postprocess.chain) applies them per label of an integer label map.
"""

from medsam_engine.postprocess._crop import label_boxes
from medsam_engine.postprocess.chain import DEFAULT_CHAINS, OPS, apply_chain, default_chain, validate_chain
from medsam_engine.postprocess.components import (
    keep_largest_components_2d,
    keep_largest_components_3d,
    label_components,
    remove_small_components_2d,
    remove_small_components_3d,
)
from medsam_engine.postprocess.consistency import bridge_slice_gaps, drop_disconnected_slices
from medsam_engine.postprocess.holes import fill_holes_2d
from medsam_engine.postprocess.morphology import binary_closing, binary_opening, structuring_element_2d
from medsam_engine.postprocess.simplify import simplify_contours_2d
from medsam_engine.postprocess.smoothing import smooth_gaussian

__all__ = [
    "DEFAULT_CHAINS",
    "OPS",
    "apply_chain",
    "binary_closing",
    "binary_opening",
    "bridge_slice_gaps",
    "default_chain",
    "drop_disconnected_slices",
    "fill_holes_2d",
    "keep_largest_components_2d",
    "keep_largest_components_3d",
    "label_boxes",
    "label_components",
    "remove_small_components_2d",
    "remove_small_components_3d",
    "simplify_contours_2d",
    "smooth_gaussian",
    "structuring_element_2d",
    "validate_chain",
]
