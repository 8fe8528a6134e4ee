"""`medsam-engine annotate|round run ... --engine ray`: the same jobs as the local engine, run as Prefect
flows.

Without $PREFECT_API_URL Prefect starts a temporary server for the run; without --ray-address/$RAY_ADDRESS a
local Ray is started. Output and exit codes follow the annotate contract (0 all done, 1 some cases failed,
2 bad usage).
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path

from medsam_engine.detectors.marks import FROM_PACS as MARKS_FROM_PACS
from medsam_engine.pipeline.annotate.progress import RunProgress
from medsam_engine.pipeline.cli.common import (
    EXIT_CASES_FAILED,
    EXIT_OK,
    EXIT_USAGE,
    marks_lines,
    pacs_filters,
    print_outcomes,
    push_line,
)
from medsam_engine.pipeline.core.environment import engine_defaults
from medsam_engine.pipeline.core.errors import CaseError
from medsam_engine.pipeline.distributed.ray_pool import PoolOptions
from medsam_engine.pipeline.io.discover import FROM_PACS
from medsam_engine.pipeline.store.case_store import CaseStore
from medsam_engine.pipeline.store.records import write_request


def _without_traceback(record: logging.LogRecord) -> bool:
    """A flow or task run's log record without its traceback (which may name input files); kept itself."""
    record.exc_info, record.exc_text = None, None
    return True


def _quiet_defaults() -> None:
    """A temporary Prefect server needs time to start on a small machine; its telemetry can lock its
    database; a medical pipeline sends no usage data unless asked to (the environment can override each; the
    values are the environment table's, pipeline/core/environment.py)."""
    for name, value in engine_defaults().items():
        os.environ.setdefault(name, value)


def _flow_options(args, config, command: str):
    """RunOptions, PoolOptions and RunPolicy of parsed run arguments, or None after printing why not."""
    from pydantic import ValidationError

    from medsam_engine.flows.annotate import RunOptions, RunPolicy

    try:
        run = RunOptions(
            config=config,
            overwrite=getattr(args, "overwrite", False),
            keep_localizers=getattr(args, "keep_localizers", False),
            keep_derived=getattr(args, "keep_derived", False),
            pacs_query=pacs_filters(args.pacs_query),
            push_seg=args.push_seg,
            marks=[m if m.lower() in MARKS_FROM_PACS else _absolute(m) for m in getattr(args, "marks", [])],
        )
        pool = PoolOptions(
            address=args.ray_address,
            actors=args.actors,
            cpus_per_actor=args.cpus_per_actor,
            gpus_per_actor=args.gpus_per_actor,
        )
        policy = RunPolicy(
            max_failure_fraction=args.max_failure_fraction,
            retry_quarantined=args.retry_quarantined,
            shards=args.shards,
        )
    except (ValidationError, ValueError) as exc:
        print(f"medsam-engine {command}: {exc}", file=sys.stderr)
        return None
    return run, pool, policy


def _reason_in(store_url: str):
    """A failed case's reason from the store's error records (outcomes that crossed Ray carry none)."""

    def reason_of(case_id: str) -> str:
        return (CaseStore(store_url).errors().get(case_id) or {}).get("reason", "")

    return reason_of


def _live(args, store_url: str) -> RunProgress:
    """The live report of a flow run started by this command (flows/progress.py reports to it)."""
    return RunProgress(
        None, verbose=args.verbose > 0, every_s=0 if args.quiet else None, reason_of=_reason_in(store_url)
    )


def _print_report(report: dict, store_url: str, live: RunProgress | None = None) -> int:
    """The run's report as a local run prints it (reasons from the store), the SEG push; the exit code of
    the annotate contract."""
    reasons = {case_id: error.get("reason", "") for case_id, error in CaseStore(store_url).errors().items()}
    failed = print_outcomes(report["cases"], reasons, store_url, live=live)
    push = report.get("push")
    if push:
        print(push_line(push))
    return EXIT_CASES_FAILED if failed or (push or {}).get("failed") else EXIT_OK


