"""What `medsam-engine store clean` finds in a store's own folders, and its removal:

* ``staging``: folders under ``_staging/`` left by killed writers (pipeline/store/case_store.py);
* ``previous versions``: versions under ``_previous/`` beyond the retention of their case
  (pipeline/store/versions.py), of committed cases only (the earlier version of a case whose overwrite was
  killed may be its only copy);
* ``stale leases``: leases under ``_leases/`` whose run is gone (a process of this machine that no longer
  exists, or another machine's run that let its lease expire), and takeover guards left by killed processes;
* ``old run requests``: requests under ``_requests/`` older than a number of days (a flow reads its request
  when it starts).

Never a committed case, an error or quarantine record, nor the lease or staging folder of a live writer:
liveness is judged as pipeline/store/leases.py judges it, and again right before a lease is removed.
"""

from __future__ import annotations

import calendar
import contextlib
import time
from pathlib import Path

from medsam_engine.pipeline.core.processes import HOST, process_alive
from medsam_engine.pipeline.core.types import Leftover
from medsam_engine.pipeline.store.case_store import CaseStore, stale_staging
from medsam_engine.pipeline.store.inventory import stored_size
from medsam_engine.pipeline.store.leases import GUARD_STALE_S, LEASES, read_lease
from medsam_engine.pipeline.store.records import REQUESTS, list_records, read_record
from medsam_engine.pipeline.store.versions import (
    PREVIOUS,
    retained,
    retention,
    version_folder,
    versions_beyond,
)

STAGING_LEFTOVERS, PREVIOUS_LEFTOVERS = "staging", "previous versions"
LEASE_LEFTOVERS, REQUEST_LEFTOVERS = "stale leases", "old run requests"
DEFAULT_REQUEST_DAYS = 30.0


def staging_leftovers(store: CaseStore) -> list[Leftover]:
    """Staging folders of writers that are gone (local stores)."""
    return [
        Leftover(STAGING_LEFTOVERS, str(path), stored_size(store, path), "its writer is gone")
        for path in stale_staging(store)
    ]


def previous_leftovers(store: CaseStore, *, keep_versions: int | None = None) -> list[Leftover]:
    """Previous versions of committed cases beyond ``keep_versions`` (default: each case's own retention,
    ``store.keep_versions`` of the configuration it was committed with)."""
    found = []
    for case_id in store.list_names(store.root / PREVIOUS):
        attrs = store.case_attrs(case_id)
        if case_id.startswith(".") or attrs is None:
            continue
        keep = retention(attrs) if keep_versions is None else keep_versions
        kept = retained(list(attrs.get("previous_versions") or []), keep)
        for name in versions_beyond(store, case_id, kept):
            path = version_folder(store, case_id, name)
            why = f"beyond the newest {keep} of its case" if keep else "its case keeps no earlier version"
            found.append(Leftover(PREVIOUS_LEFTOVERS, str(path), stored_size(store, path), why))
    return found


def dead_lease(record: dict[str, object]) -> str | None:
    """Why a lease record was left by a run that is gone, or None while its run may be alive: a process of
    this machine that no longer exists, or another machine's run whose lease expired (a live run renews it
    every third of its TTL). A live process of this machine keeps its lease, even an expired one."""
    pid = record.get("pid")
    if record.get("host") == HOST:
        gone = isinstance(pid, int) and not process_alive(pid)
        return "its run, a process of this machine, is gone" if gone else None
    expires = record.get("expires_at", 0)
    if float(expires if isinstance(expires, (int, float, str)) else 0) < time.time():
        return "expired: its run stopped renewing it"
    return None


def lease_leftovers(store: CaseStore) -> list[Leftover]:
    """Leases of runs that are gone (:func:`dead_lease`) and takeover guards older than a killed takeover
    leaves them."""
    found = []
    for name in list_records(store, LEASES):
        record, _ = read_lease(store, name[: -len(".json")])
        why = None if record is None else dead_lease(record)
        if why is not None:
            path = store.root / LEASES / name
            found.append(Leftover(LEASE_LEFTOVERS, str(path), stored_size(store, path), why))
    folder = Path(store.root) / LEASES
    if store.is_local and folder.is_dir():
        for path in sorted(folder.glob(".*.takeover")):
            with contextlib.suppress(FileNotFoundError):
                if time.time() - path.stat().st_mtime > GUARD_STALE_S:
                    found.append(Leftover(LEASE_LEFTOVERS, str(path), 0, "takeover guard of a killed run"))
    return found


def request_leftovers(store: CaseStore, *, older_than_days: float = DEFAULT_REQUEST_DAYS) -> list[Leftover]:
    """Run requests written more than ``older_than_days`` days ago."""
    found = []
    for name in list_records(store, REQUESTS):
        written = str((read_record(store, REQUESTS, name) or {}).get("written_at") or "")
        try:
            age_days = (time.time() - calendar.timegm(time.strptime(written, "%Y-%m-%dT%H:%M:%SZ"))) / 86400
        except ValueError:
            continue  # not a request this engine wrote
        if age_days > older_than_days:
            path = store.root / REQUESTS / name
            why = f"written {age_days:.0f} days ago"
            found.append(Leftover(REQUEST_LEFTOVERS, str(path), stored_size(store, path), why))
    return found


def store_leftovers(
    store: CaseStore, *, keep_versions: int | None = None, request_days: float = DEFAULT_REQUEST_DAYS
) -> list[Leftover]:
    """Everything of the four kinds above, in that order."""
    return [
        *staging_leftovers(store),
        *previous_leftovers(store, keep_versions=keep_versions),
        *lease_leftovers(store),
        *request_leftovers(store, older_than_days=request_days),
    ]


def remove_store_leftovers(store: CaseStore, leftovers: list[Leftover]) -> list[Leftover]:
    """Remove what :func:`store_leftovers` listed; a lease only when its record still says its run is gone
    (another run may have taken the case since). Returns what was removed."""
    removed = []
    for item in leftovers:
        if item.kind == LEASE_LEFTOVERS and item.path.endswith(".json"):
            record, _ = read_lease(store, Path(item.path).name[: -len(".json")])
            if record is None or dead_lease(record) is None:
                continue
        with contextlib.suppress(FileNotFoundError):
            store.fs.rm(item.path, recursive=True)
        removed.append(item)
    return removed
