"""The incremental overlap resolver of slice mode against the whole-stack argmax it replaces."""

from __future__ import annotations

import numpy as np
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from medsam_engine.pipeline.annotate.segment import SliceResolver, resolve_slice
from medsam_engine.pipeline.model.runner import SIGMOID_HALF

EDGES = [-3.0, 0.0, float(SIGMOID_HALF), float(np.nextafter(SIGMOID_HALF, np.float32(1))), 0.5, 2.0, 7.0]


@given(
    hnp.arrays(
        np.float32,
        st.tuples(st.integers(1, 5), st.integers(1, 6), st.integers(1, 6)),
        elements=st.sampled_from(EDGES),
    ),
    st.integers(1, 4),
)
def test_the_resolver_picks_the_highest_claiming_box_ties_to_the_earlier(logits, part):
    values = np.arange(1, len(logits) + 1, dtype=np.uint16) * 3
    labels, winner = resolve_slice(logits, values)
    for announced in (None, len(logits)):  # int32 winners, or uint8 with OpenCV's table and histogram
        resolver = SliceResolver(logits.shape[1:], boxes=announced)
        for start in range(0, len(logits), part):  # boxes arrive in decoder calls of ``part``
            resolver.add(logits[start : start + part])
        assert np.array_equal(resolver.winner, winner)
        assert resolver.count == len(logits)
        assert np.array_equal(resolver.labels(values), labels)
        assert resolver.pixels_won().tolist() == [int((winner == k).sum()) for k in range(len(logits))]


def test_a_reused_resolver_starts_each_slice_afresh_and_writes_labels_in_place():
    first = np.array([[[2.0, -1.0], [3.0, 0.5]]], np.float32)
    second = np.array([[[-2.0, 4.0], [-1.0, -1.0]], [[1.0, 5.0], [-3.0, -3.0]]], np.float32)
    resolver = SliceResolver((2, 2), boxes=1)
    resolver.add(first)
    resolver.reset(boxes=300)  # int32 winners now
    resolver.add(second)
    assert resolver.winner.tolist() == [[1, 1], [-1, -1]]
    assert resolver.count == 2
    out = np.full((2, 2), 9, np.uint16)
    assert resolver.labels(np.array([4, 7], np.uint16), out=out) is out
    assert out.tolist() == [[7, 7], [0, 0]]
    resolver.reset(boxes=2)
    resolver.add(second)
    resolver.labels(np.array([4, 7], np.uint16), out=out)
    assert out.tolist() == [[7, 7], [0, 0]]
    assert resolver.pixels_won().tolist() == [0, 2]
