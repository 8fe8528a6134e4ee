"""Prefect flow: studies -> discover -> plan (skip committed) -> shard -> annotate on Ray actors -> summarise.

The flow only wires pipeline steps; each task does one step. Cases travel as CaseRef fields (paths, keyed-hash
ids), never arrays. Each shard is a task whose persisted result (JSON) lists the case ids it committed and its
cases' outcome records (ids, status, failing stage; no file names). A rerun, or a retry of a failed run,
redoes only what the store does not hold: committed cases are skipped by signature before sharding, and
again inside the actors, so a retried case is harmless.

Failure policy: a case's failure is recorded in STORE/_errors and quarantined (STORE/_quarantine) unless it
was a transient I/O error (retried in the actor first); the flow fails only when the failed fraction of the
cases it tried exceeds ``policy.max_failure_fraction``, or when a shard itself could not run. Progress and
a summary table are Prefect artifacts; a progress bar shows on a terminal.
"""

from __future__ import annotations

import time
from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_table_artifact
from prefect.cache_policies import INPUTS, NO_CACHE, RUN_ID, TASK_SOURCE
from prefect.runtime import flow_run
from prefect.task_runners import ThreadPoolTaskRunner
from pydantic import BaseModel, ConfigDict, Field, model_validator

from medsam_engine.detectors.marks import FROM_PACS as MARKS_FROM_PACS
from medsam_engine.flows import progress, summary, watermark
from medsam_engine.pipeline.annotate.config import EngineConfig, load_config
from medsam_engine.pipeline.annotate.lazy_runner import LazyRunner
from medsam_engine.pipeline.annotate.plan import RunPlan, discover_inputs, plan_run
from medsam_engine.pipeline.annotate.policy import RETRY_NEXT_RUN
from medsam_engine.pipeline.annotate.run_record import run_record
from medsam_engine.pipeline.core.errors import is_transient
from medsam_engine.pipeline.core.outcome import CaseOutcome
from medsam_engine.pipeline.core.provenance import utc_stamp
from medsam_engine.pipeline.core.types import CaseRef
from medsam_engine.pipeline.distributed.ray_pool import (
    ActorPlan,
    Job,
    PoolOptions,
    cluster_nodes,
    connect,
    drive,
    get_annotator,
    plan_actors,
    release_annotators,
)
from medsam_engine.pipeline.export.pacs_push import push_segs
from medsam_engine.pipeline.io.cache import CacheLifecycle
from medsam_engine.pipeline.io.dicomweb import is_service_root
from medsam_engine.pipeline.io.discover import FROM_PACS, DiscoveryOptions, discover
from medsam_engine.pipeline.store.case_store import CaseStore, remove_stale_staging
from medsam_engine.pipeline.store.records import read_request

MAX_SHARD_THREADS = 256  # shard tasks mostly wait on ray.wait; one thread each


class RunOptions(BaseModel):
    """What to annotate and how (the engine's configuration, discovery switches, the watermark)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    config: EngineConfig | None = Field(
        None, description="engine configuration (else config_path, else the defaults)"
    )
    config_path: str | None = Field(None, description="YAML/JSON engine configuration file")
    overwrite: bool = Field(False, description="replace cases committed with another signature")
    keep_localizers: bool = False
    keep_derived: bool = False
    watermark: str | None = Field(
        None,
        description="name of a watermark: take only studies changed since "
        "the last successful run that used it",
    )
    settle_seconds: float = Field(
        300.0, ge=0, description="studies changed more recently wait for the next run"
    )
    pacs_query: dict[str, str] = Field(
        default_factory=dict, description="QIDO-RS filters for an input that is a DICOMweb service root"
    )
    push_seg: str | None = Field(
        None, description="DICOMweb service root: store each committed proposal there as DICOM SEG (STOW-RS)"
    )
    marks: list[str] = Field(
        default_factory=list,
        description="a flywheel round: reviewers' marks (GSPS/SR files or folders, or pacs: those in each "
        "DICOMweb case's study) whose new findings are added to the cases a person reviewed",
    )

    @model_validator(mode="after")
    def _one_config(self) -> RunOptions:
        if self.config is not None and self.config_path is not None:
            raise ValueError("give 'config' or 'config_path', not both")
        if self.watermark is not None:
            watermark.check_name(self.watermark)
        return self

    def engine_config(self) -> EngineConfig:
        return self.config if self.config is not None else load_config(self.config_path)


class RunPolicy(BaseModel):
    """How a whole run treats failures (the fraction that fails it, quarantined cases) and how it shards;
    each case's own retries are pipeline.annotate.policy.FailurePolicy."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_failure_fraction: float = Field(
        0.1, ge=0, le=1, description="the run fails above this fraction of failed cases among those it tried"
    )
    retry_quarantined: bool = Field(False, description="try quarantined cases again")
    shards: int | None = Field(None, ge=1, description="shards (default: one per actor)")


