"""The local engine: the run's plan (pipeline/annotate/plan.py) executed in this process, each case through
:func:`~pipeline.annotate.driver.run_case`, then the run record.

Per-case failures are recorded in the store and the batch goes on; a committed case with the same signature
is skipped without loading the model.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass, field

from tqdm.auto import tqdm

from medsam_engine.pipeline.annotate.config import EngineConfig
from medsam_engine.pipeline.annotate.driver import RunContext, run_case
from medsam_engine.pipeline.annotate.lazy_runner import LazyRunner
from medsam_engine.pipeline.annotate.plan import plan_run
from medsam_engine.pipeline.annotate.policy import LOCAL, FailurePolicy
from medsam_engine.pipeline.annotate.run_record import run_record
from medsam_engine.pipeline.core.outcome import CaseOutcome
from medsam_engine.pipeline.core.provenance import version_id
from medsam_engine.pipeline.core.types import CaseRef
from medsam_engine.pipeline.io.cache import CacheLifecycle
from medsam_engine.pipeline.io.readers import warm_readers
from medsam_engine.pipeline.model.devices import resolve_device
from medsam_engine.pipeline.store.case_store import CaseStore, remove_stale_staging


@dataclass
class RunSummary:
    """A run's id, one outcome per case (in order) and the runner's counters."""

    run_id: str
    outcomes: list[CaseOutcome] = field(default_factory=list)
    runner_stats: dict = field(default_factory=dict)

    def count(self, status: str) -> int:
        return sum(o.status == status for o in self.outcomes)

    @property
    def failed(self) -> list[CaseOutcome]:
        return [o for o in self.outcomes if o.status == "failed"]


MAX_GPU_CASE_WORKERS = 16  # cases in flight at once in one GPU process or actor (each with a reader process)


def case_workers(config: EngineConfig) -> int:
    """Cases one process works on at once (``pipeline.case_workers``; by default 2 on CPU, where the model
    takes the cores and one case read ahead hides the rest, and one per core up to 16 on a GPU, whose model
    outruns a single reader)."""
    if config.pipeline.case_workers:
        return config.pipeline.case_workers
    try:
        cuda = resolve_device(config.model.device) == "cuda"
    except ValueError:  # CUDA asked for but absent: the runner says so when the model is first needed
        cuda = False
    return max(2, min(MAX_GPU_CASE_WORKERS, os.cpu_count() or 1)) if cuda else 2


def annotate(
    cases: list[CaseRef],
    store: CaseStore,
    config: EngineConfig,
    *,
    overwrite: bool = False,
    runner: LazyRunner | None = None,
    show_progress: bool | None = None,
    policy: FailurePolicy = LOCAL,
    workers: int | None = None,
    on_outcome: Callable[[CaseOutcome], None] | None = None,
    cache: CacheLifecycle | None = None,
) -> RunSummary:
    """Run every case in this process; failures are recorded per case and never stop the batch.

    ``workers`` cases (default :func:`case_workers`) are in flight at once: each is read, prompted, cleaned
    and committed on its own thread while the model works on one case at a time (a lock). Outcomes keep the
    order of ``cases``; ``on_outcome`` receives each as its case ends. A
    :class:`~pipeline.core.errors.RunError` (no model, the store gone) stops the run: cases not started are
    left for the next run, the ones under way finish first.

    What the cases read from the store's cache (extracted archives, fetched and downloaded inputs) is removed
    as their cases end, and the rest when the run ends (pipeline/io/cache.py; ``store.keep_cache`` keeps it).
    A caller that reads the inputs after the run (a DICOM SEG push) passes its own deferred ``cache`` and
    finishes it itself.
    """
    started = time.perf_counter()
    lazy = runner or LazyRunner(config)
    remove_stale_staging(store)
    summary = RunSummary(run_id=version_id())
    lifecycle = cache or CacheLifecycle(store.cache_dir(), cases, keep=config.store.keep_cache)

    def ended(outcome: CaseOutcome) -> None:
        if on_outcome is not None:
            on_outcome(outcome)
        lifecycle.case_ended(outcome.case_id)

    show = sys.stderr.isatty() if show_progress is None else show_progress
    plan = plan_run(
        cases,
        store,
        config,
        model_identity=lambda: lazy.model_sha256,
        honour_quarantine=policy.quarantine,
    )
    outcomes: dict[int, CaseOutcome] = {}
    index_of = {case.case_id: i for i, case in reversed(list(enumerate(cases)))}
    for outcome in plan.settled():  # nothing to do: reported at once, without a worker
        outcomes[index_of[outcome.case_id]] = outcome
        ended(outcome)
    todo = list(plan.todo)
    workers = max(1, min(workers or case_workers(config), len(todo) or 1))
    if todo:
        warm_readers(workers, todo, when_needed=True)  # a reader per case worker, all at the first read
    model_lock = threading.Lock() if workers > 1 else None
    try:
        with (
            tqdm(total=len(cases), desc="cases", unit="case", disable=not show) as bar,
            tqdm(desc="slices", unit="slice", disable=not show, leave=False) as slices,
            opencv_threads(1),
            frozen_heap(),
        ):
            run = RunContext(
                store,
                config,
                lazy,
                summary.run_id,
                policy=policy,
                overwrite=overwrite,
                model_lock=model_lock,
            )

            def one(case: CaseRef) -> CaseOutcome:
                return run_case(case, run, progress=slices if show else None)

            for index, outcome in _in_flight(one, todo, workers):  # a RunError stops the run here
                outcomes[index_of[todo[index].case_id]] = outcome
                bar.update(1)
                ended(outcome)
    finally:
        lazy.settle()
        if cache is None:
            lifecycle.finish()
    summary.outcomes = [outcomes[i] for i in sorted(outcomes)]
    summary.runner_stats = lazy.stats()
    record = run_record(
        summary.run_id,
        [o.record() for o in summary.outcomes],
        config.model_dump(mode="json"),
        engine="local",
        wall_s=time.perf_counter() - started,
        store=store,
        runner=summary.runner_stats,
    )
    store.write_run(summary.run_id, record)
    return summary


@contextlib.contextmanager
def opencv_threads(count: int):
    """OpenCV's thread pool at ``count`` threads while the block runs, restored after.

    A run's parallelism is its case workers (and the model runtime's own threads); OpenCV's work per call is
    a slice or less, where its threads mostly wait and spin: a look-up table on a 512 x 512 slice took twice
    the CPU time on two threads as on one, and segmenting a 34-slice CT case 45 ms of CPU instead of 24."""
    import cv2

    before = cv2.getNumThreads()
    cv2.setNumThreads(count)
    try:
        yield
    finally:
        cv2.setNumThreads(before)


@contextlib.contextmanager
def frozen_heap():
    """Python's cyclic garbage collector leaves the objects that exist when the run starts (modules, the
    model, configuration) out of its scans until the run ends: DICOM parsing makes thousands of objects per
    case, and each full collection otherwise walked the whole heap again (~40 ms a time with the engine
    loaded). Objects made during the run are collected as usual."""
    import gc

    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def _in_flight(work, cases: list[CaseRef], workers: int):
    """(index, ``work(case)``) as cases finish, ``workers`` at a time on threads (in this thread when 1). When
    a call raises, cases not started are cancelled; the ones under way finish before the error propagates."""
    if workers == 1:
        for index, case in enumerate(cases):
            yield index, work(case)
        return
    with ThreadPoolExecutor(workers, thread_name_prefix="medsam-case") as pool:
        waiting = iter(enumerate(cases))
        running = {pool.submit(work, case): index for index, case in itertools.islice(waiting, workers)}
        try:
            while running:
                done, _ = wait(running, return_when=FIRST_COMPLETED)
                for future in done:
                    index = running.pop(future)
                    yield index, future.result()
                    for later, case in itertools.islice(waiting, 1):
                        running[pool.submit(work, case)] = later
        finally:
            for future in running:
                future.cancel()
