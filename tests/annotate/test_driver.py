"""The one per-case driver: a case fails, retries and is quarantined the same way wherever it runs."""

from __future__ import annotations

import errno

import pytest

from medsam_engine.pipeline.annotate import driver
from medsam_engine.pipeline.annotate.config import EngineConfig
from medsam_engine.pipeline.annotate.driver import RunContext, run_case
from medsam_engine.pipeline.annotate.job import annotate
from medsam_engine.pipeline.annotate.lazy_runner import LazyRunner
from medsam_engine.pipeline.annotate.policy import FailurePolicy
from medsam_engine.pipeline.io.discover import discover
from medsam_engine.pipeline.model.checkpoint import CheckpointError
from medsam_engine.pipeline.store.case_store import CaseStore
from medsam_engine.pipeline.store.records import quarantined

NO_WAIT = FailurePolicy(retries=2, retry_delay_s=0)
QUARANTINE = FailurePolicy(retries=2, retry_delay_s=0, quarantine=True)
# the driver's failure handling is the subject, not the masks: the box-fill runner stands in for the network
BOX_FILL = EngineConfig.model_validate({"model": {"runner": "box-fill"}})


@pytest.fixture()
def broken_case(tmp_path):
    path = tmp_path / "broken.nii.gz"
    path.write_bytes(b"not a NIfTI file at all")
    store = CaseStore(tmp_path / "store")
    (case,) = discover([path], store.case_ids())
    return store, case


def test_a_corrupt_input_fails_at_read_naming_the_file_and_is_quarantined_only_when_asked(broken_case):
    store, case = broken_case
    lazy = LazyRunner(BOX_FILL)
    local = run_case(case, RunContext(store, lazy.config, lazy, "r1", policy=NO_WAIT))
    assert (local.status, local.stage) == ("failed", "read")
    assert "broken.nii.gz" in local.reason
    assert store.errors()[case.case_id]["stage"] == "read"
    assert quarantined(store, case.case_id) is None
    distributed = run_case(case, RunContext(store, lazy.config, lazy, "r2", policy=QUARANTINE))
    assert (distributed.stage, distributed.reason) == (local.stage, local.reason)
    held = quarantined(store, case.case_id)
    assert held["stage"] == "read"
    assert held["signature"]["input_sha256"]
    assert held["run_id"] == "r2"
    assert "reason" not in distributed.record()  # reasons name files: they stay in the store's records


def test_a_transient_read_error_is_retried_and_the_case_is_done(tmp_path, nuclei_2d, monkeypatch):
    store = CaseStore(tmp_path / "store")
    (case,) = discover([nuclei_2d[0]], store.case_ids(), coarse_masks=[nuclei_2d[1]])
    real, calls = driver.read_case, []

    def flaky(ref):
        calls.append(ref.case_id)
        if len(calls) == 1:
            raise OSError(errno.EIO, "Input/output error")
        return real(ref)

    monkeypatch.setattr(driver, "read_case", flaky)
    lazy = LazyRunner(BOX_FILL)
    outcome = run_case(case, RunContext(store, lazy.config, lazy, "r1", policy=QUARANTINE))
    assert outcome.status == "done"
    assert outcome.slices == 1
    assert len(calls) == 2
    assert store.case_attrs(case.case_id) is not None
    assert case.case_id not in store.errors()


def test_a_lasting_io_error_fails_at_io_and_is_never_quarantined(broken_case, monkeypatch):
    store, case = broken_case

    def unreachable(ref):
        raise OSError(errno.ETIMEDOUT, "Connection timed out")

    monkeypatch.setattr(driver, "read_case", unreachable)
    lazy = LazyRunner(BOX_FILL)
    outcome = run_case(case, RunContext(store, lazy.config, lazy, "r1", policy=QUARANTINE))
    assert (outcome.status, outcome.stage) == ("failed", "io")
    assert quarantined(store, case.case_id) is None


