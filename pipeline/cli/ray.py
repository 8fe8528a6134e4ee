"""`medsam-engine annotate ... --engine ray`: the same job as the local engine, run as the Prefect flow.

Without $PREFECT_API_URL Prefect starts a temporary server for the run; without --ray-address/$RAY_ADDRESS a
local Ray is started. Output and exit codes follow the annotate contract (0 all done, 1 some cases failed,
2 bad usage).
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

from pipeline.distributed.ray_pool import PoolOptions
from pipeline.store.case_store import CaseStore

EXIT_OK, EXIT_CASES_FAILED, EXIT_USAGE = 0, 1, 2


def _quiet_defaults() -> None:
    """A temporary Prefect server needs time to start on a small machine; its telemetry can lock its
    database; a medical pipeline sends no usage data unless asked to (the environment can override each)."""
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("DO_NOT_TRACK", "1")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


def annotate_on_ray(args, config) -> int:
    """Run the flow for parsed ``annotate`` arguments and a validated EngineConfig; print outcomes."""
    _quiet_defaults()
    from pydantic import ValidationError

    from flows.annotate import FailurePolicy, RunOptions, TooManyFailures, annotate_archive

    try:
        run = RunOptions(config=config, overwrite=args.overwrite, keep_localizers=args.keep_localizers,
                         keep_derived=args.keep_derived)
        pool = PoolOptions(address=args.ray_address, actors=args.actors, cpus_per_actor=args.cpus_per_actor,
                           gpus_per_actor=args.gpus_per_actor)
        policy = FailurePolicy(max_failure_fraction=args.max_failure_fraction,
                               retry_quarantined=args.retry_quarantined, shards=args.shards)
    except ValidationError as exc:
        print(f"medsam-engine annotate: {exc}", file=sys.stderr)
        return EXIT_USAGE
    try:
        report = annotate_archive(inputs=list(args.inputs), out=args.out, coarse_masks=list(args.coarse_mask),
                                  run=run, pool=pool, policy=policy)
    except TooManyFailures as exc:
        report = exc.report
        print(f"medsam-engine annotate: {exc}", file=sys.stderr)
    except ValueError as exc:
        print(f"medsam-engine annotate: {exc}", file=sys.stderr)
        return EXIT_USAGE
    reasons = CaseStore(args.out).errors()
    for case in report["cases"]:
        line = f"{case['status']:8s} {case['case_id']}"
        if case["status"] in ("failed", "quarantined"):
            line += f"  {reasons.get(case['case_id'], {}).get('reason', case['stage'])}"
        print(line)
    counts = report["counts"]
    print(f"{counts['done']} done, {counts['skipped']} skipped, {counts['quarantined']} quarantined, "
          f"{counts['failed']} failed -> {Path(args.out).resolve()}")
    return EXIT_CASES_FAILED if counts["failed"] or counts["quarantined"] else EXIT_OK
