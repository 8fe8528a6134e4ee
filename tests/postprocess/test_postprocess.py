"""Post-processing: exact expectations on hand-written masks."""

from __future__ import annotations

import numpy as np
import pytest

from medsam_engine.postprocess.components import (
    keep_largest_components_2d,
    keep_largest_components_3d,
    remove_small_components_2d,
    remove_small_components_3d,
)
from medsam_engine.postprocess.consistency import bridge_slice_gaps, drop_disconnected_slices
from medsam_engine.postprocess.holes import fill_holes_2d
from medsam_engine.postprocess.morphology import binary_closing, binary_opening, structuring_element_2d
from medsam_engine.postprocess.simplify import simplify_contours_2d
from medsam_engine.postprocess.smoothing import smooth_gaussian


def _mask(rows: list[str]) -> np.ndarray:
    """A (y, x) bool mask drawn with '#' for True and '.' for False."""
    return np.array([[c == "#" for c in row] for row in rows], dtype=bool)


# --- components ---------------------------------------------------------------------------------------------


def test_islands_below_the_area_in_mm2_are_removed_and_input_kept():
    mask = np.zeros((10, 10), dtype=bool)
    mask[0:2, 0:2] = True  # 4 px = 1 mm² at 0.5 mm
    mask[5:9, 5:9] = True  # 16 px = 4 mm²
    before = mask.copy()
    out = remove_small_components_2d(mask, min_area_mm2=2.0, spacing_yx=(0.5, 0.5))
    assert out.sum() == 16
    assert out[5:9, 5:9].all()
    assert np.array_equal(mask, before)


def test_anisotropic_spacing_counts_millimetres_not_pixels():
    mask = np.zeros((1, 10, 10), dtype=bool)
    mask[0, 0:2, 0:2] = True  # 4 px of 1 x 3 mm = 12 mm²
    assert remove_small_components_2d(mask, min_area_mm2=10, spacing_yx=(1.0, 3.0)).sum() == 4
    assert remove_small_components_2d(mask, min_area_mm2=13, spacing_yx=(1.0, 3.0)).sum() == 0


def test_zero_area_keeps_everything():
    mask = np.eye(5, dtype=bool)
    assert np.array_equal(remove_small_components_2d(mask, min_area_mm2=0, spacing_yx=(1, 1)), mask)


def test_area_exactly_at_the_limit_is_kept_despite_rounding():
    mask = np.ones((3, 3), dtype=bool)  # 9 px of 0.1 x 0.7 mm = 0.63 mm² (not exact in binary)
    assert remove_small_components_2d(mask, min_area_mm2=0.63, spacing_yx=(0.1, 0.7)).sum() == 9


def test_diagonal_pixels_are_one_component_in_2d():
    mask = np.eye(3, dtype=bool)  # 3 px connected by corners (8-connectivity)
    assert remove_small_components_2d(mask, min_area_mm2=3, spacing_yx=(1, 1)).sum() == 3


def test_3d_islands_kept_or_removed_by_volume_in_mm3():
    mask = np.zeros((4, 6, 6), dtype=bool)
    mask[0:2, 0:2, 0:2] = True  # 8 voxels
    mask[2:4, 3:6, 3:6] = True  # 18 voxels, not touching the first
    # 8 voxels are 8 mm³ at 1 mm but 24 mm³ at 3 x 1 x 1 mm: the same voxels, in or out by millimetres.
    small_voxels = remove_small_components_3d(mask, min_volume_mm3=10, spacing=(1, 1, 1))
    thick_slices = remove_small_components_3d(mask, min_volume_mm3=10, spacing=(3, 1, 1))
    assert small_voxels.sum() == 18
    assert not small_voxels[0:2, 0:2, 0:2].any()
    assert np.array_equal(thick_slices, mask)


def test_3d_components_connect_through_corners_across_slices():
    mask = np.zeros((2, 3, 3), dtype=bool)
    mask[0, 0, 0] = mask[1, 1, 1] = True  # 26-connected: one component of 2 voxels
    assert remove_small_components_3d(mask, min_volume_mm3=2, spacing=(1, 1, 1)).sum() == 2


def test_keep_largest_k_per_slice_and_ties_go_to_raster_order():
    plane = _mask(["###..#.", "##.....", ".....##", ".......", "#......"])
    # components: 5 px (top left), 1 px (top right), 2 px (middle right), 1 px (bottom left)
    assert np.array_equal(
        keep_largest_components_2d(plane, k=1), _mask(["###....", "##.....", ".......", ".......", "......."])
    )
    two = keep_largest_components_2d(plane, k=2)
    assert two.sum() == 7
    assert two[2, 5:7].all()
    three = keep_largest_components_2d(plane, k=3)
    assert three.sum() == 8
    assert three[0, 5]
    assert not three[4, 0]  # the 1-px tie: first in raster order wins
    other = np.zeros_like(plane)
    other[4, 0] = True
    per_slice = keep_largest_components_2d(np.stack([plane, other]), k=1)
    assert per_slice[0].sum() == 5
    assert per_slice[1, 4, 0]
    assert per_slice[1].sum() == 1


