"""The record of an annotate run, the same whichever engine ran it: ``STORE/_runs/<run_id>.json``.

Keys: ``run_id``, ``engine`` (``local`` or ``ray``), ``package_version``, ``config`` (the engine
configuration as JSON), ``counts`` (cases per status), ``failure_fraction`` (failed among those tried),
``slices``, ``wall_s``, ``cases`` (one outcome record per case: id, status, failing stage, slices, seconds,
node; never a file name), ``runner`` (the model's counters; {} when the model was never loaded),
``label_volumes_ml`` (per committed case: label value -> mL), then what the engine adds about itself (the
Ray engine: actors, shards, broken shards, accepted cases kept).
"""

from __future__ import annotations

import math
from typing import Any

from medsam_engine.pipeline.core.provenance import package_version
from medsam_engine.pipeline.store.case_store import LABELS_PATH, CaseStore

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


def label_volumes_ml(store: CaseStore, case_ids: list[str]) -> dict[str, dict[int, float]]:
    """Per committed case: label value -> volume in mL (voxels x voxel volume); cases not committed are left
    out. One dask graph over every slice chunk of every case, reduced by ``da.unique`` with counts on
    threads, so no label map is held whole and chunks decompress in parallel."""
    import dask
    import dask.array as da

    lazy, voxel_ml = {}, {}
    for case_id in case_ids:
        try:
            group = store.open_case(case_id)
        except KeyError:
            continue
        lazy[case_id] = da.unique(da.from_zarr(group[f"{LABELS_PATH}/0"]), return_counts=True)
        spacing = group.attrs["medsam"]["geometry"]["spacing_zyx_mm"]
        voxel_ml[case_id] = math.prod(float(s) for s in spacing) / 1000.0
    (counted,) = dask.compute(lazy, scheduler="threads")
    return {
        case_id: {
            int(v): round(int(n) * voxel_ml[case_id], 3)
            for v, n in zip(*counted[case_id], strict=True)
            if v != 0
        }
        for case_id in counted
    }


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
