"""The run's summary: per-case outcome rows with each label's volume (mL) read back from the store.

Label volumes are counted with dask.array over the committed zarr label maps: one graph over every slice
chunk of every case, reduced by ``da.unique(..., return_counts=True)`` on threads, so no volume is ever held
whole and chunk decompression runs in parallel. No Prefect and no Ray in this module.
"""

from __future__ import annotations

import math

from medsam_engine.pipeline.store.case_store import LABELS_PATH, CaseStore

MAX_TABLE_ROWS = 500  # the artifact lists failures first, then the rest up to this many rows


def label_volumes_ml(store: CaseStore, case_ids: list[str]) -> dict[str, dict[int, float]]:
    """Per committed case: label value -> volume in mL (voxels x voxel volume); cases not committed are left
    out."""
    import dask
    import dask.array as da

    lazy, voxel_ml = {}, {}
    for case_id in case_ids:
        try:
            group = store.open_case(case_id)
        except KeyError:
            continue
        labels = group[f"{LABELS_PATH}/0"]
        lazy[case_id] = da.unique(da.from_zarr(labels), return_counts=True)
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


def table_rows(outcomes: list[dict], volumes: dict[str, dict[int, float]]) -> list[dict]:
    """Rows for the summary artifact: failures first, then done, then skipped; at most MAX_TABLE_ROWS."""
    order = {"failed": 0, "done": 1, "skipped": 2, "quarantined": 3}
    rows = []
    for o in sorted(outcomes, key=lambda o: (order.get(o["status"], 9), o["case_id"]))[:MAX_TABLE_ROWS]:
        labels = volumes.get(o["case_id"], {})
        rows.append(
            {
                "case": o["case_id"],
                "status": o["status"],
                "stage": o.get("stage", ""),
                "slices": o.get("slices", 0),
                "seconds": o.get("seconds", 0.0),
                "labels (mL)": ", ".join(f"{k}: {v:g}" for k, v in sorted(labels.items())),
                "node": o.get("node", ""),
            }
        )
    return rows


def counts(outcomes: list[dict]) -> dict[str, int]:
    return {
        status: sum(o["status"] == status for o in outcomes)
        for status in ("done", "skipped", "quarantined", "failed")
    }