def test_keep_largest_k_in_3d():
    mask = np.zeros((3, 5, 5), dtype=bool)
    mask[0:3, 0, 0] = True  # 3 voxels along z
    mask[0, 3:5, 3:5] = True  # 4 voxels in one slice
    mask[2, 4, 2] = True  # 1 voxel
    largest = keep_largest_components_3d(mask, k=1)
    assert largest.sum() == 4
    assert largest[0, 3:5, 3:5].all()
    assert keep_largest_components_3d(mask, k=2).sum() == 7
    assert np.array_equal(keep_largest_components_3d(mask, k=5), mask)


# --- holes --------------------------------------------------------------------------------------------------


def test_hole_of_known_area_filled_and_larger_hole_kept():
    plane = _mask(
        [
            "#######....",
            "#.##..#....",
            "####..#....",
            "#######....",
            "...........",
            "...###.....",
            "...#.#.....",
            "...###.....",
        ]
    )
    # hole A: 1 px at (1, 1); hole B: 4 px at (1:3, 4:6); hole C: 1 px at (6, 4)
    pixel_mm2 = 0.5 * 2.0
    out = fill_holes_2d(plane, max_area_mm2=1 * pixel_mm2, spacing_yx=(0.5, 2.0))
    expected = plane.copy()
    expected[1, 1] = expected[6, 4] = True
    assert np.array_equal(out, expected)
    everything = fill_holes_2d(plane)
    expected[1:3, 4:6] = True
    assert np.array_equal(everything, expected)
    assert np.array_equal(fill_holes_2d(plane, max_area_mm2=4.0, spacing_yx=(0.5, 2.0)), expected)


def test_background_touching_the_border_is_not_a_hole():
    plane = _mask(["#.#", "#.#", "###"])
    assert np.array_equal(fill_holes_2d(plane), plane)


def test_holes_are_filled_slice_by_slice_not_through_z():
    volume = np.ones((3, 3, 3), dtype=bool)
    volume[:, 1, 1] = False  # a tunnel along z: a hole in every slice
    assert fill_holes_2d(volume).all()


def test_max_area_needs_spacing():
    with pytest.raises(ValueError, match="'spacing_yx'"):
        fill_holes_2d(np.ones((3, 3), dtype=bool), max_area_mm2=1.0)


# --- morphology ---------------------------------------------------------------------------------------------


def test_opening_removes_a_one_pixel_spur():
    plane = np.zeros((9, 9), dtype=bool)
    plane[3:8, 2:7] = True
    spur = plane.copy()
    spur[2, 4] = spur[1, 4] = True
    # radius 1.5 mm at 1 mm pixels: the full 3x3 square element, under which the square is open
    assert np.array_equal(binary_opening(spur, radius_mm=1.5, spacing=(1, 1)), plane)


def test_element_radius_in_mm_gives_different_pixel_radii_per_axis():
    element = structuring_element_2d(radius_mm=2.0, spacing_yx=(0.5, 1.0))
    # half-axes 4 px in y and 2 px in x; offset (dy, dx) is in when (0.5 dy)² + (1.0 dx)² <= 2²
    assert np.array_equal(
        element, _mask(["..#..", ".###.", ".###.", ".###.", "#####", ".###.", ".###.", ".###.", "..#.."])
    )
    assert structuring_element_2d(radius_mm=0, spacing_yx=(0.5, 1.0)).shape == (1, 1)


def test_closing_bridges_a_gap_along_fine_y_but_not_along_coarse_x():
    along_y = np.zeros((7, 5), dtype=bool)
    along_y[0:3, :] = along_y[4:7, :] = True  # 1 px gap in y = 0.5 mm
    along_x = np.ascontiguousarray(along_y.T)  # the same gap in x = 2 mm
    spacing = (0.5, 2.0)
    assert binary_closing(along_y, radius_mm=1.0, spacing=spacing).all()
    assert np.array_equal(binary_closing(along_x, radius_mm=1.0, spacing=spacing), along_x)


def test_closing_does_not_stick_to_the_border():
    plane = np.zeros((5, 6), dtype=bool)
    plane[0, 0:2] = plane[0, 4:6] = True  # two pieces on the top edge, 2 px apart
    closed = binary_closing(plane, radius_mm=1.5, spacing=(1, 1))
    assert closed[0].all()
    assert not closed[1:].any()


def test_3d_closing_spans_slices_by_the_z_spacing():
    volume = np.zeros((3, 7, 7), dtype=bool)
    volume[0, 1:6, 1:6] = volume[2, 1:6, 1:6] = True  # one empty slice between
    assert not binary_closing(volume, radius_mm=1.0, spacing=(1, 1, 1))[1].any()  # in-plane default
    bridged = binary_closing(volume, radius_mm=1.0, spacing=(1, 1, 1), in_plane=False)
    assert bridged[1, 2:5, 2:5].all()
    assert bridged[1].sum() == 9  # the 6-neighbour ball erodes the rim
    assert not binary_closing(volume, radius_mm=1.0, spacing=(2, 1, 1), in_plane=False)[1].any()


