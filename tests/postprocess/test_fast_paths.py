"""Component filters and hole filling against plain scipy references on random masks: the shortcuts (one
component counted without statistics, keep-all without a look-up per voxel, holes filled within their own
boxes, no claims when nothing grew) give exactly the straightforward results."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from scipy import ndimage

from medsam_engine.postprocess import apply_chain
from medsam_engine.postprocess.components import (
    keep_largest_components_3d,
    remove_small_components_2d,
    remove_small_components_3d,
)
from medsam_engine.postprocess.holes import MANY_HOLES, fill_holes_2d

masks = hnp.arrays(np.bool_, st.tuples(st.integers(1, 5), st.integers(1, 14), st.integers(1, 14)))


def _filter(mask: np.ndarray, structure: np.ndarray, keep) -> np.ndarray:
    labels, count = ndimage.label(mask, structure=structure)
    sizes = np.bincount(labels.ravel(), minlength=count + 1)
    return np.isin(labels, [k for k in range(1, count + 1) if keep(sizes[k], k, sizes)])


def _fill_reference(mask: np.ndarray, max_pixels: float) -> np.ndarray:
    out = mask.copy()
    for z, plane in enumerate(mask):
        # 4-connected background regions; the padding is the outside
        labels, count = ndimage.label(np.pad(~plane, 1, constant_values=True))
        sizes = np.bincount(labels.ravel(), minlength=count + 1)
        for k in range(1, count + 1):
            if k != labels[0, 0] and sizes[k] <= max_pixels:
                out[z] |= (labels == k)[1:-1, 1:-1]
    return out


@settings(max_examples=150, deadline=None)
@given(masks, st.integers(0, 12))
def test_small_components_removed_as_scipy_counts_them(mask, pixels):
    plane_structure = np.zeros((3, 3, 3), bool)
    plane_structure[1] = True  # 8-connected within each slice
    expected_2d = _filter(mask, plane_structure, lambda size, k, sizes: size >= pixels)
    assert np.array_equal(
        remove_small_components_2d(mask, min_area_mm2=pixels, spacing_yx=(1.0, 1.0)), expected_2d
    )
    expected_3d = _filter(mask, np.ones((3, 3, 3), bool), lambda size, k, sizes: size >= pixels)
    assert np.array_equal(
        remove_small_components_3d(mask, min_volume_mm3=pixels, spacing=(1.0, 1.0, 1.0)), expected_3d
    )


@settings(max_examples=100, deadline=None)
@given(masks)
def test_largest_component_kept_as_scipy_counts_it(mask):
    def largest(size, k, sizes):
        return k == 1 + int(np.argmax(sizes[1:]))  # the first of the largest, in raster order

    expected = _filter(mask, np.ones((3, 3, 3), bool), largest) if mask.any() else mask
    assert np.array_equal(keep_largest_components_3d(mask, k=1), expected)


@settings(max_examples=150, deadline=None)
@given(masks, st.sampled_from([0, 1, 3, 1000]))
def test_holes_filled_as_scipy_finds_them(mask, pixels):
    assert np.array_equal(
        fill_holes_2d(mask, max_area_mm2=pixels, spacing_yx=(1.0, 1.0)),
        _fill_reference(mask, pixels * (1 + 1e-9)),
    )


def test_a_plane_with_many_holes_takes_the_per_pixel_path_with_the_same_result():
    plane = np.ones((1, 40, 40), bool)
    plane[0, 2:38:3, 2:38:3] = False  # 144 one-pixel holes
    assert (~plane).sum() > MANY_HOLES
    assert fill_holes_2d(plane).all()
    assert np.array_equal(fill_holes_2d(plane), _fill_reference(plane, np.inf))


def test_a_chain_that_only_removes_claims_nothing_and_one_that_fills_claims_background():
    label_map = np.zeros((1, 12, 12), np.uint16)
    label_map[0, 1:6, 1:6] = 3
    label_map[0, 3, 3] = 0  # a one-pixel hole in label 3
    label_map[0, 8, 8] = 4  # a speck of label 4
    chain = [{"op": "remove_small_components_2d", "min_area_mm2": 2.0}]
    out, lineage = apply_chain(label_map, spacing=(1.0, 1.0, 1.0), chain=chain)
    assert out[0, 8, 8] == 0
    assert out[0, 3, 3] == 0
    assert (out == 3).sum() == 24
    out, lineage = apply_chain(label_map, spacing=(1.0, 1.0, 1.0), chain=[{"op": "fill_holes_2d"}])
    assert out[0, 3, 3] == 3
    assert out[0, 8, 8] == 4
    assert {r["label"]: r["voxels_after"] for r in lineage["labels"]} == {3: 25, 4: 1}


@settings(max_examples=100, deadline=None)
@given(
    hnp.arrays(
        np.uint16,
        st.tuples(st.integers(1, 4), st.integers(1, 12), st.integers(1, 12)),
        elements=st.sampled_from([0, 0, 0, 2, 5, 9]),
    ),
    st.sampled_from(["CT", "2D", "OT"]),
)
def test_the_lineage_counts_are_the_output_maps_counts(label_map, modality):
    """The engine takes the label values a map holds from this lineage (and gives them back to apply_chain):
    each label's ``voxels_after`` is exactly its count in the output, with the values given or counted."""
    from medsam_engine.postprocess import default_chain

    values = sorted({int(v) for v in np.unique(label_map) if v})
    counted = apply_chain(label_map, spacing=(2.0, 1.0, 1.0), chain=default_chain(modality))
    given_values = apply_chain(
        label_map, spacing=(2.0, 1.0, 1.0), chain=default_chain(modality), values=values
    )
    assert np.array_equal(counted[0], given_values[0])
    assert counted[1] == given_values[1]
    out, lineage = counted
    assert {r["label"]: r["voxels_after"] for r in lineage["labels"]} == {
        v: int((out == v).sum()) for v in values
    }
