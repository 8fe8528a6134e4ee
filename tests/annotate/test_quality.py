"""Quality features, calibration and routing: hand-made arrays, and the model's scores on real slices."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from medsam_engine.pipeline.annotate.config import EngineConfig
from medsam_engine.pipeline.annotate.quality import (
    auc,
    case_status,
    fit_calibration,
    geometry_checks,
    heuristic_score,
    instance_features,
    route,
    score,
    stability_scores,
)
from medsam_engine.pipeline.core.boxes import jitter_boxes


def test_stability_is_the_iou_of_the_masks_at_plus_and_minus_the_offset():
    logits = np.full((2, 4, 4), -5.0, dtype=np.float32)
    logits[0, :2] = 5.0  # 8 pixels far above both thresholds: perfectly stable
    logits[1, :2] = 5.0
    logits[1, 2:] = 0.5  # 8 more pixels only above -1: half as stable
    assert stability_scores(logits).tolist() == [1.0, 0.5]
    assert stability_scores(np.full((1, 3, 3), -4.0, np.float32)).tolist() == [0.0]  # no mask at all


def test_slice_checks_flag_area_jumps_and_drift():
    steady = {z: np.zeros((20, 20), bool) for z in range(3)}
    for mask in steady.values():
        mask[5:15, 5:15] = True
    boxes = dict.fromkeys(range(3), (5, 5, 14, 14))
    good = geometry_checks(steady, boxes)
    assert good["slice_iou"] == 1.0
    assert good["area_steadiness"] == 1.0
    assert good["drift_steadiness"] == 1.0
    assert good["coverage"] == 1.0
    assert good["box_agreement"] == 1.0
    jumpy = {z: m.copy() for z, m in steady.items()}
    jumpy[1][:] = False
    jumpy[1][0:4, 16:20] = True  # the middle slice jumped to a small blob elsewhere
    bad = geometry_checks(jumpy, boxes)
    assert bad["slice_iou"] == 0.0
    assert bad["area_jump_max"] > 0.8
    assert bad["drift_max"] > 0.5
    assert bad["box_agreement"] < good["box_agreement"]
    assert heuristic_score({**bad, "predicted_iou": 0.9}) < heuristic_score({**good, "predicted_iou": 0.9})


def test_single_slice_instances_have_no_3d_checks():
    label_map = np.zeros((1, 10, 10), np.uint16)
    label_map[0, 2:6, 2:6] = 3
    record = {
        "label": 3,
        "slices": [0],
        "boxes_xyxy": [[2, 2, 5, 5]],
        "predicted_iou": 0.95,
        "stability": 0.9,
    }
    features = instance_features(label_map, record, alone=True)
    assert features["slice_iou"] is None
    assert features["coverage"] == 1.0
    assert features["box_agreement"] == 1.0


def test_jittered_boxes_stay_on_the_slice_and_near_the_box():
    boxes = np.array([[10, 10, 29, 49], [0, 0, 5, 5]], np.float32)
    moved = jitter_boxes(boxes, 0.1, np.random.default_rng(0), (50, 40))
    assert (moved[:, :2] <= moved[:, 2:]).all()
    assert moved.min() >= 0
    assert moved[:, 2].max() <= 39
    assert moved[:, 3].max() <= 49
    assert np.abs(moved[0] - boxes[0]).max() <= 4


def test_calibration_learns_which_features_predict_edits_and_reports_itself():
    rng = np.random.default_rng(1)
    quality = rng.uniform(0, 1, 80)
    rows = [{"predicted_iou": float(q), "stability": float(rng.uniform(0, 1))} for q in quality]
    edit_dice = np.clip(0.6 + 0.4 * quality + rng.normal(0, 0.05, 80), 0, 1)
    calibration = fit_calibration(rows, edit_dice.tolist(), threshold=0.9)
    report = calibration.report
    assert report["rows"] == 80
    assert 0 < report["good"] < 80
    assert report["coefficients"]["predicted_iou"] > abs(report["coefficients"]["stability"])
    assert report["auc_out_of_fold"] > 0.85
    assert report["reliability"]
    low, high = (
        score({"predicted_iou": 0.2, "stability": 0.5}, calibration),
        score({"predicted_iou": 0.95, "stability": 0.5}, calibration),
    )
    assert 0 <= low < 0.5 < high <= 1
    assert fit_calibration(rows[:5], edit_dice[:5].tolist()) is None  # too few reviews: no fit


def test_auc_of_perfect_and_useless_scores():
    assert auc(np.array([0.1, 0.2, 0.8, 0.9]), np.array([False, False, True, True])) == 1.0
    assert auc(np.array([0.5, 0.5, 0.5, 0.5]), np.array([False, True, False, True])) == 0.5
    assert auc(np.array([0.1, 0.2]), np.array([True, True])) is None


def test_routing_thresholds_per_label_and_case_status():
    thresholds = {"accept_above": 0.8, "reject_below": 0.3, "per_label": {7: (0.5, 0.95)}}
    assert [route(s, 5, **thresholds) for s in (0.9, 0.5, 0.1)] == ["auto-accepted", "review", "rejected"]
    assert route(0.9, 7, **thresholds) == "review"
    assert route(0.4, 7, **thresholds) == "rejected"
    assert case_status(["auto-accepted", "auto-accepted"]) == "auto-accepted"
    assert case_status(["rejected", "rejected"]) == "rejected"
    assert case_status(["auto-accepted", "rejected"]) == "review"


def test_routing_settings_stay_out_of_the_mask_signature():
    base = EngineConfig()
    routed = base.with_overrides(quality={"route": True, "accept_above": 0.5, "per_label": {5: (0.1, 0.2)}})
    assert routed.result_hash() == base.result_hash()
    assert base.with_overrides(quality={"jitter_check": True}).result_hash() != base.result_hash()
    with pytest.raises(ValueError):
        base.with_overrides(quality={"reject_below": 0.9, "accept_above": 0.5})


def test_segmentation_records_stability_and_jitter_agreement(runner, small_chest):
    from medsam_engine.detectors import compile_boxes
    from medsam_engine.pipeline.annotate.quality import JitterCheck
    from medsam_engine.pipeline.annotate.segment import segment_volume
    from medsam_engine.pipeline.core.geometry import align_to
    from medsam_engine.pipeline.core.intensity import IntensityConfig, to_uint8
    from medsam_engine.pipeline.io.readers import read_volume

    volume = read_volume(small_chest[0])
    reference = align_to(read_volume(small_chest[1]), volume)
    lungs = np.where(np.isin(reference, [5, 6]), reference, 0)
    prompts = [p for p in compile_boxes(lungs, spacing=volume.spacing) if p.z == 1]
    rendered = to_uint8(volume.array, "CT", IntensityConfig(-600, 1500))
    _, records = segment_volume(runner, rendered, prompts, jitter=JitterCheck(fraction=0.1, slices=1))
    assert {r.label for r in records} == {5, 6}
    for record in records:
        assert 0.2 < record.stability <= 1.0
        assert 0.5 < record.jitter_iou <= 1.0
        assert record.to_json()["stability"] == round(record.stability, 5)
    _, plain = segment_volume(runner, rendered, prompts)
    assert all(r.jitter_iou is None and r.stability is not None for r in plain)


def test_quality_module_is_numpy_only():
    import subprocess
    import sys

    code = "import sys, pipeline.annotate.quality; print([m for m in ('torch', 'cv2') if m in sys.modules])"
    assert (
        subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, check=True
        ).stdout.strip()
        == "[]"
    )


def _geometry_reference(masks: dict, boxes: dict) -> dict:
    """The area-based checks written plainly (whole-plane sums for every area, union and intersection); the
    drift checks did not change and are left out."""
    from medsam_engine.pipeline.core.boxes import box_iou

    zs = sorted(masks)
    filled = [z for z in zs if masks[z].sum() > 0]
    agreement = []
    for z in zs:
        ys, xs = np.nonzero(masks[z])
        agreement.append(box_iou(boxes[z], (xs.min(), ys.min(), xs.max(), ys.max())) if len(ys) else 0.0)
    found = {"coverage": len(filled) / len(zs), "box_agreement": float(np.mean(agreement))}
    steps = [(masks[a], masks[b]) for a, b in itertools.pairwise(filled) if b == a + 1]
    if steps:
        overlap = [float(np.logical_and(x, y).sum() / np.logical_or(x, y).sum()) for x, y in steps]
        change = [abs(int(x.sum()) - int(y.sum())) / max(int(x.sum()), int(y.sum())) for x, y in steps]
        found.update(
            slice_iou=float(np.mean(overlap)),
            slice_iou_min=float(min(overlap)),
            area_steadiness=1.0 - float(np.mean(change)),
            area_jump_max=float(max(change)),
        )
    return found


@pytest.mark.parametrize("seed", range(6))
def test_slice_checks_equal_whole_plane_sums(seed):
    """Areas counted once and intersections only where the two slices' extents overlap: the same figures."""
    rng = np.random.default_rng(seed)
    masks, boxes = {}, {}
    for z in range(8):
        mask = np.zeros((40, 50), bool)
        if rng.random() > 0.2:
            y, x = rng.integers(0, 30), rng.integers(0, 40)
            mask[y : y + rng.integers(1, 12), x : x + rng.integers(1, 12)] = True
            mask |= rng.random(mask.shape) > 0.97  # specks: extents that reach further than the blob
        masks[z], boxes[z] = mask, tuple(int(v) for v in (*rng.integers(0, 20, 2), *rng.integers(20, 40, 2)))
    got = geometry_checks(masks, boxes)
    for key, value in _geometry_reference(masks, boxes).items():
        assert got[key] == value, key


def test_stability_counts_equal_whole_stack_sums():
    logits = np.random.default_rng(3).normal(0, 2, (5, 64, 64)).astype(np.float32)
    inner, outer = (logits > 1.0).sum(axis=(1, 2)), (logits > -1.0).sum(axis=(1, 2))
    assert np.array_equal(stability_scores(logits), (inner / outer).astype(np.float32))
