"""label_boxes and label_components against scipy: per-label bounding boxes (by projections for a few labels,
else one pass) and connected components (cc3d)."""

from __future__ import annotations

import numpy as np
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from scipy import ndimage

from medsam_engine.postprocess import label_boxes
from medsam_engine.postprocess._crop import present_values


@given(
    hnp.arrays(
        st.sampled_from([np.uint8, np.uint16, np.int32]),
        hnp.array_shapes(min_dims=2, max_dims=3, max_side=10),
        elements=st.integers(0, 30),
    )
)
def test_label_boxes_equal_find_objects(label_map):
    expected = {
        index + 1: box for index, box in enumerate(ndimage.find_objects(label_map)) if box is not None
    }
    assert present_values(label_map) == sorted(expected)
    assert label_boxes(label_map) == expected  # few labels by projections, many (> 8) in one pass


def test_label_boxes_of_given_values_only():
    label_map = np.zeros((2, 5, 6), np.uint16)
    label_map[1, 2:4, 1:5] = 7
    label_map[0, 0, 0] = 2
    assert label_boxes(label_map, [7]) == {7: (slice(1, 2), slice(2, 4), slice(1, 5))}


@given(
    hnp.arrays(np.bool_, st.tuples(st.integers(1, 6), st.integers(1, 6), st.integers(1, 6))),
    st.sampled_from([(6, 1), (18, 2), (26, 3)]),
)
def test_label_components_equal_scipy_labels_even_on_one_voxel_thin_arrays(mask, connectivity):
    """cc3d on its own fails on shapes such as (1, 3, 1); the padded call gives scipy's labels, same order."""
    from medsam_engine.postprocess import label_components

    neighbours, rank = connectivity
    labels, count = label_components(mask, neighbours)
    expected, expected_count = ndimage.label(mask, structure=ndimage.generate_binary_structure(3, rank))
    assert count == expected_count
    assert np.array_equal(labels, expected)
