"""Propagate mode on real CT: lock-step decoding, one embedding per slice, the stop rules."""

from __future__ import annotations

import numpy as np
import pytest

from medsam_engine.detectors import compile_boxes, object_boxes
from medsam_engine.pipeline.annotate.propagate import (
    PropagateRules,
    _advance,
    _Canvas,
    _next_box,
    _Run,
    _Track,
    likeness,
    no_larger,
    propagate_volume,
    seed_look,
)
from medsam_engine.pipeline.core.geometry import align_to
from medsam_engine.pipeline.core.intensity import to_uint8
from medsam_engine.pipeline.core.metrics import dice
from medsam_engine.pipeline.core.types import ObjectBox
from medsam_engine.pipeline.io.readers import read_volume

WINDOWS = {5: "lung", 6: "lung"}


@pytest.fixture(scope="module")
def lungs(small_chest):
    """The real chest slices' (z, y, x) reference lungs, their objects and a lung-window rendering."""
    volume = read_volume(small_chest[0])
    reference = align_to(read_volume(small_chest[1]), volume)
    reference = np.where(np.isin(reference, [5, 6]), reference, 0)
    objects = object_boxes(compile_boxes(reference, spacing=volume.spacing))
    return reference, objects, {"lung": to_uint8(volume.array, "CT", _lung())}


@pytest.fixture(scope="module")
def propagated(runner, lungs):
    """Both lungs propagated from their middle slices, once for the module: the label map, the records and
    how far the run moved each of the runner's counters."""
    _, objects, rendering = lungs
    before = runner.stats.as_dict()
    label_map, records = propagate_volume(runner, rendering, objects, window_of=WINDOWS)
    after = runner.stats.as_dict()
    return label_map, records, {key: after[key] - before[key] for key in before}


def test_propagation_from_the_middle_slice_segments_both_lungs(lungs, propagated):
    reference, objects, _ = lungs
    assert {o.label for o in objects} == {5, 6}
    label_map, records, moved = propagated
    slices = reference.shape[0]
    assert moved["encoded_slices"] <= slices  # each slice encoded at most once
    assert moved["encoded_slices"] + moved["cache_hits"] >= slices
    assert moved["decoded_boxes"] > moved["decoder_calls"]  # both lungs decoded together on shared slices
    for label in (5, 6):
        assert (
            dice(label_map == label, reference == label) > 0.7
        )  # figures for both modes: docs/benchmarks.md
    assert {r.label for r in records} == {5, 6}
    assert {r.stage for r in records} == {"auto-propagate"}
    for label in (5, 6):
        assert sum(r.voxels for r in records if r.label == label) == int((label_map == label).sum())


def _lung():
    from medsam_engine.pipeline.core.intensity import IntensityConfig

    return IntensityConfig(ct_level=-600, ct_width=1500)


def _track(z_range=(0, 9), middle=5):
    return _Track(ObjectBox(1, 1, z_range, middle, (2, 2, 5, 5), (2, 2, 5, 5)), 0)


def test_a_direction_stops_after_k_empty_slices_and_falls_back_to_the_middle_box():
    rules = PropagateRules(stop_after_empty=2)
    track, canvas = _track(), _Canvas((10, 8, 8))
    empty = np.full((8, 8), -5.0, dtype=np.float32)
    _advance(track, 6, empty, 0.5, rules, (2, 2, 5, 5), canvas)
    assert not track.done
    assert track.previous is None
    _advance(track, 7, empty, 0.5, rules, (2, 2, 5, 5), canvas)
    assert track.done
    assert track.stop_reason == "2 empty slices"


def test_a_direction_stops_when_the_mask_jumps_away():
    rules = PropagateRules(min_slice_iou=0.2)
    track, canvas = _track(), _Canvas((10, 8, 8))
    here = np.full((8, 8), -5.0, dtype=np.float32)
    here[1:4, 1:4] = 5.0
    elsewhere = np.full((8, 8), -5.0, dtype=np.float32)
    elsewhere[5:8, 5:8] = 5.0
    _advance(track, 5, here, 0.9, rules, (1, 1, 3, 3), canvas)
    _advance(track, 6, elsewhere, 0.9, rules, (0, 0, 4, 4), canvas)
    assert track.done
    assert track.stop_reason == "slice-to-slice IoU drop"
    assert (canvas.winner[6] == -1).all()
    assert (canvas.winner[5][1:4, 1:4] == 0).all()


