"""The operations a chain may name: an explicit dict from op name to function and parameter rules.

Each function takes a bool mask as its first argument and keyword-only options; the chain passes the case's
spacing as ``spacing`` (z, y, x) or ``spacing_yx`` (y, x), as the entry says. Op names without a suffix work
on the whole (z, y, x) volume; ``_2d`` ops work slice by slice.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Literal

import numpy as np

from medsam_engine.postprocess._checks import check_bool, check_int, check_number, check_optional_number
from medsam_engine.postprocess.components import (
    keep_largest_components_2d,
    keep_largest_components_3d,
    remove_small_components_2d,
    remove_small_components_3d,
)
from medsam_engine.postprocess.consistency import bridge_slice_gaps, drop_disconnected_slices
from medsam_engine.postprocess.holes import fill_holes_2d
from medsam_engine.postprocess.morphology import binary_closing, binary_opening
from medsam_engine.postprocess.simplify import simplify_contours_2d
from medsam_engine.postprocess.smoothing import smooth_gaussian

REQUIRED: Any = object()  # marks a parameter without a default


@dataclass(frozen=True)
class Param:
    """One parameter: ``check(value, name=...)`` returns the normalised value or raises ValueError."""

    check: Callable[..., Any]
    default: Any = REQUIRED


@dataclass(frozen=True)
class Op:
    """A registered operation: the function, its parameters, and which spacing keyword it takes (if any)."""

    function: Callable[..., np.ndarray]
    params: Mapping[str, Param] = field(default_factory=dict)
    spacing: Literal["spacing", "spacing_yx"] | None = None

    def run(
        self, mask: np.ndarray, *, spacing: tuple[float, float, float], params: Mapping[str, Any]
    ) -> np.ndarray:
        """Apply to a bool (z, y, x) mask with the case's (z, y, x) spacing in mm; returns a new mask."""
        options = dict(params)
        if self.spacing == "spacing":
            options["spacing"] = spacing
        elif self.spacing == "spacing_yx":
            options["spacing_yx"] = spacing[1:]
        return self.function(mask, **options)


_MM = Param(check_number)
_FLAG_TRUE = Param(check_bool, default=True)
_COUNT = Param(partial(check_int, minimum=1), default=1)

OPS: dict[str, Op] = {
    "remove_small_components": Op(remove_small_components_3d, {"min_volume_mm3": _MM}, "spacing"),
    "remove_small_components_2d": Op(remove_small_components_2d, {"min_area_mm2": _MM}, "spacing_yx"),
    "keep_largest_components": Op(keep_largest_components_3d, {"k": _COUNT}),
    "keep_largest_components_2d": Op(keep_largest_components_2d, {"k": _COUNT}),
    "fill_holes_2d": Op(fill_holes_2d, {"max_area_mm2": Param(check_optional_number, None)}, "spacing_yx"),
    "opening": Op(binary_opening, {"radius_mm": _MM, "in_plane": _FLAG_TRUE}, "spacing"),
    "closing": Op(binary_closing, {"radius_mm": _MM, "in_plane": _FLAG_TRUE}, "spacing"),
    "smooth_gaussian": Op(smooth_gaussian, {"sigma_mm": _MM, "in_plane": _FLAG_TRUE}, "spacing"),
    "simplify_contours_2d": Op(simplify_contours_2d, {"tolerance_mm": _MM}, "spacing_yx"),
    "drop_disconnected_slices": Op(drop_disconnected_slices, {"max_gap": Param(check_int, 0)}),
    "bridge_slice_gaps": Op(bridge_slice_gaps),
}