# --- smoothing ----------------------------------------------------------------------------------------------


def test_gaussian_smoothing_removes_a_spur_and_keeps_the_body():
    plane = np.zeros((12, 12), dtype=bool)
    plane[3:9, 3:9] = True
    spur = plane.copy()
    spur[2, 5] = True
    out = smooth_gaussian(spur, sigma_mm=1.0, spacing=(1, 1))
    assert not out[2, 5]
    assert out[4:8, 4:8].all()
    assert not out[~plane].any()
    assert np.array_equal(smooth_gaussian(spur, sigma_mm=0, spacing=(1, 1)), spur)


def test_polygon_simplification_removes_a_bump_within_tolerance():
    plane = np.zeros((10, 10), dtype=bool)
    plane[2:8, 2:8] = True
    bump = plane.copy()
    bump[1, 4] = True
    assert np.array_equal(simplify_contours_2d(bump, tolerance_mm=1.5, spacing_yx=(1, 1)), plane)
    assert np.array_equal(simplify_contours_2d(bump, tolerance_mm=0.5, spacing_yx=(1, 1)), bump)
    # the same bump is 0.25 mm high with 0.25 mm rows: a 0.5 mm tolerance removes it
    assert np.array_equal(simplify_contours_2d(bump, tolerance_mm=0.5, spacing_yx=(0.25, 1)), plane)


def test_polygon_simplification_keeps_holes_and_islands_in_holes():
    plane = _mask(
        [
            "#########",
            "#.......#",
            "#.#####.#",
            "#.#...#.#",
            "#.#.#.#.#",
            "#.#...#.#",
            "#.#####.#",
            "#.......#",
            "#########",
        ]
    )
    assert np.array_equal(simplify_contours_2d(plane, tolerance_mm=0.5, spacing_yx=(1, 1)), plane)


# --- consistency along z ------------------------------------------------------------------------------------


def test_single_slice_gap_gets_the_intersection_of_its_neighbours():
    volume = np.zeros((6, 3, 3), dtype=bool)
    volume[0, 0:2, 0:2] = True
    volume[2, 1:3, 1:3] = True  # slice 1 empty between 0 and 2: gets their overlap, pixel (1, 1)
    volume[5] = True  # slices 3 and 4 empty: a 2-slice gap stays
    out = bridge_slice_gaps(volume)
    expected = volume.copy()
    expected[1, 1, 1] = True
    assert np.array_equal(out, expected)


def test_disconnected_slice_is_dropped_unless_the_gap_is_allowed():
    volume = np.zeros((7, 4, 4), dtype=bool)
    volume[0:3, 1:3, 1:3] = True  # run of 3 slices, 12 voxels
    volume[5, 0, 0] = True  # cut off by 2 empty slices
    expected = volume.copy()
    expected[5] = False
    assert np.array_equal(drop_disconnected_slices(volume), expected)
    assert np.array_equal(drop_disconnected_slices(volume, max_gap=2), volume)


def test_the_run_with_most_voxels_wins_over_the_longest_run():
    volume = np.zeros((6, 4, 4), dtype=bool)
    volume[0:3, 0, 0] = True  # 3 slices, 3 voxels
    volume[4, :, :] = True  # 1 slice, 16 voxels
    out = drop_disconnected_slices(volume)
    assert out[4].all()
    assert out.sum() == 16


# --- argument checks ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "call, message",
    [
        (
            lambda m: binary_closing(m, radius_mm=-1, spacing=(1, 1)),
            "Argument 'radius_mm' must be >= 0; got -1.",
        ),
        (lambda m: binary_opening(m, radius_mm=1, spacing=(1, 1, 1)), "Argument 'spacing'"),
        (lambda m: remove_small_components_2d(m, min_area_mm2=1, spacing_yx=(0, 1)), "Argument 'spacing_yx'"),
        (lambda m: keep_largest_components_2d(m, k=0), "Argument 'k' must be >= 1; got 0."),
        (lambda m: keep_largest_components_2d(m, k=True), "Argument 'k' must be an integer"),
        (
            lambda m: remove_small_components_3d(m, min_volume_mm3=1, spacing=(1, 1, 1)),
            "Argument 'mask' must be 3D",
        ),
        (lambda m: smooth_gaussian(m, sigma_mm=float("nan"), spacing=(1, 1)), "Argument 'sigma_mm'"),
        (lambda m: fill_holes_2d(m.astype(np.uint8)), "Argument 'mask' must have dtype bool"),
    ],
)
def test_bad_arguments_raise_value_errors_naming_the_argument(call, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(".", r"\.")):
        call(np.ones((4, 4), dtype=bool))
