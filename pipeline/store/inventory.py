"""What a store holds, read from its records and case attributes (never a case's arrays): every case it
knows with its status, the counts by status, and the disk each kind of content takes
(`medsam-engine store info` and `store cases`).

A case's status is one of:

* ``committed``    its group is committed (an error record left by a later failed run shows as its error);
* ``quarantined``  it failed for a lasting reason and runs skip it (STORE/_quarantine/);
* ``failed``       it failed and the next run tries it again (STORE/_errors/).

A case is *in progress* while a run holds its live lease (STORE/_leases/), whatever its status.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from medsam_engine.pipeline.store.case_store import CASE_SUFFIX, CaseStore
from medsam_engine.pipeline.store.leases import LEASES, holder
from medsam_engine.pipeline.store.records import QUARANTINE, list_records, read_record

COMMITTED, FAILED, QUARANTINED = "committed", "failed", "quarantined"
UNROUTED = "unrouted"  # the review state of a committed case that was never routed nor reviewed
# what each kind of top-level entry holds; every other "_" entry is a record folder or file
DISK_KINDS = ("case groups", "previous versions", "staging", "caches", "review queues", "records", "other")
_FOLDER_KINDS = {
    "_previous": "previous versions",
    "_staging": "staging",
    "_cache": "caches",
    "_review": "review queues",
}


@dataclass(frozen=True)
class CaseEntry:
    """One case the store knows: ``given`` is its input as the user gave it ('' when the store never
    recorded it), ``round`` and ``review_status`` those of its committed version (None when it has none),
    ``error`` its open failure as ``stage: reason`` ('' when none)."""

    case_id: str
    given: str
    status: str
    round: int | None
    review_status: str | None
    error: str


@dataclass(frozen=True)
class StoreCounts:
    """Cases by status (each counted once), cases in progress (live leases) and committed cases by review
    state (``unrouted`` for those never routed nor reviewed)."""

    committed: int
    failed: int
    quarantined: int
    in_progress: int
    review: dict[str, int]


def input_given(store: CaseStore, case_id: str) -> str:
    """The case's input as the user gave it: the manifest's ``given``, else (manifests written before it was
    recorded) its ``image``; '' without a manifest."""
    manifest = store.manifest(case_id) or {}
    return str(manifest.get("given") or manifest.get("image") or "")


def case_entries(store: CaseStore, *, failing_only: bool = False) -> list[CaseEntry]:
    """Every case the store knows (committed, failed or quarantined), sorted by id; ``failing_only`` keeps
    the failed and quarantined ones."""
    errors = store.errors()
    held = {name[: -len(".json")] for name in list_records(store, QUARANTINE)}
    attributes = {} if failing_only else store.all_attributes()
    entries = []
    for case_id in sorted(set(attributes) | set(errors) | held):
        attrs = attributes.get(case_id)
        if attrs is None and failing_only and store.case_attrs(case_id) is not None:
            continue  # committed since: its failure record is history
        error = errors.get(case_id) or read_record(store, QUARANTINE, f"{case_id}.json") or {}
        reason = f"{error.get('stage', '?')}: {error.get('reason', 'quarantined')}" if error else ""
        status = COMMITTED if attrs is not None else QUARANTINED if case_id in held else FAILED
        entries.append(
            CaseEntry(
                case_id=case_id,
                given=input_given(store, case_id),
                status=status,
                round=None if attrs is None else attrs.round,
                review_status=None if attrs is None else attrs.review_status,
                error=reason,
            )
        )
    return entries


def store_counts(store: CaseStore, entries: list[CaseEntry]) -> StoreCounts:
    """The counts of :class:`StoreCounts` from the store's ``entries`` (:func:`case_entries`) and leases."""
    statuses = Counter(entry.status for entry in entries)
    review = Counter(entry.review_status or UNROUTED for entry in entries if entry.status == COMMITTED)
    leases = [name[: -len(".json")] for name in list_records(store, LEASES)]
    return StoreCounts(
        committed=statuses[COMMITTED],
        failed=statuses[FAILED],
        quarantined=statuses[QUARANTINED],
        in_progress=sum(holder(store, case_id) is not None for case_id in leases),
        review=dict(sorted(review.items())),
    )


def disk_use(store: CaseStore) -> dict[str, int]:
    """Bytes per kind of content (:data:`DISK_KINDS`), from the store's top-level entries. A remote store's
    caches are on the machines that read it, not in the store."""
    sizes = dict.fromkeys(DISK_KINDS, 0)
    for name in store.list_names(store.root):
        sizes[_kind_of(name)] += stored_size(store, store.root / name)
    return sizes


def _kind_of(name: str) -> str:
    if name.endswith(CASE_SUFFIX):
        return "case groups"
    if name in _FOLDER_KINDS:
        return _FOLDER_KINDS[name]
    return "records" if name.startswith("_") else "other"


def stored_size(store: CaseStore, path: Path | PurePosixPath) -> int:
    """Bytes of the files at or under ``path`` (0 when it went away meanwhile)."""
    try:
        return int(store.fs.du(str(path), total=True))
    except FileNotFoundError:
        return 0
