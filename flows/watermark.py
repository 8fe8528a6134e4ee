"""Watermarks: a nightly run takes only the studies that changed since the last successful run.

A study is an entry directly under an input folder (a study folder, an archive, an image file). Its change
time is the newest ``max(mtime, ctime)`` of the entry and everything under it: ``cp -a``/``rsync -a`` keep old
mtimes but set ctime, and adding a file to a series folder changes that folder, not the study folder.
Entries that changed within the last ``settle_s`` seconds may still be being copied; they wait for the next
run. The watermark lives in the store (STORE/_watermarks/<name>.json) and only moves after a successful run;
it stops before the oldest study whose cases failed transiently, so those are retried next time.
A DICOMweb service root is taken study by study (QIDO-RS, with the run's filters): a study is new when the
watermark has not seen it with its current number of instances (a series added to a study changes it), and
the record keeps a keyed hash of each study done, never its UID. When the prompts are the marks in the PACS,
only studies with PR or SR series count, and a study is new again when a mark (or an image) is added to it.
Other URL inputs (a study URL, s3://) have no change time here and are always taken. No Prefect in this
module.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from medsam_engine.pipeline.io.dicomweb import query_studies
from medsam_engine.pipeline.io.pacs_marks import studies_with_marks
from medsam_engine.pipeline.store.records import read_watermark, write_watermark

_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}$")


@dataclass(frozen=True)
class Entry:
    """A study: ``path`` and its change time (s since the epoch; +inf for URLs)."""

    path: str
    changed: float


def newest_change(path: Path) -> float:
    """The newest max(mtime, ctime) of ``path`` and everything under it (links are not followed)."""
    info = path.lstat()
    newest = max(info.st_mtime, info.st_ctime)
    if not path.is_dir() or path.is_symlink():
        return newest
    for root, folders, files in os.walk(path):
        for name in folders + files:
            try:
                info = os.lstat(os.path.join(root, name))
            except FileNotFoundError:  # removed while we walk
                continue
            newest = max(newest, info.st_mtime, info.st_ctime)
    return newest


def study_entries(inputs: Iterable[str]) -> list[Entry]:
    """The studies under ``inputs``: each visible entry of an input folder; a file or URL input is one."""
    entries = []
    for given in inputs:
        if "://" in given:
            entries.append(Entry(given, float("inf")))
            continue
        path = Path(given)
        children = (
            [path] if not path.is_dir() else sorted(p for p in path.iterdir() if not p.name.startswith("."))
        )
        entries += [Entry(str(child), newest_change(child)) for child in children if child.exists()]
    return entries


def select_new(entries: list[Entry], *, since: float | None, until: float) -> list[Entry]:
    """Entries that changed after ``since`` (all when None) and no later than ``until`` (URLs always)."""
    return [
        e
        for e in entries
        if e.changed == float("inf") or ((since is None or e.changed > since) and e.changed <= until)
    ]


def next_mark(until: float, retry: Iterable[Entry]) -> float:
    """The watermark after a successful run: ``until``, held back before the oldest entry to retry."""
    return min([until] + [e.changed - 1e-3 for e in retry if e.changed != float("inf")])


def pacs_studies(
    roots: Iterable[str], filters: dict[str, str], *, seen: dict[str, int], key, marks_only: bool = False
) -> dict:
    """The studies of the service ``roots`` (with ``marks_only``, those holding PR/SR marks) that ``seen``
    (keyed study -> instances) does not hold as they are now: {study URL: [keyed study, instances]}; ``key``
    is the store's keyed hash."""
    chosen = {}
    query = studies_with_marks if marks_only else query_studies
    for root in roots:
        base = root.rstrip("/")
        for uid, count in query(root, filters).items():
            study = key(f"pacs-study:{base}|{uid}")
            if count is None or seen.get(study) != count:
                chosen[f"{base}/studies/{uid}"] = [study, count]
    return chosen


def check_name(name: str) -> str:
    if not _NAME.match(name):
        raise ValueError(f"Argument 'watermark' must be lowercase letters, digits, '-' or '_'; got {name!r}")
    return name


def _record(store, name: str, model: str | None) -> dict | None:
    """The watermark's record, or None before its first run or when ``model`` is given and the watermark was
    set by a run with another model (everything is to be taken again)."""
    record = read_watermark(store, check_name(name))
    return None if record is None or (model is not None and record.get("model") != model) else record


def read_mark(store, name: str, *, model: str | None = None) -> float | None:
    """Where the watermark stands (seconds since the epoch), or None: take everything (see
    :func:`_record`)."""
    record = _record(store, name, model)
    return None if record is None else float(record["since"])


def read_seen(store, name: str, *, model: str | None = None) -> dict[str, int]:
    """The PACS studies the watermark has seen (keyed study -> instances); empty where read_mark is None."""
    return dict((_record(store, name, model) or {}).get("pacs") or {})


def write_mark(
    store,
    name: str,
    since: float,
    *,
    run_id: str,
    model: str | None = None,
    pacs: dict[str, int] | None = None,
) -> None:
    write_watermark(store, check_name(name), since, run_id=run_id, model=model, pacs=pacs)
