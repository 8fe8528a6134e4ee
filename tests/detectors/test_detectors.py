"""Coarse-mask prompt compiler on tiny hand-written label maps."""

from __future__ import annotations

import numpy as np
import pytest

from medsam_engine.detectors import get_spec
from medsam_engine.detectors.coarse_mask import boxes_from_label_map


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
        get_spec("nope")


# -- box rules in millimetres ----------------------------------------------------------------------------
from medsam_engine.detectors import BoxRules, build_detector, compile_boxes, object_boxes  # noqa: E402
from medsam_engine.detectors.evaluation import box_iou, match_boxes  # noqa: E402


def test_margin_in_mm_respects_anisotropic_pixels():
    labels = np.zeros((1, 20, 20), dtype=np.uint8)
    labels[0, 8:12, 8:12] = 1
    (prompt,) = compile_boxes(labels, spacing=(5.0, 0.5, 2.0), rules=BoxRules(margin_mm=2.0))
    assert prompt.box == (8 - 1, 8 - 4, 11 + 1, 11 + 4)  # 2 mm = 4 rows of 0.5 mm, 1 column of 2 mm


def test_minimum_size_in_mm3_uses_the_voxel_volume():
    labels = np.zeros((2, 10, 10), dtype=np.uint8)
    labels[0, 0:2, 0:2] = 1  # 4 voxels
    labels[1, 5:9, 5:9] = 1  # 16 voxels
    prompts = compile_boxes(labels, spacing=(2.0, 1.0, 1.0), rules=BoxRules(min_size_mm3=10.0))
    assert [(p.instance, p.z) for p in prompts] == [(1, 1)]  # 4 * 2 mm3 < 10 <= 16 * 2 mm3


def test_instance_map_separates_touching_objects_of_one_label():
    labels = np.zeros((1, 6, 6), dtype=np.uint8)
    labels[0, 1:4, 1:5] = 3
    instances = np.zeros_like(labels, dtype=np.int32)
    instances[0, 1:4, 1:3] = 1
    instances[0, 1:4, 3:5] = 2
    prompts = compile_boxes(labels, instances=instances)
    assert [(p.label, p.instance, p.box) for p in prompts] == [(3, 1, (1, 1, 2, 3)), (3, 2, (3, 1, 4, 3))]


def test_jitter_is_off_by_default_reproducible_and_stays_in_the_image():
    labels = np.zeros((3, 16, 16), dtype=np.uint8)
    labels[:, 0:5, 10:16] = 1
    plain = compile_boxes(labels)
    assert {p.box for p in plain} == {(10, 0, 15, 4)}
    rules = BoxRules(jitter_mm=3.0, seed=1)
    jittered = compile_boxes(labels, rules=rules)
    assert jittered == compile_boxes(labels, rules=rules)
    assert any(p.box != (10, 0, 15, 4) for p in jittered)
    assert all(0 <= p.box[0] <= p.box[2] <= 15 and 0 <= p.box[1] <= p.box[3] <= 15 for p in jittered)


def test_object_boxes_give_the_z_range_middle_box_and_union():
    labels = np.zeros((5, 10, 10), dtype=np.uint8)
    labels[1, 2:4, 2:4] = 1
    labels[2, 2:6, 2:7] = 1
    labels[3, 3:5, 1:3] = 1
    (obj,) = object_boxes(compile_boxes(labels))
    assert (obj.z_range, obj.z_middle, obj.box_middle, obj.box_union) == (
        (1, 3),
        2,
        (2, 2, 6, 5),
        (1, 2, 6, 5),
    )


def test_negative_rules_and_bad_detector_options_are_refused():
    with pytest.raises(ValueError, match="margin_mm"):
        BoxRules(margin_mm=-1)
    with pytest.raises(ValueError, match=r"detector 'intensity'.*bogus"):
        build_detector("intensity", options={"bogus": 1})
    with pytest.raises(ValueError, match="needs the model"):
        build_detector("learned", options={"artefact": "x.pt"})


def test_box_matching_is_one_to_one():
    assert box_iou((0, 0, 9, 9), (0, 0, 9, 9)) == 1.0
    assert box_iou((0, 0, 9, 9), (10, 10, 12, 12)) == 0.0
    assert match_boxes([(0, 0, 9, 9), (0, 0, 9, 9)], [(0, 0, 9, 9)]) == (1, 0, 1)


# -- intensity rules on real data ------------------------------------------------------------------------
def test_intensity_rules_find_both_lungs_on_the_right_side_of_real_ct(chest_ct):
    from medsam_engine.pipeline.core.geometry import align_to
    from medsam_engine.pipeline.core.metrics import dice
    from medsam_engine.pipeline.io.readers import read_volume

    volume = read_volume(chest_ct[0])
    reference = align_to(read_volume(chest_ct[1]), volume)  # slicerio: 5 right lung, 6 left lung
    detection = build_detector("intensity", options={"targets": {"right lung": 5, "left lung": 6}})(volume)
    assert dice(detection.label_map == 5, reference == 5) > 0.8
    assert dice(detection.label_map == 6, reference == 6) > 0.7
    assert {p.label for p in detection.prompts} == {5, 6}
    assert all(p.source == "intensity" for p in detection.prompts)
    assert detection.label_names == {5: "right lung", 6: "left lung"}


def test_intensity_blobs_split_touching_real_nuclei(nuclei_2d):
    from scipy import ndimage

    from medsam_engine.pipeline.io.readers import read_volume

    image, mask = read_volume(nuclei_2d[0]), read_volume(nuclei_2d[1]).array[0]
    detection = build_detector("intensity")(image)
    found = [p.box for p in detection.prompts]
    reference = [
        (f[1].start, f[0].start, f[1].stop - 1, f[0].stop - 1) for f in ndimage.find_objects(mask) if f
    ]
    hits, _missed, _extra = match_boxes(found, reference)
    assert hits / len(reference) > 0.5
    assert hits / len(found) > 0.5
    assert len({p.instance for p in detection.prompts}) == len(found) > 10


def test_unknown_intensity_target_names_the_modality(small_chest):
    from medsam_engine.pipeline.io.readers import read_volume

    with pytest.raises(ValueError, match=r"head.*CT"):
        build_detector("intensity", options={"targets": {"head": 1}})(read_volume(small_chest[0]))


from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from hypothesis.extra import numpy as hnp  # noqa: E402


@settings(max_examples=150, deadline=None)
@given(
    hnp.arrays(
        np.uint8,
        st.tuples(st.integers(1, 4), st.integers(1, 9), st.integers(1, 9)),
        elements=st.sampled_from([0, 0, 0, 1, 3]),
    ),
    st.integers(1, 3),
)
def test_boxes_equal_scipys_components_and_tight_boxes(labels, min_voxels):
    """Per label, scipy's 26-connected components in order of their first voxel, each slice's tight box:
    the compiler's shortcuts (one component fills its label's box) give the same prompts."""
    from scipy import ndimage

    expected = []
    for value in (1, 3):
        components, count = ndimage.label(labels == value, structure=np.ones((3, 3, 3), bool))
        instance = 0
        for index in range(1, count + 1):
            mask = components == index
            if mask.sum() < min_voxels:
                continue
            instance += 1
            for z in np.flatnonzero(mask.any(axis=(1, 2))):
                ys, xs = np.nonzero(mask[z])
                expected.append(
                    (value, instance, int(z), (int(xs.min()), int(ys.min()), int(xs.max()), int(ys.max())))
                )
    got = compile_boxes(labels, rules=BoxRules(min_voxels=min_voxels))
    assert sorted((p.label, p.instance, p.z, p.box) for p in got) == sorted(expected)
