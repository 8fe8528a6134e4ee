"""The run's summary table: per-case outcome rows with each label's volume (mL) from the run record
(pipeline/annotate/run_record.py). No Prefect and no Ray in this module.
"""

from __future__ import annotations

MAX_TABLE_ROWS = 500  # the artifact lists failures first, then the rest up to this many rows


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