class TooManyFailures(RuntimeError):
    """The run finished but too many cases failed; ``report`` is the run's summary."""

    def __init__(self, message: str, report: dict) -> None:
        super().__init__(message)
        self.report = report


@task(name="select-studies", cache_policy=NO_CACHE)
def select_studies(
    inputs: list[str], store_url: str, run: RunOptions, model: str | None = None, marks: bool = False
) -> dict:
    """The inputs to discover: all of them, or (with a watermark) the studies changed since it; all of them
    too when the watermark was set with another ``model`` than this run's (a round's new model makes every
    case it did not annotate stale). With ``marks`` (prompts from the marks in the PACS) a service root's
    studies are those with PR/SR marks."""
    if run.watermark is None:
        return {"units": list(inputs), "changed": None, "until": None}

    until, store = time.time() - run.settle_seconds, CaseStore(store_url)
    since = watermark.read_mark(store, run.watermark, model=model)
    roots = [given for given in inputs if is_service_root(given)]
    chosen = watermark.select_new(
        watermark.study_entries([i for i in inputs if i not in roots]), since=since, until=until
    )
    # a PACS down or refusing the login raises its ReadError here: one clear error before any case is read
    pacs = watermark.pacs_studies(
        roots,
        dict(run.pacs_query),
        key=store.case_ids().case_id,
        seen=watermark.read_seen(store, run.watermark, model=model),
        marks_only=marks,
    )
    chosen += [watermark.Entry(url, float("inf")) for url in pacs]
    get_run_logger().info(
        "watermark %s: %d studies changed since %s",
        run.watermark,
        len(chosen),
        "the beginning" if since is None else utc_stamp(since),
    )
    return {
        "units": [e.path for e in chosen],
        "changed": [e.changed for e in chosen],
        "until": until,
        "pacs": pacs,
    }


@task(name="discover", cache_policy=NO_CACHE)
def discover_cases(
    units: list[str], store_url: str, coarse_masks: list[str], run: RunOptions, marks: bool = False
) -> dict:
    """Every case (CaseRef), and the index of the unit (study) each came from; with ``marks`` (the prompts),
    each DICOMweb case with the marks of its study in the PACS, and with ``run.marks`` pacs (a round's marks
    on reviewed cases) each with them where its study has any."""
    store = CaseStore(store_url)
    options = DiscoveryOptions(
        keep_localizers=run.keep_localizers,
        keep_derived=run.keep_derived,
        pacs_query=dict(run.pacs_query),
        marks_from_pacs=marks,
        study_marks=any(given.lower() in MARKS_FROM_PACS for given in run.marks),
    )
    if run.watermark is None:
        found = [(None, c) for c in discover_inputs(units, store, coarse_masks=coarse_masks, options=options)]
    else:
        if coarse_masks != [FROM_PACS] and (
            len(coarse_masks) > 1 or (coarse_masks and not Path(coarse_masks[0]).is_dir())
        ):
            raise ValueError(
                "with a watermark, --coarse-mask must be one folder whose file stems match, or from-pacs"
            )
        found = [
            (i, c)
            for i, unit in enumerate(units)
            for c in discover([unit], store.case_ids(), coarse_masks=coarse_masks, options=options)
        ]
    seen: set[str] = set()
    cases: list[CaseRef] = []
    unit_of = []
    for unit, case in found:
        if case.case_id not in seen:
            seen.add(case.case_id)
            cases.append(case)
            unit_of.append(unit)
    get_run_logger().info("discovered %d cases in %d inputs", len(cases), len(units))
    return {"cases": cases, "units": unit_of}


