"""`medsam-engine store info|cases|clean`: what a store holds, and what it no longer needs.

``info``: cases by status (committed, failed, quarantined; in progress: live leases), committed cases by
review state, the flywheel's rounds, the registered models and the current one, and the disk each kind of
content takes. ``cases``: one line per case the store knows (id, input as given, status, round, review state,
open failure). Both print JSON with ``--json``, and change nothing.

``clean``: what the store no longer needs, per kind with its entries and bytes: the cache's download and
archive entries no live run uses (pipeline/io/cache.py), staging folders of writers that are gone, previous
versions beyond their case's retention, leases of runs that are gone, run requests older than some days
(pipeline/store/cleanup.py) and, with ``--graphs``, compiled model graphs of other runtime versions or of
models not in use (pipeline/model/graph_cache.py). A dry run by default; ``--yes`` removes what it lists.
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict
from pathlib import Path

from medsam_engine.pipeline.cli.common import EXIT_OK, EXIT_USAGE, add_command, add_store_argument
from medsam_engine.pipeline.core.disk import remove_path
from medsam_engine.pipeline.core.types import Leftover
from medsam_engine.pipeline.flywheel.registry import current_model, registered_models
from medsam_engine.pipeline.flywheel.rounds import round_rows
from medsam_engine.pipeline.io.cache import (
    ARCHIVE_CACHES,
    DOWNLOAD_CACHES,
    STALE_PINS,
    cache_leftovers,
    remove_cache_leftovers,
)
from medsam_engine.pipeline.model.checkpoint import LITE_MEDSAM_SHA256
from medsam_engine.pipeline.model.graph_cache import GRAPH_LEFTOVERS, graph_leftovers
from medsam_engine.pipeline.store.case_store import CaseStore
from medsam_engine.pipeline.store.cleanup import (
    DEFAULT_REQUEST_DAYS,
    LEASE_LEFTOVERS,
    PREVIOUS_LEFTOVERS,
    REQUEST_LEFTOVERS,
    STAGING_LEFTOVERS,
    remove_store_leftovers,
    store_leftovers,
)
from medsam_engine.pipeline.store.inventory import CaseEntry, case_entries, disk_use, store_counts
from medsam_engine.pipeline.store.records import current_round

UNITS = ("B", "KiB", "MiB", "GiB", "TiB", "PiB")
CACHE_KINDS = (DOWNLOAD_CACHES, ARCHIVE_CACHES, STALE_PINS)
STORE_KINDS = (STAGING_LEFTOVERS, PREVIOUS_LEFTOVERS, LEASE_LEFTOVERS, REQUEST_LEFTOVERS)


def add_parsers(sub) -> None:
    """`store info`, `store cases` and `store clean`."""
    group = add_command(sub, "store", "what a store holds: counts, rounds, models, disk use, cases")
    actions = group.add_subparsers(dest="store_command", required=True, metavar="ACTION")
    info = add_command(actions, "info", "cases by status and review state, rounds, models, disk use")
    add_store_argument(info, "the store (a folder or an s3:// URL)")
    info.add_argument("--json", action="store_true", help="print JSON instead of lines")
    cases = add_command(actions, "cases", "one line per case: id, input, status, round, review, last error")
    add_store_argument(cases, "the store (a folder or an s3:// URL)")
    cases.add_argument("--failed", action="store_true", help="only the failed and quarantined cases")
    cases.add_argument("--json", action="store_true", help="print a JSON list of objects")
    clean = add_command(
        actions,
        "clean",
        "list what the store no longer needs (caches, leftovers, old versions); --yes: remove",
    )
    add_store_argument(clean, "the store (a folder or an s3:// URL)")
    clean.add_argument("--yes", action="store_true", help="remove what is listed (default: a dry run)")
    clean.add_argument(
        "--graphs",
        action="store_true",
        help="also compiled model graphs ($MEDSAM_ENGINE_CACHE or ~/.cache/medsam-engine) of other runtime "
        "versions or of models this store does not use",
    )
    clean.add_argument(
        "--keep-versions",
        type=int,
        default=None,
        metavar="N",
        help="previous versions to keep per case (default: each case's store.keep_versions, else 3)",
    )
    clean.add_argument(
        "--requests-older-than",
        type=float,
        default=DEFAULT_REQUEST_DAYS,
        metavar="DAYS",
        help=f"list run requests (STORE/_requests) older than this (default {DEFAULT_REQUEST_DAYS:g})",
    )
    clean.add_argument("--json", action="store_true", help="print JSON instead of lines")


def store_command(args) -> int:
    store = CaseStore(args.store)
    if args.store_command == "clean":
        return clean_command(args, store)
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


def clean_command(args, store: CaseStore) -> int:
    """`store clean`: list the leftovers per kind and, with ``--yes``, remove them; exit 0 (2 for a negative
    count)."""
    if (args.keep_versions is not None and args.keep_versions < 0) or args.requests_older_than < 0:
        print(
            "medsam-engine store clean: --keep-versions and --requests-older-than take >= 0", file=sys.stderr
        )
        return EXIT_USAGE
    found = leftovers(
        store, graphs=args.graphs, keep_versions=args.keep_versions, request_days=args.requests_older_than
    )
    removed = remove_leftovers(store, found) if args.yes else []
    if args.json:
        report = {"store": store.url, "removed": bool(args.yes), "kinds": kind_totals(found, args.graphs)}
        report["entries"] = [asdict(item) for item in found]
        report["left"] = [asdict(item) for item in found if args.yes and item not in removed]
        print(json.dumps(report, indent=1))
    else:
        print("\n".join(clean_lines(store, found, removed if args.yes else None, graphs=args.graphs)))
    return EXIT_OK


def leftovers(
    store: CaseStore, *, graphs: bool, keep_versions: int | None, request_days: float
) -> list[Leftover]:
    """What `store clean` lists: the cache's entries, the store's own leftovers and (``graphs``) model
    graphs."""
    found = cache_leftovers(store.cache_dir())
    found += store_leftovers(store, keep_versions=keep_versions, request_days=request_days)
    if graphs:
        found += graph_leftovers(models_in_use(store))
    return found


def models_in_use(store: CaseStore) -> set[str]:
    """The checkpoints (sha256) whose graphs `store clean --graphs` keeps: the bundled LiteMedSAM, every model
    registered in the store and every model one of its committed cases was made with."""
    models = {LITE_MEDSAM_SHA256} | {str(e["sha256"]) for e in registered_models(store) if e.get("sha256")}
    for attrs in store.all_attributes().values():
        if attrs.signature.get("model_sha256"):
            models.add(str(attrs.signature["model_sha256"]))
    return models


def remove_leftovers(store: CaseStore, found: list[Leftover]) -> list[Leftover]:
    """Remove what :func:`leftovers` listed, each through the module that knows its kind (which checks again
    that no live run uses it); returns what was removed."""
    removed = remove_cache_leftovers(store.cache_dir(), [i for i in found if i.kind in CACHE_KINDS])
    removed += remove_store_leftovers(store, [i for i in found if i.kind in STORE_KINDS])
    for item in found:
        if item.kind == GRAPH_LEFTOVERS:
            remove_path(item.path)
            removed.append(item)
    return removed


def kind_totals(found: list[Leftover], graphs: bool) -> dict[str, dict[str, int]]:
    """Entries and bytes per kind, every kind listed (model graphs with ``graphs``)."""
    kinds = [*CACHE_KINDS[:2], *STORE_KINDS, STALE_PINS, *([GRAPH_LEFTOVERS] if graphs else [])]
    return {
        kind: {
            "entries": sum(item.kind == kind for item in found),
            "bytes": sum(item.size for item in found if item.kind == kind),
        }
        for kind in kinds
    }


def clean_lines(
    store: CaseStore, found: list[Leftover], removed: list[Leftover] | None, *, graphs: bool
) -> list[str]:
    """`store clean` as lines: per kind its entries and bytes, then each entry (its path, relative to the
    store when inside it; its size; why), then the total (``removed`` None: a dry run)."""
    root = str(store.root).rstrip("/") + "/"
    where = store.url if "://" in store.url else str(Path(store.url).resolve())
    lines = [f"store: {where}" + ("" if removed is not None else " (dry run: nothing is removed)")]
    for kind, total in kind_totals(found, graphs).items():
        count = total["entries"]
        entries = f"{count} {'entry' if count == 1 else 'entries'}"
        lines.append(f"{kind + ':':20s}{entries}, {human_size(total['bytes'])}")
        for item in (i for i in found if i.kind == kind):
            shown = item.path[len(root) :] if item.path.startswith(root) else item.path
            lines.append(f"  {shown}  {human_size(item.size)}  {item.reason}")
    size = human_size(sum(item.size for item in found))
    if removed is None:
        lines.append(f"would remove {len(found)} entries, {size}; run again with --yes to remove them")
        return lines
    lines.append(f"removed {len(removed)} entries, {human_size(sum(item.size for item in removed))}")
    if len(removed) < len(found):
        lines.append(f"left {len(found) - len(removed)} entries a live run took up meanwhile")
    return lines
