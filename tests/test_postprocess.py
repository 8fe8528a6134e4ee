"""Post-processing: exact expectations on hand-written masks."""
from __future__ import annotations

import numpy as np

from postprocess.components import remove_small_components_2d


def test_islands_below_the_area_in_mm2_are_removed_and_input_kept():
    mask = np.zeros((10, 10), dtype=bool)
    mask[0:2, 0:2] = True  # 4 px = 1 mm² at 0.5 mm
    mask[5:9, 5:9] = True  # 16 px = 4 mm²
    before = mask.copy()
    out = remove_small_components_2d(mask, min_area_mm2=2.0, spacing_yx=(0.5, 0.5))
    assert out.sum() == 16 and out[5:9, 5:9].all()
    assert np.array_equal(mask, before)


def test_anisotropic_spacing_counts_millimetres_not_pixels():
    mask = np.zeros((1, 10, 10), dtype=bool)
    mask[0, 0:2, 0:2] = True  # 4 px of 1 x 3 mm = 12 mm²
    assert remove_small_components_2d(mask, min_area_mm2=10, spacing_yx=(1.0, 3.0)).sum() == 4
    assert remove_small_components_2d(mask, min_area_mm2=13, spacing_yx=(1.0, 3.0)).sum() == 0


def test_zero_area_keeps_everything():
    mask = np.eye(5, dtype=bool)
    assert np.array_equal(remove_small_components_2d(mask, min_area_mm2=0, spacing_yx=(1, 1)), mask)
