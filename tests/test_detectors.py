"""Coarse-mask prompt compiler on tiny hand-written label maps."""
from __future__ import annotations

import numpy as np
import pytest

from detectors import get_detector
from detectors.coarse_mask import boxes_from_label_map


def test_two_blobs_of_one_label_are_two_instances():
    labels = np.zeros((2, 10, 10), dtype=np.uint8)
    labels[0, 1:3, 1:4] = 5
    labels[0, 6:9, 5:7] = 5
    labels[1, 6:8, 5:6] = 5
    prompts = boxes_from_label_map(labels)
    assert [(p.label, p.instance, p.z, p.box) for p in prompts] == [
        (5, 1, 0, (1, 1, 3, 2)),
        (5, 2, 0, (5, 6, 6, 8)),
        (5, 2, 1, (5, 6, 5, 7)),
    ]


def test_margin_is_added_and_clipped_at_the_border():
    labels = np.zeros((1, 8, 8), dtype=np.uint8)
    labels[0, 0:2, 5:8] = 1
    (prompt,) = boxes_from_label_map(labels, margin_px=2)
    assert prompt.box == (3, 0, 7, 3)


def test_empty_label_map_gives_no_prompts():
    assert boxes_from_label_map(np.zeros((3, 4, 4), dtype=np.uint8)) == []


def test_small_components_are_ignored():
    labels = np.zeros((1, 8, 8), dtype=np.uint8)
    labels[0, 0, 0] = 2
    labels[0, 4:7, 4:7] = 2
    prompts = boxes_from_label_map(labels, min_voxels=2)
    assert [(p.instance, p.box) for p in prompts] == [(1, (4, 4, 6, 6))]


def test_negative_margin_and_unknown_detector_are_refused():
    with pytest.raises(ValueError, match="margin_px"):
        boxes_from_label_map(np.zeros((1, 2, 2), np.uint8), margin_px=-1)
    with pytest.raises(ValueError, match="detector"):
        get_detector("nope")
