"""MedSAM intensity mapping on real data: slab-wise computation equals the whole-volume one."""

from __future__ import annotations

import numpy as np
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from medsam_engine.pipeline.core.intensity import IntensityConfig, choose_ct_windows, to_uint8
from medsam_engine.pipeline.io.readers import read_volume


def test_ct_window_is_the_same_whatever_the_slab_size(chest_ct):
    hu = read_volume(chest_ct[0]).array
    whole = to_uint8(hu, "CT", slab=hu.shape[0])
    assert np.array_equal(to_uint8(hu, "CT", slab=1), whole)
    assert np.array_equal(to_uint8(hu, "CT", slab=5), whole)
    assert whole[hu <= -160].max() == 0
    assert whole[hu >= 240].min() == 255  # window 40/400


def test_percentile_mapping_keeps_zeros_and_is_slab_invariant(chest_ct):
    positive = np.clip(read_volume(chest_ct[0]).array.astype(np.float32) + 1000, 0, None)  # an MR-like scalar
    whole = to_uint8(positive, "MR", IntensityConfig(), slab=positive.shape[0])
    assert np.array_equal(to_uint8(positive, "MR", slab=3), whole)
    assert (whole[positive == 0] == 0).all()
    assert whole.max() == 255


@given(
    hnp.arrays(
        np.int32,
        st.tuples(st.integers(1, 3), st.integers(1, 9), st.integers(1, 9)),
        elements=st.integers(-1024, 3000),
    ),
    st.sampled_from([np.int16, np.uint16, np.int32]),
    st.sampled_from(["CT", "MR"]),
)
def test_integer_images_through_the_look_up_table_equal_the_float_path(values, dtype, modality):
    """Integer voxels are mapped by a table of the same float32 arithmetic: identical bytes."""
    array = (np.abs(values) if dtype == np.uint16 else values).astype(dtype)
    config = IntensityConfig(ct_level=-600.0, ct_width=1500.0)
    assert np.array_equal(
        to_uint8(array, modality, config, slab=2),
        to_uint8(array.astype(np.float32), modality, config, slab=2),
    )


def test_the_full_int16_range_and_single_slices_map_as_the_float_path_does():
    """Look-up indices are computed in intp: 32767 - (-32768) does not wrap; ``only`` renders just the
    slices asked for, with the whole volume's statistics, and leaves the others black."""
    array = np.array(
        [[[-32768, 0], [5, 32767]], [[-1024, 40], [3000, 100]], [[1, 2], [3, 4]]], dtype=np.int16
    )
    for modality in ("CT", "MR"):
        expected = to_uint8(array.astype(np.float32), modality)
        assert np.array_equal(to_uint8(array, modality), expected)
        part = to_uint8(array, modality, only=[2, 0])
        assert np.array_equal(part[[0, 2]], expected[[0, 2]])
        assert not part[1].any()
        floats = to_uint8(array.astype(np.float32), modality, only=[1], slab=1)
        assert np.array_equal(floats[1], expected[1])
        assert not floats[[0, 2]].any()


def test_a_prompt_sources_window_kind_comes_before_the_median_rule_and_a_configured_window_wins():
    hu = np.full((1, 4, 4), 40, dtype=np.int16)
    coarse = np.ones((1, 4, 4), dtype=np.uint16)
    coarse[0, 0] = 2
    windows = {"default": (40.0, 400.0), "lung": (-600.0, 1500.0), "bone": (400.0, 1800.0)}

    def choose(**options):
        return choose_ct_windows(hu, coarse, [1, 2], **windows, **options)

    assert choose() == {1: (40.0, 400.0), 2: (40.0, 400.0)}  # soft tissue under both labels
    assert choose(kinds={1: "lung"}) == {1: (-600.0, 1500.0), 2: (40.0, 400.0)}
    assert choose(kinds={1: "lung"}, explicit={1: (50.0, 350.0)})[1] == (50.0, 350.0)
    assert choose(kinds={1: "lung"}, auto=False)[1] == (40.0, 400.0)
