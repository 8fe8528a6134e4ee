"""Default post-processing chains per modality: plain data, edit freely (``validate_chain`` guards them).

Deliberately conservative: drop specks and fill pinholes, nothing that moves an outline (such steps cost Dice;
measured: docs/benchmarks.md).
"""

from __future__ import annotations

from typing import Any

DEFAULT_CHAINS: dict[str, list[dict[str, Any]]] = {
    "CT": [
        {"op": "remove_small_components", "min_volume_mm3": 10.0},
        {"op": "fill_holes_2d", "max_area_mm2": 10.0},
    ],
    "MR": [
        {"op": "remove_small_components", "min_volume_mm3": 10.0},
        {"op": "fill_holes_2d", "max_area_mm2": 10.0},
    ],
    "2D": [
        {"op": "remove_small_components_2d", "min_area_mm2": 2.0},
        {"op": "fill_holes_2d", "max_area_mm2": 2.0},
    ],
    "OT": [
        {"op": "remove_small_components_2d", "min_area_mm2": 2.0},
    ],
}
