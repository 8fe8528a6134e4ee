"""Box jitter, as reviewers draw boxes: in voxels (quality checks) and in the model's frame (fine-tuning)."""

from __future__ import annotations

import numpy as np

from medsam_engine.pipeline.core.boxes import jitter_boxes


def test_voxel_boxes_move_by_whole_pixels_within_the_fraction_and_the_slice():
    boxes = np.array([[10, 20, 29, 39], [0, 0, 3, 3]], dtype=np.float32)
    moved = jitter_boxes(boxes, 0.1, np.random.default_rng(1), (50, 40))
    assert np.array_equal(moved, np.round(moved))
    assert np.all(np.abs(moved[0] - boxes[0]) <= np.array([2, 2, 2, 2]))  # 10 % of 20 px = 2 px
    assert np.all(moved[:, 2:] >= moved[:, :2])
    assert moved[:, [0, 2]].max() <= 39
    assert moved[:, [1, 3]].max() <= 49
    assert moved.min() >= 0


def test_model_frame_boxes_move_continuously_and_the_same_draws_give_the_same_boxes():
    boxes = np.array([[10.5, 20.25, 30.5, 40.25]], dtype=np.float32)
    first = jitter_boxes(boxes, 0.05, np.random.default_rng(7), (256, 256), pixels=False)
    again = jitter_boxes(boxes, 0.05, np.random.default_rng(7), (256, 256), pixels=False)
    assert np.array_equal(first, again)
    assert not np.array_equal(first, np.round(first))
    assert np.all(np.abs(first - boxes) <= 1.0 + 1e-6)  # 5 % of 20 px is below the 1 px floor