def _absolute(given: str) -> str:
    """A path given on the command line as an absolute path; a URL or from-pacs as it is."""
    return given if "://" in given or given == FROM_PACS else str(Path(given).resolve())


def _request(store: str, args, run) -> str:
    """Keep the inputs, coarse masks and run options in the store (absolute paths, so the flow finds them
    from any working directory); only the returned id becomes a flow-run parameter."""

    return write_request(
        CaseStore(store),
        {
            "inputs": [_absolute(i) for i in args.inputs],
            "coarse_masks": [_absolute(m) for m in args.coarse_mask],
            "run": run.model_dump(mode="json"),
        },
    )


def _run_flow(command: str, start) -> tuple[dict | None, dict | None, int]:
    """(the flow's result, None, 0); (None, the run's report, 1) when too many cases failed; (None, None,
    code) after printing why the run could not start: 2 for arguments that cannot work, 1 for inputs that
    cannot be listed (a PACS down or refusing the login)."""
    from medsam_engine.flows.annotate import TooManyFailures

    try:
        return start(), None, EXIT_OK
    except TooManyFailures as exc:
        print(f"medsam-engine {command}: {exc}", file=sys.stderr)
        return None, exc.report, EXIT_CASES_FAILED
    except CaseError as exc:
        print(f"medsam-engine {command}: {exc.reason}", file=sys.stderr)
        return None, None, EXIT_CASES_FAILED
    except ValueError as exc:
        print(f"medsam-engine {command}: {exc}", file=sys.stderr)
        return None, None, EXIT_USAGE


def _run_on_ray(args, config, command: str, call, live: RunProgress) -> tuple[dict | None, dict | None, int]:
    """Validate the run options and run ``call(run, pool, policy)`` (a flow) as :func:`_run_flow` does,
    its cases reported live on ``live``."""
    _quiet_defaults()
    options = _flow_options(args, config, command)
    if options is None:
        return None, None, EXIT_USAGE
    from medsam_engine.flows.progress import attach_console

    if args.verbose < 2:  # the run's failure is one line on the console; -vv keeps Prefect's tracebacks
        for name in ("prefect.flow_runs", "prefect.task_runs"):
            logging.getLogger(name).addFilter(_without_traceback)
    attach_console(live)
    try:
        with live:
            return _run_flow(command, lambda: call(*options))
    finally:
        attach_console(None)


def annotate_on_ray(args, config) -> int:
    """Run the annotate flow for parsed ``annotate`` arguments and a validated EngineConfig; print
    outcomes."""

    def call(run, pool, policy):
        from medsam_engine.flows.annotate import annotate_archive

        return annotate_archive(
            store=args.store, request=_request(args.store, args, run), pool=pool, policy=policy
        )

    live = _live(args, args.store)
    report, failed, code = _run_on_ray(args, config, "annotate", call, live)
    report = report or failed
    return code if report is None else _print_report(report, args.store, live)


def round_on_ray(args, config) -> int:
    """`round run --engine ray`: the flywheel-round flow (flows/round.py) for parsed arguments."""

    def call(run, pool, policy):
        from medsam_engine.flows.round import flywheel_round

        return flywheel_round(
            store=args.store,
            request=_request(args.store, args, run),
            pool=pool,
            policy=policy,
            checkpoint=args.checkpoint,
            review_out=args.review_out,
        )

    live = _live(args, args.store)
    result, failed, code = _run_on_ray(args, config, "round run", call, live)
    report = result["run"] if result else failed
    if report is None:
        return code
    code = _print_report(report, args.store, live)
    if result is not None:
        print(
            f"round {result['round']}: {json.dumps(result['cases'])}; routing {json.dumps(result['routing'])}"
        )
        if "marks" in result:
            print("\n".join(marks_lines(result["marks"])))
            code = EXIT_CASES_FAILED if result["marks"]["failed"] else code
        print(f"review queue: {result['queue']['cases']} case(s) -> {result['queue']['folder']}")
        print(f"round report: {result['report_path']}")
    return code
