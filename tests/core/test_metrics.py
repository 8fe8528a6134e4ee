"""present_labels and label_voxels: the histogram path for 8/16-bit maps gives np.unique's non-zero values
and counts."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from medsam_engine.pipeline.core.metrics import EXACT_FLOAT32, label_voxels, present_labels


@given(
    hnp.arrays(
        st.sampled_from([np.uint8, np.uint16, np.int32, np.uint32]),
        hnp.array_shapes(min_dims=1, max_dims=3, max_side=12),
        elements=st.integers(0, 255),
    ),
    st.sampled_from([1, 300, 65535]),
)
def test_present_labels_are_the_non_zero_values(label_map, scale):
    if label_map.dtype != np.uint8:
        label_map = (label_map.astype(np.int64) * scale % 65536).astype(label_map.dtype)
    values, counts = np.unique(label_map, return_counts=True)
    assert present_labels(label_map) == [int(v) for v in values if v != 0]
    assert label_voxels(label_map) == {int(v): int(n) for v, n in zip(values, counts, strict=True) if v != 0}


def test_label_voxels_count_exactly_past_what_one_float32_histogram_holds():
    label_map = np.ones((EXACT_FLOAT32 // 1024 + 3, 1024), np.uint8)  # 2**24 + 3072 voxels of label 1
    label_map[0, :5] = 2
    assert label_voxels(label_map) == {1: label_map.size - 5, 2: 5}


def test_present_labels_on_an_empty_map_and_the_largest_uint16():
    assert present_labels(np.zeros((0, 4), np.uint16)) == []
    assert present_labels(np.zeros((3, 4, 5), np.uint8)) == []
    assert present_labels(np.array([[0, 65535], [3, 3]], np.uint16)) == [3, 65535]


def test_boundary_distance_is_the_mean_surface_distance_in_mm():
    from medsam_engine.pipeline.core.metrics import boundary_distance_mm

    a = np.zeros((1, 20, 20), bool)
    a[0, 5:15, 5:15] = True
    b = np.zeros_like(a)
    b[0, 5:15, 7:17] = True  # shifted 2 columns
    assert boundary_distance_mm(a, a, spacing=(1.0, 1.0, 1.0)) == 0.0
    shifted = boundary_distance_mm(a, b, spacing=(1.0, 1.0, 1.0))
    assert 0.0 < shifted <= 2.0
    assert boundary_distance_mm(a, b, spacing=(1.0, 1.0, 0.5)) == pytest.approx(shifted / 2, rel=0.35)
    assert boundary_distance_mm(a, np.zeros_like(a), spacing=(1.0, 1.0, 1.0)) is None
    assert boundary_distance_mm(np.zeros_like(a), np.zeros_like(a), spacing=(1.0, 1.0, 1.0)) == 0.0
