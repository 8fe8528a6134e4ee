"""`medsam-engine store info|cases`: what a store holds, read without changing it.

``info``: cases by status (committed, failed, quarantined; in progress: live leases), committed cases by
review state, the flywheel's rounds, the registered models and the current one, and the disk each kind of
content takes. ``cases``: one line per case the store knows (id, input as given, status, round, review state,
open failure). Both print JSON with ``--json``.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

from medsam_engine.pipeline.cli.common import EXIT_OK, add_command, add_store_argument
from medsam_engine.pipeline.flywheel.registry import current_model, registered_models
from medsam_engine.pipeline.flywheel.rounds import round_rows
from medsam_engine.pipeline.store.case_store import CaseStore
from medsam_engine.pipeline.store.inventory import CaseEntry, case_entries, disk_use, store_counts
from medsam_engine.pipeline.store.records import current_round

UNITS = ("B", "KiB", "MiB", "GiB", "TiB", "PiB")


def add_parsers(sub) -> None:
    """`store info` and `store cases`."""
    group = add_command(sub, "store", "what a store holds: counts, rounds, models, disk use, cases")
    actions = group.add_subparsers(dest="store_command", required=True, metavar="ACTION")
    info = add_command(actions, "info", "cases by status and review state, rounds, models, disk use")
    add_store_argument(info, "the store (a folder or an s3:// URL)")
    info.add_argument("--json", action="store_true", help="print JSON instead of lines")
    cases = add_command(actions, "cases", "one line per case: id, input, status, round, review, last error")
    add_store_argument(cases, "the store (a folder or an s3:// URL)")
    cases.add_argument("--failed", action="store_true", help="only the failed and quarantined cases")
    cases.add_argument("--json", action="store_true", help="print a JSON list of objects")


def store_command(args) -> int:
    store = CaseStore(args.store)
    if args.store_command == "cases":
        entries = case_entries(store, failing_only=args.failed)
        print(json.dumps([asdict(e) for e in entries], indent=1) if args.json else case_table(entries))
        return EXIT_OK
    info = store_info(store)
    print(json.dumps(info, indent=1) if args.json else "\n".join(info_lines(info)))
    return EXIT_OK


def store_info(store: CaseStore) -> dict:
    """Everything `store info` reports, as JSON-ready values (sizes in bytes)."""
    counts = store_counts(store, case_entries(store))
    current = current_model(store)
    disk = disk_use(store)
    return {
        "store": store.url if "://" in store.url else str(Path(store.url).resolve()),
        "cases": {k: v for k, v in asdict(counts).items() if k != "review"},
        "review": counts.review,
        "rounds": {"current": current_round(store), "rounds": round_rows(store)},
        "models": {
            "registered": [
                {k: entry.get(k) for k in ("sha256", "created_at", "checkpoint")}
                for entry in registered_models(store)
            ],
            "current": None if current is None else current.get("sha256"),
        },
        "disk": disk,
        "disk_total": sum(disk.values()),
    }


def info_lines(info: dict) -> list[str]:
    """`store info` as lines of text (sizes in binary units)."""
    cases, models, rounds = info["cases"], info["models"], info["rounds"]
    current = models["current"]
    lines = [
        f"store: {info['store']}",
        f"cases: {cases['committed']} committed, {cases['failed']} failed, {cases['quarantined']} "
        f"quarantined, {cases['in_progress']} in progress",
        "review: "
        + (", ".join(f"{n} {state}" for state, n in info["review"].items()) or "no committed case"),
        f"rounds: {len(rounds['rounds'])} finished, current {rounds['current']}"
        if rounds["current"]
        else "rounds: none yet",
    ]
    lines += [
        f"  round {row['round']}: model {row['model'] or '-'}, {row['annotated']} annotated, "
        f"{row['queued']} queued, {row['reviewed']} reviewed"
        for row in rounds["rounds"]
    ]
    lines.append(
        f"models: {len(models['registered'])} registered; current: "
        + (str(current)[:12] if current else "the official LiteMedSAM weights")
    )
    sizes = ", ".join(f"{kind} {human_size(size)}" for kind, size in info["disk"].items() if size)
    lines.append(f"disk: {human_size(info['disk_total'])}" + (f" ({sizes})" if sizes else ""))
    return lines


def case_table(entries: list[CaseEntry]) -> str:
    """One line per case under a header, columns aligned: id, input, status, round, review state, error."""
    header = ("case", "input", "status", "round", "review", "last error")
    rows = [
        (
            e.case_id,
            e.given or "-",
            e.status,
            "-" if e.round is None else str(e.round),
            e.review_status or "-",
            e.error or "-",
        )
        for e in entries
    ]
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header) - 1)]
    return "\n".join(
        "  ".join([*(cell.ljust(width) for cell, width in zip(row, widths, strict=False)), row[-1]]).rstrip()
        for row in [header, *rows]
    )


def human_size(size: int) -> str:
    """Bytes in binary units: '512 B', '1.5 KiB', '12.0 MiB'."""
    value, unit = float(size), UNITS[0]
    for unit in UNITS:
        if value < 1024 or unit == UNITS[-1]:
            break
        value /= 1024
    return f"{int(value)} B" if unit == "B" else f"{value:.1f} {unit}"