@task(name="plan", cache_policy=NO_CACHE)
def plan_cases(
    cases: list[CaseRef], store_url: str, config: EngineConfig, retry_quarantined: bool
) -> RunPlan:
    """The run's plan (pipeline/annotate/plan.py): cases to annotate; those committed with the same
    signature, or quarantined with it, are left out."""
    store = CaseStore(store_url)
    remove_stale_staging(store)
    runner = LazyRunner(config)  # hashes a user's checkpoint once, and only when something is committed
    plan = plan_run(
        cases,
        store,
        config,
        model_identity=lambda: runner.model_sha256,
        honour_quarantine=not retry_quarantined,
    )
    get_run_logger().info(
        "%d to annotate, %d already committed, %d quarantined",
        len(plan.todo),
        len(plan.skipped),
        len(plan.quarantined),
    )
    return plan


@task(name="shard", cache_policy=NO_CACHE)
def make_shards(plan: RunPlan, shards: int) -> list[list[CaseRef]]:
    """The cases to annotate in at most ``shards`` groups of about equal slice counts (read from headers)."""
    groups = plan.shards(shards)
    get_run_logger().info("%d shards of %s cases", len(groups), "/".join(str(len(g)) for g in groups))
    return groups


def _retry_if_transient(task, task_run, state) -> bool:
    """Shard tasks are retried only for transient errors (I/O, lost connection to the cluster)."""
    from ray.exceptions import RaySystemError

    exc = state.result(raise_on_failure=False)
    return isinstance(exc, RaySystemError) or is_transient(exc)


@task(
    name="annotate-shard",
    task_run_name="shard-{index}",
    cache_policy=INPUTS + TASK_SOURCE + RUN_ID,
    persist_result=True,
    result_serializer="json",
    retries=2,
    retry_delay_seconds=10,
    retry_condition_fn=_retry_if_transient,
)
def annotate_shard(shard: list[CaseRef], index: int, plan: ActorPlan, job: Job, in_flight: int) -> dict:
    """Annotate one shard on actor ``index % plan.count``; returns {"committed": [ids], "outcomes": [...]}.

    A retry of the same flow run reuses the persisted result of a shard that completed with these inputs."""
    board = progress.board_for(job.run_id)

    def annotator(lost=None):
        return get_annotator(plan, index % plan.count, job.config_json, lost=lost)

    outcomes = drive(
        shard, annotator, job, in_flight=in_flight, on_outcome=None if board is None else board.advance
    )
    return {"committed": [o["case_id"] for o in outcomes if o["status"] == "done"], "outcomes": outcomes}


@task(name="summarise", cache_policy=NO_CACHE)
def summarise(outcomes: list[dict], store_url: str, run_id: str, facts: dict, config: dict) -> dict:
    """The run's report; a table artifact (failures first, label volumes in mL) and STORE/_runs/<run>.json."""
    store = CaseStore(store_url)
    facts = dict(facts)
    wall_s = facts.pop("wall_s", 0.0)
    report = run_record(run_id, outcomes, config, engine="ray", wall_s=wall_s, store=store, **facts)
    create_table_artifact(
        key="annotate-summary",
        table=summary.table_rows(outcomes, report["label_volumes_ml"]),
        description=f"{report['counts']} in {wall_s:.0f} s",
    )
    store.write_run(run_id, report)
    get_run_logger().info("annotate-archive: %s, %d slices", report["counts"], report["slices"])
    return report


