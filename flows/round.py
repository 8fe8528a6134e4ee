"""Prefect flow: one data-engine round over Ray actors (the nightly deployment `nightly-round`).

begin the round (calibration refit on the reviews so far, the store's current registered model, round n+1
marked in progress) -> the studies new since the watermark (all of them when the watermark was set with
another model) -> discover -> leave out cases a person reviewed -> skip what this model already committed ->
annotate on Ray with routing on -> summarise -> push proposals as DICOM SEG (with ``run.push_seg``) -> add
the new findings reviewers marked in reviewed cases (``run.marks``, or the marks detector's own marks; in the
flow's process, pipeline/flywheel/marked_findings.py) -> export the review queue and write the round report
-> move the watermark.

A model registered by `medsam-engine finetune --store` is the next night's model without any change to the
deployment: its signature differs, so every case it did not annotate is stale and re-annotated. The same
steps run in one process as `medsam-engine round run` (pipeline/flywheel/rounds.py).
"""

from __future__ import annotations

from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.task_runners import ThreadPoolTaskRunner

from medsam_engine.flows.annotate import (
    MAX_SHARD_THREADS,
    RunOptions,
    RunPolicy,
    advance_watermark,
    annotate_inputs,
    enforce_policy,
    requested,
)
from medsam_engine.pipeline.annotate.lazy_runner import LazyRunner
from medsam_engine.pipeline.core.outcome import CaseOutcome
from medsam_engine.pipeline.core.types import CaseRef
from medsam_engine.pipeline.distributed.ray_pool import PoolOptions
from medsam_engine.pipeline.flywheel.marked_findings import add_marked_findings, marks_options
from medsam_engine.pipeline.flywheel.rounds import RoundStart, begin_round, finish_round, split_accepted
from medsam_engine.pipeline.store.case_store import CaseStore


@task(name="begin-round", cache_policy=NO_CACHE)
def start_round(store_url: str, run: RunOptions, checkpoint: str | None) -> RoundStart:
    start = begin_round(CaseStore(store_url), run.engine_config(), checkpoint=checkpoint)
    get_run_logger().info(
        "round %d%s with model %s",
        start.number,
        " (resumed)" if start.resumed else "",
        "registered" if start.registered else ("given" if start.checkpoint else "base"),
    )
    return start


@task(name="marked-findings", cache_policy=NO_CACHE)
def add_marks(store_url: str, start: RoundStart, cases: list[CaseRef], given: list[str]) -> dict | None:
    """The new findings reviewers marked in the reviewed cases among ``cases``, segmented in this process
    (pipeline/flywheel/marked_findings.py: ``given`` marks, else the marks detector's when it is the round's);
    the round record's ``marks`` section, or None when the round takes no marks."""
    options = marks_options(given, start.config)
    if options is None:
        return None
    store = CaseStore(store_url)
    reviewed = set(split_accepted(store, [c.case_id for c in cases])[1])
    section = add_marked_findings(
        [c for c in cases if c.case_id in reviewed],
        store,
        start.config,
        options,
        LazyRunner(start.config),
        number=start.number,
        run_id=f"round-{start.number:03d}-marks",
    )
    get_run_logger().info(
        "marks: %d instance(s) added to %d reviewed case(s); %d failed",
        section["added"],
        section["cases_amended"],
        len(section["failed"]),
    )
    return section


@task(name="finish-round", cache_policy=NO_CACHE)
def end_round(
    store_url: str,
    start: RoundStart,
    report: dict,
    model_sha256: str,
    review_out: str | None,
    marks: dict | None = None,
) -> dict:
    outcomes = [CaseOutcome.from_record(record) for record in report["cases"]]
    given = len(outcomes) + report["kept_accepted"]
    result = finish_round(
        CaseStore(store_url),
        start,
        outcomes,
        given=given,
        kept=report["kept_accepted"],
        model_sha256=model_sha256,
        queue_dir=review_out,
        extra={"run_id": report["run_id"], "push": report.get("push"), **({"marks": marks} if marks else {})},
    )
    get_run_logger().info(
        "round %d: %s; review queue %d case(s)",
        result.number,
        result.report["cases"],
        result.report["queue"]["cases"],
    )
    return {**result.report, "report_path": result.report_path, "run": report}


@flow(name="flywheel-round", task_runner=ThreadPoolTaskRunner(max_workers=MAX_SHARD_THREADS))
def flywheel_round(
    inputs: list[str] | None = None,
    store: str = "",
    coarse_masks: list[str] | None = None,
    run: RunOptions | None = None,
    pool: PoolOptions | None = None,
    policy: RunPolicy | None = None,
    checkpoint: str | None = None,
    review_out: str | None = None,
    request: str | None = None,
) -> dict:
    """Run round n+1 on ``inputs`` (or a run request's, see flows.annotate.requested) into the flywheel's
    ``store`` (see the module doc); returns the round report with the run's report under "run".
    ``checkpoint`` pins a model (default: the store's current registered model, else the base model);
    ``review_out`` is the queue folder (default STORE/_review/round-NNN). Raises TooManyFailures after the
    round report is written when too many cases failed."""
    if not store:
        raise ValueError("flywheel-round needs 'store'")
    pool, policy = pool or PoolOptions(), policy or RunPolicy()
    store_url = store if "://" in store else str(Path(store).resolve())
    inputs, coarse_masks, run = requested(store_url, request, inputs, coarse_masks, run)
    start = start_round(store_url, run, checkpoint)
    model = LazyRunner(start.config).model_sha256
    run = run.model_copy(update={"overwrite": True})  # a stale case is replaced by this round's proposal
    accepted = CaseStore(store_url)
    report, seen = annotate_inputs(
        inputs,
        store_url,
        coarse_masks,
        run,
        pool,
        policy,
        start.config,
        model=model,
        keep=lambda ids: split_accepted(accepted, ids)[0],
    )
    marks = add_marks(store_url, start, seen["found"]["cases"], run.marks)
    result = end_round(store_url, start, report, model, review_out, marks)
    seen["cache"].finish()  # after the review queue, whose DICOM SEGs read the source series
    enforce_policy(report, policy)
    if run.watermark is not None:
        advance_watermark(store_url, run, seen, report, model=model)
    return result