def test_a_bug_fails_its_case_only_and_the_batch_goes_on(tmp_path, nuclei_2d, small_chest, monkeypatch):
    store = CaseStore(tmp_path / "store")
    cases = discover(
        [nuclei_2d[0], small_chest[0]], store.case_ids(), coarse_masks=[nuclei_2d[1], small_chest[1]]
    )
    real = driver.renderings

    def broken_for_2d(volume, *args, **options):
        if volume.is_2d:
            raise KeyError("a bug")
        return real(volume, *args, **options)

    monkeypatch.setattr(driver, "renderings", broken_for_2d)
    summary = annotate(cases, store, BOX_FILL, runner=LazyRunner(BOX_FILL), show_progress=False)
    assert [(o.status, o.stage) for o in summary.outcomes] == [("failed", "internal"), ("done", "")]
    assert summary.outcomes[0].reason == "KeyError: 'a bug'"


def test_a_model_that_cannot_load_stops_the_run_instead_of_failing_every_case(tmp_path, nuclei_2d):
    broken = tmp_path / "broken.pth"
    broken.write_bytes(b"not a checkpoint")
    store = CaseStore(tmp_path / "store")
    (case,) = discover([nuclei_2d[0]], store.case_ids(), coarse_masks=[nuclei_2d[1]])
    config = EngineConfig.model_validate({"model": {"checkpoint": str(broken)}})
    with pytest.raises(CheckpointError):
        run_case(case, RunContext(store, config, LazyRunner(config), "r1", policy=QUARANTINE))
    assert store.errors() == {}
    assert quarantined(store, case.case_id) is None


def test_a_run_works_with_one_opencv_thread_and_a_frozen_heap_and_restores_both(broken_case, monkeypatch):
    """While cases run, OpenCV keeps one thread and the objects alive at the start are frozen out of the
    collector's scans; both are as before once the run ends (the case itself fails at read, as usual)."""
    import gc

    import cv2

    from medsam_engine.pipeline.annotate import job

    store, case = broken_case
    seen = []
    real = job.run_case

    def watched(*args, **kwargs):
        seen.append((cv2.getNumThreads(), gc.get_freeze_count()))
        return real(*args, **kwargs)

    monkeypatch.setattr(job, "run_case", watched)
    before = cv2.getNumThreads()
    cv2.setNumThreads(2)
    try:
        summary = annotate([case], store, BOX_FILL, policy=NO_WAIT, show_progress=False)
        assert [o.stage for o in summary.outcomes] == ["read"]
        assert seen[0][0] == 1
        assert seen[0][1] > 0
        assert cv2.getNumThreads() == 2
        assert gc.get_freeze_count() == 0
    finally:
        cv2.setNumThreads(before)


def test_a_run_starts_its_readers_at_its_first_read_and_a_rerun_of_committed_cases_starts_none(
    two_tiles, tmp_path, monkeypatch
):
    """The readers (one per case worker) start together when the first case is read; a rerun whose cases are
    all committed with the same signature reads nothing and starts no reader process."""
    from medsam_engine.pipeline.io import readers
    from medsam_engine.pipeline.io.isolate import WorkerPool

    pools = []

    def fresh_pool():
        return pools[-1]

    monkeypatch.setattr(readers, "default_pool", fresh_pool)
    store = CaseStore(tmp_path / "store")
    lazy = LazyRunner(BOX_FILL)
    cases = discover([two_tiles[0]], store.case_ids(), coarse_masks=[two_tiles[1]])
    try:
        for expected, readers_started in (("done", 2), ("skipped", 0)):
            pools.append(WorkerPool())
            summary = annotate(cases, store, lazy.config, runner=lazy, show_progress=False)
            assert [o.status for o in summary.outcomes] == [expected] * 2
            assert len(pools[-1]) == readers_started
    finally:
        for pool in pools:
            pool.close()


def test_a_committed_case_records_the_exact_voxels_of_each_label_it_stored(tmp_path, small_chest):
    from medsam_engine.pipeline.core.metrics import label_voxels

    store = CaseStore(tmp_path / "store")
    cases = discover([small_chest[0]], store.case_ids(), coarse_masks=[small_chest[1]])
    summary = annotate(cases, store, BOX_FILL, runner=LazyRunner(BOX_FILL), show_progress=False)
    (case_id,) = [o.case_id for o in summary.outcomes if o.status == "done"]
    labels, _ = store.read_labels(case_id)
    recorded = {int(v): n for v, n in store.case_attrs(case_id)["label_voxels"].items()}
    assert recorded == label_voxels(labels)
    assert len(recorded) > 1
