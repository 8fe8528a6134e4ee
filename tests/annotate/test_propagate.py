"""Propagate mode on real CT: lock-step decoding, one embedding per slice, the stop rules."""

from __future__ import annotations

import numpy as np
import pytest

from medsam_engine.detectors import compile_boxes, object_boxes
from medsam_engine.pipeline.annotate.propagate import (
    PropagateRules,
    _advance,
    _Canvas,
    _mask_box,
    _next_box,
    _Pending,
    _Run,
    _tighten_end,
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


@pytest.mark.parametrize("rule", [{"min_likeness": 0.25}, {"tighten_ends": False}])
def test_the_open_range_rules_enter_the_result_hash_of_marks_runs_only(rule):
    from medsam_engine.pipeline.annotate.config import EngineConfig

    base = EngineConfig()
    marks = base.with_overrides(prompts={"detector": "marks", "options": {"marks": "PR"}})
    assert base.with_overrides(propagate=rule).result_hash() == base.result_hash()
    assert marks.with_overrides(propagate=rule).result_hash() != marks.result_hash()


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


class _Decoder:
    """A runner stand-in for one decode: returns ``logits`` whatever the box, and records the boxes."""

    def __init__(self, logits: np.ndarray) -> None:
        self.logits, self.boxes = logits, []

    def encode(self, images):
        return [None for _ in images]

    def decode(self, embedded, boxes):
        self.boxes.append([tuple(int(v) for v in box) for box in boxes])
        return self.logits[None], np.array([0.8], dtype=np.float32)


def _ended(pending_mask: np.ndarray, *, tapering: bool) -> _Track:
    """A finished open-range track whose last mask, on slice 6, waits to be painted."""
    track = _track()
    track.look, track.done = (200.0, 50.0), True
    logits = np.where(pending_mask, 5.0, -5.0).astype(np.float32)
    track.slices, track.boxes, track.iou, track.stability = [6], [(2, 2, 12, 12)], [0.9], [0.9]
    track.pending = _Pending(6, logits, pending_mask, 0, tapering)
    return track


def test_an_end_slice_keeps_the_tight_boxs_mask_only_where_it_looks_no_less_like_the_seed():
    """The last mask of a stopped direction (the square and a rim of its surroundings) is decoded again
    from its own box: a mask on the square is painted with its box recorded, one on the surroundings is
    not; a mask no smaller than the slice before's is painted as it is, without a decode."""
    image, first = _square_image(), _logits(slice(4, 11), slice(4, 11)) > 0
    for tight, painted in (
        (_logits(slice(5, 10), slice(5, 10)), slice(5, 10)),
        (_logits(slice(10, 12), slice(4, 12)), slice(4, 11)),
    ):
        decoder, track, canvas = _Decoder(tight), _ended(first, tapering=True), _Canvas((10, 20, 20))
        run = _Run(decoder, {"w": np.stack([image] * 10)}, {}, PropagateRules(), canvas, open_range=True)
        _tighten_end(run, track)
        assert decoder.boxes == [[_mask_box(first, 0)]] == [[(4, 4, 10, 10)]]
        expected = np.zeros((20, 20), dtype=bool)
        expected[painted, painted] = True
        assert np.array_equal(canvas.winner[6] == 0, expected)
        assert track.pending is None
        assert track.boxes[0] == ((4, 4, 10, 10) if painted == slice(5, 10) else (2, 2, 12, 12))
    decoder, track, canvas = _Decoder(tight), _ended(first, tapering=False), _Canvas((10, 20, 20))
    _tighten_end(_Run(decoder, {"w": np.stack([image] * 10)}, {}, PropagateRules(), canvas), track)
    assert decoder.boxes == []
    assert np.array_equal(canvas.winner[6] == 0, first)


@pytest.fixture(scope="module")
def rib(chest_ct):
    """Slices 4..15 of the real chest CT in the bone window and one rib there (5 x 7 voxels on its middle
    slice, 9 of the volume), narrowing into the slices either side of its middle as a small lesion does."""
    from medsam_engine.pipeline.core.intensity import IntensityConfig

    volume = read_volume(chest_ct[0])
    ribs = (align_to(read_volume(chest_ct[1]), volume)[4:16] == 1).astype(np.uint16)
    objects = object_boxes(compile_boxes(ribs, spacing=volume.spacing))
    (rib,) = [o for o in objects if o.z_middle == 5 and o.box_middle == (22, 88, 28, 92)]
    return rib, to_uint8(volume.array[4:16], "CT", IntensityConfig(400, 1800))


@pytest.mark.slow
def test_a_marked_objects_end_slices_come_from_their_own_masks_box_on_real_ct(runner, rib):
    """A rib propagated as an open range, with and without ``tighten_ends``: the masks differ only on the
    first and last painted slices, never on the seed; there the mask is the one decoded from the other run's
    mask's own box (recorded as the slice's box), and it looks no less like the seed."""
    obj, rendering = rib
    runs = {
        on: propagate_volume(
            runner, {"bone": rendering}, [obj], rules=PropagateRules(tighten_ends=on), open_range=True
        )
        for on in (False, True)
    }
    (before, (plain,)), (after, (record,)) = runs[False], runs[True]
    changed = [z for z in range(len(after)) if (before[z] != after[z]).any()]
    painted = np.flatnonzero(after.any(axis=(1, 2)))
    assert changed  # the rib narrows into its end slices
    assert set(changed) <= {painted[0], painted[-1]}
    assert obj.z_middle not in changed
    look = seed_look(rendering[obj.z_middle], after[obj.z_middle] > 0)
    for z in changed:
        first, tight, position = before[z] > 0, after[z] > 0, record.slices.index(z)
        assert record.boxes[position] == _mask_box(first, 0) != plain.boxes[position]
        assert likeness(rendering[z], tight, look) >= likeness(rendering[z], first, look)
