"""MedSAM intensity mapping on real data: slab-wise computation equals the whole-volume one."""
from __future__ import annotations

import numpy as np

from pipeline.core.intensity import IntensityConfig, to_uint8
from pipeline.io.readers import read_volume


def test_ct_window_is_the_same_whatever_the_slab_size(chest_ct):
    hu = read_volume(chest_ct[0]).array
    whole = to_uint8(hu, "CT", slab=hu.shape[0])
    assert np.array_equal(to_uint8(hu, "CT", slab=1), whole)
    assert np.array_equal(to_uint8(hu, "CT", slab=5), whole)
    assert whole[hu <= -160].max() == 0 and whole[hu >= 240].min() == 255  # window 40/400


def test_percentile_mapping_keeps_zeros_and_is_slab_invariant(chest_ct):
    positive = np.clip(read_volume(chest_ct[0]).array.astype(np.float32) + 1000, 0, None)  # an MR-like scalar
    whole = to_uint8(positive, "MR", IntensityConfig(), slab=positive.shape[0])
    assert np.array_equal(to_uint8(positive, "MR", slab=3), whole)
    assert (whole[positive == 0] == 0).all() and whole.max() == 255