def _run_shards(
    shards: list[list[CaseRef]], plan: ActorPlan, job: Job, in_flight: int
) -> tuple[list[dict], int]:
    """Submit every shard, wait for all; returns the outcomes and the number of shards that failed."""
    futures = [annotate_shard.submit(shard, i, plan, job, in_flight) for i, shard in enumerate(shards)]
    outcomes, broken = [], 0
    for shard, future in zip(shards, futures, strict=True):
        result = future.result(raise_on_failure=False)
        if isinstance(result, BaseException):
            broken += 1
            get_run_logger().error(
                "shard failed (%s); its %d cases are left for the next run", type(result).__name__, len(shard)
            )
            result = {"outcomes": [CaseOutcome(c.case_id, "failed", stage="shard").record() for c in shard]}
        outcomes += result["outcomes"]
    return outcomes, broken


def requested(
    store_url: str,
    request: str | None,
    inputs: list[str] | None,
    coarse_masks: list[str] | None,
    run: RunOptions | None,
) -> tuple[list[str], list[str], RunOptions]:
    """The inputs, coarse masks and run options of a flow run: its parameters, or (``request``) those a
    command kept in STORE/_requests, so that no path or query reaches the orchestrator's database."""
    if request is None:
        return list(inputs or []), list(coarse_masks or []), run or RunOptions()
    if inputs or coarse_masks or run is not None:
        raise ValueError("give a run request or inputs, coarse masks and run options, not both")
    found = read_request(CaseStore(store_url), request)
    return list(found["inputs"]), list(found["coarse_masks"]), RunOptions.model_validate(found["run"])


@flow(name="annotate-archive", task_runner=ThreadPoolTaskRunner(max_workers=MAX_SHARD_THREADS))
def annotate_archive(
    inputs: list[str] | None = None,
    store: str = "",
    coarse_masks: list[str] | None = None,
    run: RunOptions | None = None,
    pool: PoolOptions | None = None,
    policy: RunPolicy | None = None,
    request: str | None = None,
    out: str = "",
) -> dict:
    """Annotate every case under ``inputs`` into ``store`` on a Ray pool; returns the run's report (counts
    per status, one outcome record per case, slices, wall time). ``request`` (instead of inputs, coarse masks
    and run options): the id of a run request kept in the store (records.write_request), as the command line
    passes its paths. ``out`` is the older name of ``store``. Raises TooManyFailures when the failed fraction
    exceeds the policy (the report is on the exception)."""
    if store and out and store != out:
        raise ValueError("give 'store' (or its older name 'out') once")
    out = store or out
    if not out:
        raise ValueError("annotate-archive needs 'store'")
    pool, policy = pool or PoolOptions(), policy or RunPolicy()
    store_url = out if "://" in out else str(Path(out).resolve())
    inputs, masks, run = requested(store_url, request, inputs, coarse_masks, run)
    report, seen = annotate_inputs(inputs, store_url, masks, run, pool, policy, run.engine_config())
    seen["cache"].finish()
    enforce_policy(report, policy)
    if run.watermark is not None:
        advance_watermark(store_url, run, seen, report)
    return report


def annotate_inputs(
    inputs: list[str],
    store_url: str,
    coarse_masks: list[str],
    run: RunOptions,
    pool: PoolOptions,
    policy: RunPolicy,
    config: EngineConfig,
    *,
    model: str | None = None,
    keep=None,
) -> tuple[dict, dict]:
    """The steps both flows share, inside a flow run: studies (watermark), discovery, the cases ``keep``
    leaves (a callable on case ids; all by default), skip committed, annotate on Ray, summarise, push SEGs.
    Returns the run's report and what the watermark needs (the studies and the cases found in them), with
    the run's use of the cache under "cache" (pipeline/io/cache.py): the caller finishes it, which removes
    what the cases read from the cache, after its last step that reads the inputs."""
    started, run_id = time.perf_counter(), str(flow_run.id or f"local-{time.time_ns()}")
    marks = config.prompts.marks_from_pacs()  # prompts from the marks in the PACS: studies with marks
    studies = select_studies(inputs, store_url, run, model, marks)
    found = discover_cases(studies["units"], store_url, coarse_masks, run, marks)
    cache = CacheLifecycle(
        CaseStore(store_url).cache_dir(), found["cases"], keep=config.store.keep_cache, defer=True
    )
    cases, kept = found["cases"], []
    if keep is not None:
        chosen = set(keep([c.case_id for c in cases]))
        kept = [c.case_id for c in cases if c.case_id not in chosen]
        cases = [c for c in cases if c.case_id in chosen]
    plan = plan_cases(cases, store_url, config, policy.retry_quarantined)
    job = Job(store_url, run_id, config, overwrite=run.overwrite, retries=pool.case_retries)
    outcomes, facts = _annotate_on_ray(plan, job, pool, policy) if plan.todo else ([], {})
    outcomes += [outcome.record() for outcome in plan.settled()]
    facts = {
        "actors": 0,
        "shards": 0,
        "broken_shards": 0,
        "kept_accepted": len(kept),
        **facts,
        "wall_s": round(time.perf_counter() - started, 2),
    }
    report = summarise(outcomes, store_url, run_id, facts, config.model_dump(mode="json"))
    if run.push_seg:
        report["push"] = push_proposals(
            store_url, [o["case_id"] for o in outcomes if o["status"] != "failed"], run.push_seg
        )
    return report, {"studies": studies, "found": found, "cache": cache}


