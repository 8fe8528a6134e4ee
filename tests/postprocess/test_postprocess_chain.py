"""Post-processing chains as data: validation, per-label application, merging, lineage, defaults, layering."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from medsam_engine.postprocess.chain import DEFAULT_CHAINS, OPS, apply_chain, default_chain, validate_chain
from medsam_engine.postprocess.components import remove_small_components_3d
from medsam_engine.postprocess.holes import fill_holes_2d
from medsam_engine.postprocess.morphology import binary_closing

PACKAGE = Path(__file__).resolve().parents[2] / "postprocess"


# --- validation ---------------------------------------------------------------------------------------------


def test_validation_fills_defaults_and_normalises_numbers():
    steps = validate_chain([{"op": "closing", "radius_mm": np.float32(2)}, {"op": "keep_largest_components"}])
    assert steps == [
        {"op": "closing", "radius_mm": 2.0, "in_plane": True},
        {"op": "keep_largest_components", "k": 1},
    ]
    assert type(steps[0]["radius_mm"]) is float
    assert validate_chain([]) == []


@pytest.mark.parametrize(
    "chain, message",
    [
        (
            [{"op": "dilate", "radius_mm": 1}],
            r"Step 1 of the chain: unknown op 'dilate'; known ops: .*closing",
        ),
        ([{"radius_mm": 1}], r"Step 1 of the chain: unknown op None"),
        (
            [{"op": "fill_holes_2d"}, {"op": "closing", "radius": 1}],
            r"Step 2 of the chain \(op 'closing'\): unknown parameter 'radius'; allowed: radius_mm, "
            r"in_plane\.",
        ),
        ([{"op": "closing"}], r"Step 1 of the chain \(op 'closing'\): parameter 'radius_mm' is required\."),
        (
            [{"op": "closing", "radius_mm": -1}],
            r"Step 1 of the chain \(op 'closing'\): Argument 'radius_mm' must be >= 0; got -1\.",
        ),
        (
            [{"op": "keep_largest_components", "k": 1.5}],
            r"op 'keep_largest_components'\): Argument 'k' must be an integer",
        ),
        (
            [{"op": "opening", "radius_mm": 1, "in_plane": "yes"}],
            r"Argument 'in_plane' must be True or False",
        ),
        ([{"op": "bridge_slice_gaps", "max_gap": 2}], r"unknown parameter 'max_gap'; allowed: none\."),
        (["closing"], r"Step 1 of the chain must be a mapping"),
        ({"op": "closing", "radius_mm": 1}, r"Argument 'chain' must be a list of steps"),
        ("closing", r"Argument 'chain' must be a list of steps"),
    ],
)
def test_validation_names_the_step_op_and_parameter(chain, message):
    with pytest.raises(ValueError, match=message):
        validate_chain(chain)


def test_apply_chain_validates_everything_before_working():
    label_map = np.ones((1, 3, 3), dtype=np.uint16)
    with pytest.raises(ValueError, match="Argument 'per_label', label 1: Step 1 of the chain"):
        apply_chain(label_map, spacing=(1, 1, 1), chain=[], per_label={1: [{"op": "nope"}]})
    with pytest.raises(ValueError, match="Argument 'per_label' keys"):
        apply_chain(label_map, spacing=(1, 1, 1), chain=[], per_label={0: []})
    with pytest.raises(ValueError, match="Argument 'spacing'"):
        apply_chain(label_map, spacing=(1, 1), chain=[])
    with pytest.raises(ValueError, match="Argument 'label_map' must be a \\(z, y, x\\)"):
        apply_chain(label_map[0], spacing=(1, 1, 1), chain=[])
    with pytest.raises(ValueError, match="Argument 'label_map' must have an integer dtype"):
        apply_chain(label_map.astype(np.float32), spacing=(1, 1, 1), chain=[])


def test_every_registered_op_runs_with_its_defaults_and_required_values():
    required = {
        "min_volume_mm3": 1.0,
        "min_area_mm2": 1.0,
        "radius_mm": 1.0,
        "sigma_mm": 1.0,
        "tolerance_mm": 1.0,
    }
    mask = np.zeros((3, 6, 6), dtype=bool)
    mask[:, 1:5, 1:5] = True
    for name, op in OPS.items():
        step = validate_chain([{"op": name, **{k: v for k, v in required.items() if k in op.params}}])[0]
        out = op.run(mask, spacing=(2.0, 1.0, 1.0), params={k: v for k, v in step.items() if k != "op"})
        assert out.shape == mask.shape, name
        assert out.dtype == np.bool_, name


# --- defaults -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("modality", sorted(DEFAULT_CHAINS))
def test_default_chains_are_valid_and_returned_as_copies(modality):
    chain = default_chain(modality)
    assert chain == validate_chain(DEFAULT_CHAINS[modality])
    chain.append({"op": "bridge_slice_gaps"})
    assert default_chain(modality) != chain


def test_default_chain_covers_the_modalities_and_refuses_others():
    assert {"CT", "MR", "2D", "OT"} <= set(DEFAULT_CHAINS)
    assert default_chain("ct") == default_chain("CT")
    with pytest.raises(ValueError, match="Argument 'modality' must be one of"):
        default_chain("PET")


# --- application and merging ------------------------------------------------------------------------------


def _two_organs() -> np.ndarray:
    label_map = np.zeros((4, 12, 12), dtype=np.uint16)
    label_map[0:3, 1:6, 1:6] = 1
    label_map[1, 3, 3] = 0  # a pinhole in label 1
    label_map[3, 10, 1] = 1  # a speck of label 1
    label_map[0:4, 7:11, 6:11] = 3
    return label_map


def test_chain_applies_per_label_and_records_lineage():
    label_map = _two_organs()
    frozen = label_map.copy()
    frozen.flags.writeable = False
    chain = [{"op": "remove_small_components", "min_volume_mm3": 4}, {"op": "fill_holes_2d"}]
    out, lineage = apply_chain(frozen, spacing=(2.0, 1.0, 1.0), chain=chain)
    expected = label_map.copy()
    expected[1, 3, 3] = 1
    expected[3, 10, 1] = 0
    assert np.array_equal(out, expected)
    assert out.dtype == np.uint16
    assert np.array_equal(frozen, label_map)
    json.dumps(lineage)
    one, three = lineage["labels"]
    assert lineage["spacing_mm"] == [2.0, 1.0, 1.0]
    assert one["label"] == 1
    assert one["chain"] == "default"
    assert [(s["op"], s["voxels_before"], s["voxels_after"]) for s in one["steps"]] == [
        ("remove_small_components", 75, 74),
        ("fill_holes_2d", 74, 75),
    ]
    assert one["steps"][0]["params"] == {"min_volume_mm3": 4.0}
    assert (one["voxels_before"], one["voxels_after"], one["voxels_lost_in_merge"]) == (75, 75, 0)
    assert (three["label"], three["voxels_before"], three["voxels_after"]) == (3, 80, 80)


def test_per_label_chain_overrides_the_default():
    label_map = _two_organs()
    out, lineage = apply_chain(
        label_map,
        spacing=(2.0, 1.0, 1.0),
        chain=[{"op": "fill_holes_2d"}],
        per_label={1: [], 7: [{"op": "closing", "radius_mm": 1}]},
    )
    assert np.array_equal(out, label_map)
    assert [r["chain"] for r in lineage["labels"]] == ["per_label", "default"]
    assert lineage["labels"][0]["steps"] == []


def test_a_label_never_takes_another_labels_voxels():
    label_map = np.zeros((1, 5, 5), dtype=np.uint16)
    label_map[0, 1:4, 1:4] = 1
    label_map[0, 2, 2] = 2  # sits in label 1's hole
    out, lineage = apply_chain(label_map, spacing=(1, 1, 1), chain=[{"op": "fill_holes_2d"}])
    assert np.array_equal(out, label_map)
    assert lineage["labels"][0]["steps"][0]["voxels_after"] == 9
    assert lineage["labels"][0]["voxels_lost_in_merge"] == 1


def test_a_background_voxel_claimed_by_two_labels_stays_background():
    label_map = np.zeros((1, 9, 9), dtype=np.uint16)
    for y, x in [(4, 4), (5, 4), (6, 4), (5, 6)]:
        label_map[0, y, x] = 1
    for y, x in [(4, 5), (6, 5), (5, 3), (4, 6)]:
        label_map[0, y, x] = 2
    chain = [{"op": "closing", "radius_mm": 1}]
    alone, _ = apply_chain(np.where(label_map == 1, label_map, 0), spacing=(1, 1, 1), chain=chain)
    assert alone[0, 5, 5] == 1  # label 1 alone closes over (5, 5) ...
    both, lineage = apply_chain(label_map, spacing=(1, 1, 1), chain=chain)
    assert both[0, 5, 5] == 0  # ... but label 2 claims it too
    assert np.array_equal(both, label_map)
    assert [r["voxels_lost_in_merge"] for r in lineage["labels"]] == [1, 2]


def test_an_empty_map_gives_an_empty_map_and_no_records():
    empty = np.zeros((2, 3, 3), dtype=np.uint16)
    out, lineage = apply_chain(empty, spacing=(1, 1, 1), chain=default_chain("CT"))
    assert not out.any()
    assert lineage["labels"] == []


label_maps = hnp.arrays(
    np.uint16,
    st.tuples(st.integers(1, 4), st.integers(1, 9), st.integers(1, 9)),
    elements=st.sampled_from([0, 0, 0, 1, 2, 5]),
)
chains = st.lists(
    st.sampled_from(
        [
            {"op": "remove_small_components", "min_volume_mm3": 3},
            {"op": "remove_small_components_2d", "min_area_mm2": 2},
            {"op": "keep_largest_components", "k": 1},
            {"op": "keep_largest_components_2d", "k": 2},
            {"op": "fill_holes_2d", "max_area_mm2": 3},
            {"op": "opening", "radius_mm": 1},
            {"op": "closing", "radius_mm": 1.5},
            {"op": "closing", "radius_mm": 2, "in_plane": False},
            {"op": "smooth_gaussian", "sigma_mm": 0.8},
            {"op": "simplify_contours_2d", "tolerance_mm": 1},
            {"op": "drop_disconnected_slices"},
            {"op": "bridge_slice_gaps"},
        ]
    ),
    max_size=4,
)


@settings(max_examples=60, deadline=None)
@given(label_map=label_maps, chain=chains)
def test_merged_map_keeps_labels_in_their_place(label_map, chain):
    frozen = label_map.copy()
    frozen.flags.writeable = False
    out, lineage = apply_chain(frozen, spacing=(1.5, 1.0, 0.7), chain=chain)
    assert np.array_equal(frozen, label_map)
    assert out.dtype == label_map.dtype
    assert out.shape == label_map.shape
    assert set(np.unique(out)) <= set(np.unique(label_map)) | {0}
    changed = (out != label_map) & (out != 0)
    assert not (label_map[changed] != 0).any()  # labels only grow into background
    json.dumps(lineage)
    for record in lineage["labels"]:
        assert record["voxels_before"] == np.count_nonzero(label_map == record["label"])
        assert record["voxels_after"] == np.count_nonzero(out == record["label"])


@settings(max_examples=40, deadline=None)
@given(mask=hnp.arrays(np.bool_, st.tuples(st.integers(1, 4), st.integers(1, 9), st.integers(1, 9))))
def test_cropping_per_label_gives_the_same_result_as_the_whole_array(mask):
    spacing = (2.0, 0.7, 1.0)
    chain = [
        {"op": "remove_small_components", "min_volume_mm3": 3},
        {"op": "closing", "radius_mm": 1.5},
        {"op": "fill_holes_2d", "max_area_mm2": 2},
    ]
    whole = remove_small_components_3d(mask, min_volume_mm3=3, spacing=spacing)
    whole = binary_closing(whole, radius_mm=1.5, spacing=spacing)
    whole = fill_holes_2d(whole, max_area_mm2=2, spacing_yx=spacing[1:])
    out, _ = apply_chain(mask.astype(np.uint16) * 4, spacing=spacing, chain=chain)
    assert np.array_equal(out, whole.astype(np.uint16) * 4)


# --- layering -----------------------------------------------------------------------------------------------


def test_the_package_imports_only_numpy_scipy_opencv_skimage_cc3d_and_itself():
    allowed = {"numpy", "scipy", "cv2", "skimage", "cc3d", "postprocess", "__future__"} | set(
        sys.stdlib_module_names
    )
    for path in PACKAGE.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = (
                [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else ([node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            )
            for name in names:
                own = name.removeprefix("medsam_engine.")
                assert own.split(".")[0] in allowed, f"{path.name} imports {name}"


def test_importing_the_package_pulls_in_no_heavy_framework():
    code = (
        "import sys, postprocess, postprocess.chain; "
        "print(','.join(m for m in ('torch', 'ray', 'prefect', 'pipeline') if m in sys.modules))"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert run.stdout.strip() == ""
