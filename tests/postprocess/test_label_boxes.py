"""label_boxes: per-label bounding boxes equal scipy's find_objects, by projections (few labels) or one pass."""
from __future__ import annotations

import numpy as np
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from scipy import ndimage

from postprocess import label_boxes
from postprocess._crop import present_values


@given(hnp.arrays(st.sampled_from([np.uint8, np.uint16, np.int32]),
                  hnp.array_shapes(min_dims=2, max_dims=3, max_side=10),
                  elements=st.integers(0, 30)))
def test_label_boxes_equal_find_objects(label_map):
    expected = {index + 1: box for index, box in enumerate(ndimage.find_objects(label_map)) if box is not None}
    assert present_values(label_map) == sorted(expected)
    assert label_boxes(label_map) == expected  # few labels by projections, many (> 8) in one pass


def test_label_boxes_of_given_values_only():
    label_map = np.zeros((2, 5, 6), np.uint16)
    label_map[1, 2:4, 1:5] = 7
    label_map[0, 0, 0] = 2
    assert label_boxes(label_map, [7]) == {7: (slice(1, 2), slice(2, 4), slice(1, 5))}
