"""The record of an annotate run, the same whichever engine ran it: ``STORE/_runs/<run_id>.json``.

Keys: ``run_id``, ``engine`` (``local`` or ``ray``), ``package_version``, ``config`` (the engine
configuration as JSON), ``counts`` (cases per status), ``failure_fraction`` (failed among those tried),
``slices``, ``wall_s``, ``cases`` (one outcome record per case: id, status, failing stage, slices, seconds,
node; never a file name), ``runner`` (the model's counters; {} when the model was never loaded),
``label_volumes_ml`` (per committed case: label value -> mL; pipeline/store/volumes.py), then what the
engine adds about itself (the Ray engine: actors, shards, broken shards, accepted cases kept).
"""

from __future__ import annotations

from typing import Any

from medsam_engine.pipeline.core.provenance import package_version
from medsam_engine.pipeline.store.case_store import CaseStore
from medsam_engine.pipeline.store.volumes import label_volumes_ml

STATUSES = ("done", "skipped", "quarantined", "failed")
RECORD_KEYS = (
    "run_id",
    "engine",
    "package_version",
    "config",
    "counts",
    "failure_fraction",
    "slices",
    "wall_s",
    "cases",
    "runner",
    "label_volumes_ml",
)


def count_statuses(outcomes: list[dict[str, Any]]) -> dict[str, int]:
    """Cases per status, every status present (0 when none)."""
    return {status: sum(o["status"] == status for o in outcomes) for status in STATUSES}


def run_record(
    run_id: str,
    outcomes: list[dict[str, Any]],
    config: dict[str, Any],
    *,
    engine: str,
    wall_s: float,
    store: CaseStore,
    runner: dict[str, Any] | None = None,
    **facts: Any,
) -> dict[str, Any]:
    """The run's record (see the module doc); reads the committed cases' label volumes from ``store``."""
    counts = count_statuses(outcomes)
    tried = counts["done"] + counts["failed"]
    done = [o["case_id"] for o in outcomes if o["status"] == "done"]
    return {
        "run_id": run_id,
        "engine": engine,
        "package_version": package_version(),
        "config": config,
        "counts": counts,
        "failure_fraction": round(counts["failed"] / tried, 4) if tried else 0.0,
        "slices": sum(int(o.get("slices", 0)) for o in outcomes),
        "wall_s": round(wall_s, 2),
        "cases": outcomes,
        "runner": runner or {},
        "label_volumes_ml": label_volumes_ml(store, done) if done else {},
        **facts,
    }
