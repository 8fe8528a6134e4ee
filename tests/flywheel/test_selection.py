"""Folds, kinds, balanced draws and the choice of epochs (pipeline/flywheel/selection.py), on small
samples."""

from __future__ import annotations

import numpy as np
import pytest

from medsam_engine.pipeline.flywheel.finetune_data import SliceSample
from medsam_engine.pipeline.flywheel.selection import (
    Curve,
    balance_weights,
    choose_epochs,
    is_instance_map,
    kind_of,
    make_folds,
)


def _sample(case_id: str, z: int, centres_x: list[int], kind: str = "MR label 1") -> SliceSample:
    boxes = np.array([[x - 2, 10, x + 2, 14] for x in centres_x], dtype=np.float32)
    masks = np.zeros((len(centres_x), 32, 64), bool)
    return SliceSample(
        case_id,
        z,
        None,
        None,
        boxes,
        masks,
        masks.astype(np.float32),
        kinds=np.array([kind] * len(centres_x)),
    )


def _ids(samples: list[SliceSample]) -> list[tuple[str, int]]:
    return sorted((s.case_id, s.z) for s in samples)


def test_two_cases_of_two_kinds_are_folded_in_z_blocks_so_each_fold_trains_on_both():
    atlas = [_sample("atlas", z, [5], "MR caudate") for z in range(6)]
    lesion = [_sample("lesion", z, [5], "MR lesion") for z in range(4)]
    folds = make_folds(atlas + lesion, 2)
    assert folds.how == "blocks"
    assert len(folds.parts) == 2
    for train, held in folds.parts:
        assert {s.case_id for s in train} == {"atlas", "lesion"}
        assert {s.case_id for s in held} == {"atlas", "lesion"}
        assert not set(_ids(train)) & set(_ids(held))
    held_first = folds.parts[0][1]
    assert _ids(held_first) == [("atlas", 0), ("atlas", 1), ("atlas", 2), ("lesion", 0), ("lesion", 1)]
    every = sorted(i for _, held in folds.parts for i in _ids(held))
    assert every == _ids(atlas + lesion)  # each slice held out exactly once


def test_cases_are_the_folds_when_each_kind_lies_in_several_cases():
    samples = [_sample(f"c{n}", z, [5], "CT lung") for n in range(4) for z in range(2)]
    folds = make_folds(samples, 2)
    assert folds.how == "cases"
    assert [sorted({s.case_id for s in held}) for _, held in folds.parts] == [["c0", "c2"], ["c1", "c3"]]


def test_a_kind_found_in_one_case_keeps_the_folds_within_cases():
    samples = [_sample(f"c{n}", z, [5], "CT lung") for n in range(4) for z in range(2)]
    samples += [_sample("lesion", z, [5], "MR lesion") for z in range(6)]
    assert make_folds(samples, 2).how == "blocks"


def test_a_single_2d_image_is_folded_in_x_blocks_of_its_objects():
    folds = make_folds([_sample("a", 0, [5, 15, 25, 35, 45, 55])], 2)
    assert folds.how == "blocks"
    (train0, held0), (_, held1) = folds.parts
    assert sorted(held0[0].boxes[:, 0] + 2) == [5, 15, 25]
    assert sorted(train0[0].boxes[:, 0] + 2) == [35, 45, 55]
    assert sorted(held1[0].boxes[:, 0] + 2) == [35, 45, 55]
    assert held0[0].kinds.tolist() == ["MR label 1"] * 3


def test_folds_must_be_two_or_more():
    with pytest.raises(ValueError, match="'folds' must be at least 2"):
        make_folds([_sample("a", 0, [5])], 1)


def test_kinds_name_modality_and_label_and_an_instance_map_is_one_kind():
    assert kind_of("MR", 3, {3: "caudate"}, instance_map=False) == "MR caudate"
    assert kind_of("CT", 5, None, instance_map=False) == "CT label 5"
    assert kind_of("2D", 40, None, instance_map=True) == "2D objects"
    assert is_instance_map(list(range(1, 30)), flat=False)  # more labels than any class map
    assert is_instance_map([1, 2, 3, 4, 5], flat=True)  # nuclei on one image, one object per label
    assert not is_instance_map([1, 2, 3, 4, 5], flat=False)  # an atlas of five structures
    assert not is_instance_map([1, 1, 2], flat=True)


