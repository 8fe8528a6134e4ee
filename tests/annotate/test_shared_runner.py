"""Encoder calls of concurrent cases merged into shared batches (pipeline/annotate/shared_runner.py): each
caller gets its own slices' embeddings, waiting calls go through together, errors reach every caller of the
batch; and end to end on real 2D cases with the real model, the masks are those of case-by-case runs."""

from __future__ import annotations

import threading
import time
from types import SimpleNamespace

import numpy as np
import pytest
from nuclei_data import write_corner_nuclei

from medsam_engine.pipeline.annotate.shared_runner import SharedRunner
from medsam_engine.pipeline.model.runner import SliceEmbedding


class RecordingEncoder:
    """An encoder whose embedding of a slice is its mean; it records each call's size and can hold the first
    call until told, so that other callers queue behind it."""

    def __init__(self, fail_on: float | None = None) -> None:
        self.calls: list[int] = []
        self.release = threading.Event()
        self.entered = threading.Event()
        self.fail_on = fail_on
        self.model = SimpleNamespace(name="recording")

    def encode(self, slices_u8):
        self.entered.set()
        if not self.calls:
            self.release.wait(10)
        self.calls.append(len(slices_u8))
        if self.fail_on is not None and any(float(s.mean()) == self.fail_on for s in slices_u8):
            raise RuntimeError("encoder failed")
        return [SliceEmbedding(np.array([float(s.mean())]), s.shape, s.shape) for s in slices_u8]

    def decode(self, embedded, boxes):
        return np.zeros((len(boxes), *embedded.original_hw), np.float32), np.ones(len(boxes), np.float32)


def _slices(*values: float) -> list[np.ndarray]:
    return [np.full((4, 4), v, np.uint8) for v in values]


def _call_all(shared: SharedRunner, requests: list[list[np.ndarray]], encoder: RecordingEncoder):
    results: dict[int, object] = {}

    def call(index: int) -> None:
        try:
            results[index] = [float(e.embedding[0]) for e in shared.encode(requests[index])]
        except RuntimeError as exc:
            results[index] = exc

    first = threading.Thread(target=call, args=(0,))
    first.start()
    assert encoder.entered.wait(10)  # the first call holds the model
    others = [threading.Thread(target=call, args=(i,)) for i in range(1, len(requests))]
    for thread in others:
        thread.start()
    deadline = time.monotonic() + 10
    while len(shared._queue) < len(others) and time.monotonic() < deadline:
        time.sleep(0.01)
    encoder.release.set()
    for thread in [first, *others]:
        thread.join(10)
    return results


def test_calls_queued_behind_a_busy_model_go_through_as_one_batch():
    encoder = RecordingEncoder()
    shared = SharedRunner(encoder, threading.Lock(), max_slices=8)
    requests = [_slices(1), _slices(2, 3), _slices(4), _slices(5, 6, 7)]
    results = _call_all(shared, requests, encoder)
    assert results == {0: [1.0], 1: [2.0, 3.0], 2: [4.0], 3: [5.0, 6.0, 7.0]}  # each caller its own slices
    assert encoder.calls == [1, 6]  # the three waiting calls in one batch
    assert shared.model.name == "recording"  # the runner's attributes show through


def test_a_batch_never_exceeds_max_slices():
    encoder = RecordingEncoder()
    shared = SharedRunner(encoder, threading.Lock(), max_slices=3)
    results = _call_all(shared, [_slices(1), _slices(2, 3), _slices(4), _slices(5, 6, 7)], encoder)
    assert sum(encoder.calls) == 7
    assert max(encoder.calls) <= 3
    assert [results[i] for i in range(4)] == [[1.0], [2.0, 3.0], [4.0], [5.0, 6.0, 7.0]]


def test_an_encoder_error_reaches_every_caller_of_its_batch_and_no_other():
    encoder = RecordingEncoder(fail_on=4.0)
    shared = SharedRunner(encoder, threading.Lock(), max_slices=3)
    results = _call_all(shared, [_slices(1), _slices(2), _slices(4)], encoder)
    assert results[0] == [1.0]
    assert isinstance(results[1], RuntimeError)
    assert isinstance(results[2], RuntimeError)  # batched together
    with pytest.raises(ValueError, match="max_slices"):
        SharedRunner(encoder, threading.Lock(), max_slices=0)


@pytest.mark.slow
def test_shared_batches_on_real_2d_cases_give_the_masks_of_case_by_case_runs(nuclei_tiles, tmp_path):
    """Four small nuclei cases, in flight together with their encoder calls merged (the CPU graphs take any
    batch): fewer encoder calls than slices, and the same masks as one case at a time."""
    from medsam_engine.pipeline.annotate.config import EngineConfig
    from medsam_engine.pipeline.annotate.job import annotate
    from medsam_engine.pipeline.core.metrics import dice
    from medsam_engine.pipeline.io.discover import discover
    from medsam_engine.pipeline.store.case_store import CaseStore

    images, masks = nuclei_tiles[0], tmp_path / "masks"  # 8 to 10 of each tile's 29 to 40 nuclei
    masks.mkdir()
    for path in sorted(nuclei_tiles[1].iterdir()):
        write_corner_nuclei(path, masks / path.name)
    maps = {}
    for name, pipeline in {
        "alone": {"case_workers": 1},
        "shared": {"case_workers": 4, "batch_across_cases": True},
    }.items():
        store = CaseStore(tmp_path / name)
        cases = discover([images], store.case_ids(), coarse_masks=[masks])
        config = EngineConfig.model_validate({"pipeline": pipeline, "model": {"encoder_batch": 4}})
        summary = annotate(cases, store, config, show_progress=False)
        assert summary.count("done") == len(cases) == 4
        maps[name] = {c.case_id: store.read_labels(c.case_id)[0] for c in cases}
        if name == "shared":
            stats = summary.runner_stats
            assert stats["encoder_calls"] < stats["encoded_slices"] == 4
    for case_id, labels in maps["alone"].items():
        for value in np.unique(labels)[1:]:
            assert dice(maps["shared"][case_id] == value, labels == value) > 0.99
