"""Post-processing: properties over random small masks (hypothesis), checked against simple oracles."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from scipy import ndimage

from medsam_engine.postprocess.components import (
    keep_largest_components_2d,
    keep_largest_components_3d,
    remove_small_components_2d,
    remove_small_components_3d,
)
from medsam_engine.postprocess.consistency import bridge_slice_gaps, drop_disconnected_slices
from medsam_engine.postprocess.holes import fill_holes_2d
from medsam_engine.postprocess.morphology import binary_closing, binary_opening
from medsam_engine.postprocess.simplify import simplify_contours_2d
from medsam_engine.postprocess.smoothing import smooth_gaussian

FAST = settings(max_examples=60, deadline=None)

volumes = hnp.arrays(np.bool_, st.tuples(st.integers(1, 4), st.integers(1, 9), st.integers(1, 9)))
planes = hnp.arrays(np.bool_, st.tuples(st.integers(1, 10), st.integers(1, 10)))
millimetres = st.sampled_from([0.4, 0.7, 1.0, 1.5, 2.5])
spacings = st.tuples(millimetres, millimetres, millimetres)
radii = st.sampled_from([0.0, 0.5, 1.0, 1.5, 2.2, 3.0])


def _frozen(mask: np.ndarray) -> np.ndarray:
    """A read-only copy: any in-place write by the function under test raises."""
    frozen = mask.copy()
    frozen.flags.writeable = False
    return frozen


OPERATIONS = {
    "remove_2d": lambda m, s: remove_small_components_2d(m, min_area_mm2=3.0, spacing_yx=s[1:]),
    "remove_3d": lambda m, s: remove_small_components_3d(m, min_volume_mm3=5.0, spacing=s),
    "largest_2d": lambda m, s: keep_largest_components_2d(m, k=2),
    "largest_3d": lambda m, s: keep_largest_components_3d(m, k=2),
    "fill": lambda m, s: fill_holes_2d(m),
    "fill_small": lambda m, s: fill_holes_2d(m, max_area_mm2=2.0, spacing_yx=s[1:]),
    "opening": lambda m, s: binary_opening(m, radius_mm=1.5, spacing=s),
    "closing": lambda m, s: binary_closing(m, radius_mm=1.5, spacing=s),
    "opening_3d": lambda m, s: binary_opening(m, radius_mm=1.5, spacing=s, in_plane=False),
    "closing_3d": lambda m, s: binary_closing(m, radius_mm=1.5, spacing=s, in_plane=False),
    "drop_slices": lambda m, s: drop_disconnected_slices(m, max_gap=1),
}
IDEMPOTENT = list(OPERATIONS)
EVERYTHING = {
    **OPERATIONS,
    "gaussian": lambda m, s: smooth_gaussian(m, sigma_mm=1.0, spacing=s),
    "simplify": lambda m, s: simplify_contours_2d(m, tolerance_mm=1.0, spacing_yx=s[1:]),
    "bridge": lambda m, s: bridge_slice_gaps(m),
}


@FAST
@given(mask=volumes, spacing=spacings, name=st.sampled_from(sorted(EVERYTHING)))
def test_every_operation_is_pure_and_keeps_shape_and_dtype(mask, spacing, name):
    frozen = _frozen(mask)
    out = EVERYTHING[name](frozen, spacing)
    assert np.array_equal(frozen, mask)
    assert out.dtype == np.bool_
    assert out.shape == mask.shape
    assert out is not frozen
    assert not np.shares_memory(out, frozen)


@FAST
@given(mask=volumes, spacing=spacings, name=st.sampled_from(IDEMPOTENT))
def test_idempotent_operations(mask, spacing, name):
    once = OPERATIONS[name](mask, spacing)
    assert np.array_equal(OPERATIONS[name](once, spacing), once)


@FAST
@given(
    plane=planes,
    spacing=spacings,
    name=st.sampled_from(
        ["remove_2d", "largest_2d", "fill", "fill_small", "opening", "closing", "gaussian", "simplify"]
    ),
)
def test_a_2d_image_is_a_volume_with_one_slice(plane, spacing, name):
    spacing_yx = spacing[1:]
    as_image = EVERYTHING[name](plane, spacing_yx if name in ("opening", "closing", "gaussian") else spacing)
    as_volume = EVERYTHING[name](plane[None], spacing)
    assert np.array_equal(as_image, as_volume[0])


def _distance_mm(mask: np.ndarray, spacing, in_plane: bool) -> np.ndarray:
    """Distance in mm from each voxel to the nearest True voxel of ``mask`` (in-plane: per slice)."""
    if not in_plane:
        if not mask.any():
            return np.full(mask.shape, np.inf)
        return ndimage.distance_transform_edt(~mask, sampling=spacing)
    return np.stack([_distance_mm(plane[None], (1.0, *spacing[1:]), False)[0] for plane in mask])


@FAST
@given(mask=volumes, spacing=spacings, radius=radii, in_plane=st.booleans())
def test_closing_contains_the_mask_and_adds_only_voxels_within_the_radius(mask, spacing, radius, in_plane):
    closed = binary_closing(mask, radius_mm=radius, spacing=spacing, in_plane=in_plane)
    assert not (mask & ~closed).any()
    added = closed & ~mask
    assert (_distance_mm(mask, spacing, in_plane)[added] <= radius * (1 + 1e-9)).all()


@FAST
@given(mask=volumes, spacing=spacings, radius=radii, in_plane=st.booleans())
def test_opening_never_adds_voxels(mask, spacing, radius, in_plane):
    assert not (binary_opening(mask, radius_mm=radius, spacing=spacing, in_plane=in_plane) & ~mask).any()


def _ball(radius: float, spacing) -> np.ndarray:
    half = [int(radius * (1 + 1e-9) // s) for s in spacing]
    grids = np.meshgrid(
        *[np.arange(-h, h + 1) * s for h, s in zip(half, spacing, strict=False)], indexing="ij"
    )
    return sum(g * g for g in grids) <= (radius * (1 + 1e-9)) ** 2


@FAST
@given(mask=volumes, spacing=spacings, radius=radii)
def test_3d_morphology_matches_scipy_with_the_same_ball(mask, spacing, radius):
    ball = _ball(radius, spacing)
    opened = ndimage.binary_opening(mask, structure=ball, border_value=0)
    assert np.array_equal(binary_opening(mask, radius_mm=radius, spacing=spacing, in_plane=False), opened)
    pad = [(h, h) for h in ball.shape]
    closed = ndimage.binary_closing(np.pad(mask, pad), structure=ball)[tuple(slice(p, -p) for p, _ in pad)]
    assert np.array_equal(binary_closing(mask, radius_mm=radius, spacing=spacing, in_plane=False), closed)


@FAST
@given(mask=volumes)
def test_filling_every_hole_matches_scipy_per_slice(mask):
    expected = np.stack([ndimage.binary_fill_holes(plane) for plane in mask])
    assert np.array_equal(fill_holes_2d(mask), expected)


@FAST
@given(mask=volumes, spacing=spacings, limit=st.sampled_from([0.0, 1.0, 4.0, 20.0]))
def test_removal_matches_a_plain_label_and_count(mask, spacing, limit):
    labels, _ = ndimage.label(mask, structure=np.ones((3, 3, 3)))
    sizes = np.bincount(labels.ravel()) * np.prod(spacing)
    expected = (sizes >= limit * (1 - 1e-9))[labels] & mask
    assert np.array_equal(remove_small_components_3d(mask, min_volume_mm3=limit, spacing=spacing), expected)


@FAST
@given(mask=volumes, k=st.integers(1, 4))
def test_keep_largest_keeps_at_most_k_components_and_only_existing_voxels(mask, k):
    kept = keep_largest_components_3d(mask, k=k)
    _, count = ndimage.label(kept, structure=np.ones((3, 3, 3)))
    _, before = ndimage.label(mask, structure=np.ones((3, 3, 3)))
    assert count == min(k, before)
    assert not (kept & ~mask).any()


@FAST
@given(mask=volumes, spacing=spacings)
def test_simplification_with_zero_tolerance_changes_nothing(mask, spacing):
    assert np.array_equal(simplify_contours_2d(mask, tolerance_mm=0, spacing_yx=spacing[1:]), mask)


@FAST
@given(mask=volumes, gap=st.integers(0, 2))
def test_dropped_slices_leave_one_run_of_the_input(mask, gap):
    out = drop_disconnected_slices(mask, max_gap=gap)
    filled = np.flatnonzero(out.any(axis=(1, 2)))
    assert not (out & ~mask).any()
    assert filled.size == 0 or (np.diff(filled) <= gap + 1).all()
    assert np.array_equal(out[filled], mask[filled])
    assert out.any() == mask.any()


@FAST
@given(mask=volumes)
def test_bridging_changes_only_empty_slices_and_stays_inside_the_neighbours(mask):
    out = bridge_slice_gaps(mask)
    empty = ~mask.any(axis=(1, 2))
    assert np.array_equal(out[~empty], mask[~empty])
    for z in np.flatnonzero(empty & out.any(axis=(1, 2))):
        assert not (out[z] & ~(mask[z - 1] & mask[z + 1])).any()