def test_jitter_check_scores_each_seed_and_never_changes_the_masks(runner, lungs, propagated):
    """Propagate mode's jitter check: one extra jittered box per object on its seed slice, in the seeds'
    decoder call; the masks are those of the run without the check."""
    from medsam_engine.pipeline.annotate.quality import JitterCheck

    _, objects, rendering = lungs
    plain, plain_records, _ = propagated
    before = runner.stats.as_dict()
    checked, records = propagate_volume(
        runner, rendering, objects, window_of=WINDOWS, jitter=JitterCheck(fraction=0.1, seed=3)
    )
    after = runner.stats.as_dict()
    assert np.array_equal(plain, checked)
    assert after["decoded_boxes"] - before["decoded_boxes"] == sum(len(r.slices) for r in records) + len(
        objects
    )
    assert all(r.jitter_iou is None for r in plain_records)
    assert all(0.0 <= r.jitter_iou <= 1.0 for r in records)
    for label in (5, 6):  # each lung's main object: a 10 % box shift barely moves its mask
        assert max((r for r in records if r.label == label), key=lambda r: r.voxels).jitter_iou > 0.5
    assert [r.to_json()["jitter_iou"] for r in records] == [round(r.jitter_iou, 5) for r in records]


def _square_image() -> np.ndarray:
    """A bright 5 x 5 square (200) on a darker 20 x 20 slice (50), as a rendering gives it."""
    image = np.full((20, 20), 50, dtype=np.uint8)
    image[5:10, 5:10] = 200
    return image


def _logits(rows: slice, cols: slice) -> np.ndarray:
    logits = np.full((20, 20), -5.0, dtype=np.float32)
    logits[rows, cols] = 5.0
    return logits


def test_a_seed_look_is_its_inside_and_ring_medians_and_likeness_the_share_nearer_the_inside():
    image = _square_image()
    seed = np.zeros((20, 20), dtype=bool)
    seed[5:10, 5:10] = True
    look = seed_look(image, seed)
    assert look == (200.0, 50.0)
    assert likeness(image, seed, look) == 1.0
    elsewhere = np.zeros((20, 20), dtype=bool)
    elsewhere[12:18, 12:18] = True
    assert likeness(image, elsewhere, look) == 0.0
    half = np.zeros((20, 20), dtype=bool)
    half[5:10, 3:7] = True  # two columns of the square, two of its surroundings
    assert likeness(image, half, look) == 0.5
    assert seed_look(np.full((20, 20), 50, dtype=np.uint8), seed) is None  # no contrast, no look


def test_an_open_range_ends_where_the_masks_stop_looking_like_the_seed():
    """Seeds from marks: a mask over the surroundings counts as empty (not painted, the seed box next);
    two in a row end the direction. A closed range (a coarse mask's object) paints it as before."""
    image, rules = _square_image(), PropagateRules(stop_after_empty=2, min_likeness=0.5, min_slice_iou=0.0)
    seed, away = _logits(slice(5, 10), slice(5, 10)), _logits(slice(5, 10), slice(8, 14))
    track, canvas = _track(), _Canvas((10, 20, 20))
    _advance(track, 5, seed, 0.9, rules, (5, 5, 9, 9), canvas, image)
    assert track.look == (200.0, 50.0)
    _advance(track, 6, away, 0.9, rules, (5, 5, 12, 9), canvas, image)  # 2 of its 6 columns on the square
    assert (canvas.winner[6] == -1).all()
    assert track.previous is None
    assert not track.done
    _advance(track, 7, away, 0.9, rules, (5, 5, 12, 9), canvas, image)
    assert track.done
    assert track.stop_reason == "2 slices empty or unlike the seed"
    closed, closed_canvas = _track(), _Canvas((10, 20, 20))
    _advance(closed, 5, seed, 0.9, rules, (5, 5, 9, 9), closed_canvas)
    _advance(closed, 6, away, 0.9, rules, (5, 5, 12, 9), closed_canvas)
    assert (closed_canvas.winner[6] == 0).sum() == 30
    assert not closed.done


def test_the_likeness_rule_enters_the_result_hash_of_marks_runs_only():
    from medsam_engine.pipeline.annotate.config import EngineConfig

    base = EngineConfig()
    marks = base.with_overrides(prompts={"detector": "marks", "options": {"marks": "PR"}})
    looser = {"propagate": {"min_likeness": 0.25}}
    assert base.with_overrides(**looser).result_hash() == base.result_hash()
    assert marks.with_overrides(**looser).result_hash() != marks.result_hash()


def test_an_open_ranges_box_never_outgrows_its_seed_box():
    """A marked lesion is largest on its key slice: the previous mask's box plus the margin is shrunk about
    its centre to the seed box's size; a closed range (a coarse mask's object) keeps it."""
    from dataclasses import replace

    assert no_larger((0, 0, 10, 4), (0, 0, 6, 6)) == (2, 0, 8, 4)
    run = _Run(None, {}, {}, PropagateRules(box_margin_px=3), _Canvas((10, 20, 20)), open_range=True)
    track = _track()  # seed box (2, 2, 5, 5) on slice 5
    track.previous = np.zeros((20, 20), dtype=bool)
    track.previous[2:8, 2:8] = True
    assert _next_box(run, track, 5) == (2, 2, 5, 5)
    assert _next_box(run, track, 6) == (3, 3, 6, 6)
    assert _next_box(replace(run, open_range=False), track, 6) == (0, 0, 10, 10)