def test_a_small_case_beside_a_large_one_gets_more_than_its_count_of_draws():
    atlas = [_sample("atlas", z, [5, 15, 25, 35, 45], "MR caudate") for z in range(20)]  # 100 boxes
    lesion = [_sample("lesion", z, [5], "MR lesion") for z in range(4)]  # 4 boxes
    weights = balance_weights(atlas + lesion)
    share = sum(w.sum() for w in weights[20:]) / sum(w.sum() for w in weights)
    assert share == pytest.approx(2 / 12)  # sqrt(4) against sqrt(100)
    assert share > 4 / 104


def test_edit_weights_still_count_within_a_kind():
    kept, redrawn = _sample("c0", 0, [10, 20]), _sample("c0", 1, [10, 20])
    kept.weights, redrawn.weights = np.ones(2), np.full(2, 2.0)
    first, second = balance_weights([kept, redrawn])
    assert second.sum() == pytest.approx(2 * first.sum())


def _curve(rows: list[list[float]], kinds: list[str]) -> Curve:
    return Curve(np.array(rows, dtype=float), np.array(kinds))


def test_the_best_epoch_is_chosen_and_a_kind_that_loses_rules_an_epoch_out():
    kinds = ["A"] * 5 + ["B"] * 5
    rows = [
        [0.7] * 5 + [0.6] * 5,  # the parent
        [0.8] * 5 + [0.6] * 5,  # epoch 1: A better, B equal
        [0.95] * 5 + [0.5] * 5,
    ]  # epoch 2: the best mean, but B loses 0.1
    choice = choose_epochs(_curve(rows, kinds), tolerance=0.01, min_kind_boxes=5)
    assert choice.epochs == 1
    assert choice.per_kind["A"] == {"boxes": 5, "before": 0.7, "after": 0.8, "judged": True}
    assert choice.before == pytest.approx(0.65)
    assert choice.after == pytest.approx(0.7)


def test_a_kind_with_too_few_boxes_is_reported_but_does_not_decide():
    kinds = ["A"] * 5 + ["B"] * 2
    rows = [[0.7] * 5 + [0.6] * 2, [0.9] * 5 + [0.5] * 2]
    choice = choose_epochs(_curve(rows, kinds), tolerance=0.01, min_kind_boxes=5)
    assert choice.epochs == 1
    assert choice.per_kind["B"]["judged"] is False


def test_no_training_when_no_epoch_beats_the_parent():
    rows = [[0.8, 0.8], [0.8005, 0.8], [0.7, 0.7]]
    choice = choose_epochs(_curve(rows, ["A", "A"]), tolerance=0.01, min_kind_boxes=5)
    assert choice.epochs == 0
    assert choice.why.startswith("no training: no epoch beat the parent's held-out Dice 0.8000")


def test_a_fold_that_stopped_early_keeps_its_last_scores():
    curve = Curve.pooled(
        [(np.array([[0.5], [0.6], [0.7]]), np.array(["A"])), (np.array([[0.5], [0.4]]), np.array(["A"]))]
    )
    assert curve.scores.tolist() == [[0.5, 0.5], [0.6, 0.4], [0.7, 0.4]]


def test_a_fold_is_scored_on_held_out_slices_spread_over_its_part_up_to_a_box_budget():
    from medsam_engine.pipeline.flywheel.finetune import scored_part

    held = [_sample("a", z, [5, 15, 25]) for z in range(16)]  # 48 boxes
    assert scored_part(held, 48) == held
    picked = [s.z for s in scored_part(held, 12)]
    assert picked == [0, 4, 8, 12]  # four slices of three boxes, spread over the part


def test_the_epoch_cap_is_cut_so_both_folds_and_the_final_fit_end_within_the_budget():
    import time

    from medsam_engine.pipeline.flywheel.finetune import EpochBudget

    budget = EpochBudget(100.0, time.perf_counter() - 45.0, folds=2, epochs=12)
    budget.measured(10.0)  # 65 s left counting the epoch measured: 3 epochs (2 folds + final) fit twice
    assert budget.cap == 2
    budget.measured(1.0)
    assert budget.cap == 2  # planned once, from the first epoch
    roomy = EpochBudget(1000.0, time.perf_counter(), folds=2, epochs=12)
    roomy.measured(1.0)
    assert roomy.cap == 12
