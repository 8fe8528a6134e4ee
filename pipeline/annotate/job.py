"""The annotate job: cases -> :func:`~pipeline.annotate.driver.run_case` each -> a run record.

Per-case failures are recorded in the store and the batch goes on; a committed case with the same signature
is skipped without loading the model.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, field

from tqdm.auto import tqdm

from pipeline.annotate.config import EngineConfig
from pipeline.annotate.driver import run_case
from pipeline.annotate.lazy_runner import LazyRunner
from pipeline.annotate.policy import LOCAL, FailurePolicy
from pipeline.core.outcome import CaseOutcome
from pipeline.core.provenance import package_version, version_id
from pipeline.core.types import CaseRef
from pipeline.store.case_store import CaseStore, remove_stale_staging


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


def annotate(cases: list[CaseRef], store: CaseStore, config: EngineConfig, *, overwrite: bool = False,
             runner: LazyRunner | None = None, show_progress: bool | None = None,
             policy: FailurePolicy = LOCAL) -> RunSummary:
    """Run every case in this process; failures are recorded per case and never stop the batch."""
    runner = runner or LazyRunner(config)
    remove_stale_staging(store)
    summary = RunSummary(run_id=version_id())
    show = sys.stderr.isatty() if show_progress is None else show_progress
    try:
        with tqdm(total=len(cases), desc="cases", unit="case", disable=not show) as bar, \
                tqdm(desc="slices", unit="slice", disable=not show, leave=False) as slices:
            for case in cases:
                summary.outcomes.append(run_case(case, store, config, runner, run_id=summary.run_id,
                                                 policy=policy, overwrite=overwrite,
                                                 progress=slices if show else None))
                bar.update(1)
    finally:
        runner.settle()
    summary.runner_stats = runner.stats()
    store.write_run(summary.run_id, {
        "run_id": summary.run_id, "package_version": package_version(), "config": config.model_dump(mode="json"),
        "cases": [o.record() for o in summary.outcomes], "runner": summary.runner_stats})
    return summary