@task(name="push-seg", cache_policy=NO_CACHE)
def push_proposals(store_url: str, case_ids: list[str], service: str) -> dict:
    """Store the committed proposals in the PACS as DICOM SEG (once per committed version); counts only."""
    counts = push_segs(CaseStore(store_url), case_ids, service).counts()
    get_run_logger().info("SEG push: %s", counts)
    return counts


def _annotate_on_ray(
    plan: RunPlan, job: Job, pool: PoolOptions, policy: RunPolicy
) -> tuple[list[dict], dict]:
    """Size the pool, shard the plan's cases to annotate and run the shards; returns the outcomes and facts
    about the pool."""
    connect(pool.address)
    actors = plan_actors(cluster_nodes(), pool, case_workers=job.config.pipeline.case_workers)
    get_run_logger().info(
        "%d actors x %d CPUs, %g GPUs, %d cases in flight each",
        actors.count,
        actors.num_cpus,
        actors.num_gpus,
        actors.case_workers,
    )
    shards = make_shards(plan, policy.shards or actors.count)
    progress.open_board(job.run_id, len(plan.todo))
    try:
        outcomes, broken = _run_shards(shards, actors, job, pool.in_flight or actors.case_workers + 1)
    finally:
        progress.close_board(job.run_id)
        if not pool.keep_actors:
            release_annotators(actors, job.config_json)
    return outcomes, {"actors": actors.count, "shards": len(shards), "broken_shards": broken}


def enforce_policy(report: dict, policy: RunPolicy) -> None:
    """Fail the run when a shard could not run or too many cases failed (the summary is written already)."""
    if report["broken_shards"]:
        raise RuntimeError(f"{report['broken_shards']} shard(s) could not run; rerun to finish their cases")
    if report["failure_fraction"] > policy.max_failure_fraction:
        failed, fraction = report["counts"]["failed"], report["failure_fraction"]
        raise TooManyFailures(
            f"{failed} cases failed ({fraction:.1%} of those tried; the policy allows "
            f"{policy.max_failure_fraction:.1%})",
            report,
        )


def advance_watermark(
    store_url: str, run: RunOptions, seen: dict, report: dict, *, model: str | None = None
) -> None:
    """Move the watermark to this run's horizon, held back before studies whose cases failed transiently."""
    studies, found = seen["studies"], seen["found"]
    unit_of = {c.case_id: u for c, u in zip(found["cases"], found["units"], strict=True)}
    retry = {
        unit_of.get(o["case_id"])
        for o in report["cases"]
        if o["status"] == "failed" and o["stage"] in RETRY_NEXT_RUN
    }
    entries = [watermark.Entry(studies["units"][u], studies["changed"][u]) for u in retry if u is not None]
    mark = watermark.next_mark(studies["until"], entries)
    store = CaseStore(store_url)
    seen = watermark.read_seen(store, run.watermark, model=model)
    again = {studies["units"][u] for u in retry if u is not None}
    seen.update({key: count for url, (key, count) in studies["pacs"].items() if url not in again and count})
    watermark.write_mark(store, run.watermark, mark, run_id=report["run_id"], model=model, pacs=seen)
