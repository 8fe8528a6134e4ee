"""The discovery cache: what is unpacked, fetched and downloaded into it, which processes use it, and its
removal once a run is done with it.

The cache is a local folder: ``STORE/_cache`` for a local store; for a store on object storage
``$MEDSAM_ENGINE_CACHE``, else ``~/.cache/medsam-engine`` (one per machine, shared by every such store; the
model graphs in its ``onnx/`` are no entries of it). Its entries::

    archives/<key>/                     a zip/tar input extracted (pipeline/io/archives.py), one per archive
    remote/<key>/                       an s3:// (fsspec) input copied (pipeline/io/remote.py)
    dicomweb/<case_id>[-<n>]/           a DICOMweb series downloaded for its case (n: its number of instances)
    dicomweb-seg/<case_id>-<hash>.dcm   a SEG in the PACS that is the case's coarse mask
    .pins/<machine>-<pid>.json          the entries a live process uses (below)
    digests/<case_id>-<n>               the content hash of a DICOMweb series of n instances once downloaded
                                        (no entry: kept, so a rerun skips a committed series without
                                        downloading it again)
    dicomweb-marks/<key>.dcm ...        PR/SR marks fetched from the PACS by keyed SOP instance, and what
                                        goes with them (pipeline/io/pacs_marks.py; no entry: kept, a SOP
                                        instance never changes, so a rerun fetches nothing again)

Lifecycle: discovery pins the archive and s3:// entries it makes before extracting or fetching; a run
(:class:`CacheLifecycle`) pins every entry its cases read, DICOMweb downloads included, and removes an entry
once every case of the run that reads it has ended, done, skipped, failed or quarantined: an archive of many
cases goes with the last of them, and a failed case's download goes too (the next run downloads it again).
An entry another live process pins (a concurrent run on the same input) is left to that process. ``keep``
(``--keep-cache``, ``store.keep_cache``) keeps every entry; ``defer`` removes them only when the run ends,
after the steps that read the inputs once the cases are committed (a DICOM SEG push, a review queue's SEGs).

A pin is live while its process is: on this machine while its pid exists (``HOST`` carries the boot id), and
another machine's for a day after it was last written.
"""

from __future__ import annotations

import atexit
import contextlib
import hashlib
import json
import logging
import os
import threading
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from medsam_engine.pipeline.core.atomic import write_text_atomic
from medsam_engine.pipeline.core.disk import remove_path, tree_size
from medsam_engine.pipeline.core.processes import HOST, process_alive, process_tag
from medsam_engine.pipeline.core.types import CaseRef, Leftover
from medsam_engine.pipeline.io.dicomweb import INSTANCE_PATTERN

log = logging.getLogger(__name__)

ARCHIVES, REMOTE, DICOMWEB, DICOMWEB_SEG = "archives", "remote", "dicomweb", "dicomweb-seg"
ARCHIVE_CACHES, DOWNLOAD_CACHES, STALE_PINS = "archive caches", "download caches", "stale pins"
CACHE_KINDS = {
    ARCHIVES: ARCHIVE_CACHES,
    REMOTE: DOWNLOAD_CACHES,
    DICOMWEB: DOWNLOAD_CACHES,
    DICOMWEB_SEG: DOWNLOAD_CACHES,
}
PINS, DIGESTS = ".pins", "digests"
OTHER_MACHINE_PIN_S = 24 * 3600.0
DICOMWEB_SERIES = "dicomweb-series"  # a series in a PACS, listed by QIDO-RS and downloaded by materialise()


def series_download(cache: Path, case: CaseRef) -> Path:
    """The folder a DICOMweb case's series is downloaded into (pipeline/io/discover.py's ``materialise``)."""
    _, _, instances = case.image.partition("#")
    return cache / DICOMWEB / (case.case_id + (f"-{instances}" if instances else ""))


def seg_download(cache: Path, case_id: str, url: str) -> Path:
    """The file a SEG in the PACS (its instance ``url``) is downloaded to as the case's coarse mask."""
    return cache / DICOMWEB_SEG / f"{case_id}-{hashlib.sha256(url.encode()).hexdigest()[:12]}.dcm"


def _digest_file(cache: Path, case: CaseRef) -> Path | None:
    name = series_download(cache, case).name
    return cache / DIGESTS / name if "#" in case.image else None  # unknown size: it may have grown


def remember_digest(cache: str | Path, case: CaseRef, digest: str) -> None:
    """Keep the content hash of a DICOMweb case's downloaded series (``case`` as discovery gave it, its
    instance count in its URL) for later runs."""
    path = _digest_file(Path(cache), case)
    if path is not None:
        write_text_atomic(path, digest)


def known_digest(cache: str | Path, case: CaseRef) -> str | None:
    """The content hash of the DICOMweb case's series as an earlier download of as many instances had it
    (the PACS series is taken as unchanged while its instance count is); None when none was kept."""
    path = _digest_file(Path(cache), case)
    try:
        return path.read_text().strip() or None if path is not None else None
    except OSError:
        return None


def entry_name(path: str | Path, cache: str | Path) -> str | None:
    """The cache entry (``<kind>/<name>``) at or above ``path``; None for a path outside the cache's
    entries."""
    try:
        parts = Path(os.path.abspath(path)).relative_to(os.path.abspath(cache)).parts
    except ValueError:
        return None
    return f"{parts[0]}/{parts[1]}" if len(parts) >= 2 and parts[0] in CACHE_KINDS else None


def case_entries(case: CaseRef, cache: str | Path) -> set[str]:
    """The cache entries the case reads: those discovery unpacked or fetched it into and, for a DICOMweb
    series, its download (and its coarse mask's, a SEG in the PACS)."""
    paths = [Path(p) for p in case.cached_from]
    if case.kind == DICOMWEB_SERIES:
        paths.append(series_download(Path(cache), case))
        if case.coarse_mask and INSTANCE_PATTERN.match(case.coarse_mask):
            paths.append(seg_download(Path(cache), case.case_id, case.coarse_mask))
    return {name for name in (entry_name(p, cache) for p in paths) if name}


# -- pins: the entries live processes use ---------------------------------------------------------------
_lock = threading.Lock()
_pinned: dict[str, set[str]] = {}  # cache folder (absolute) -> the entries this process pins there


def _write_pins(cache: str, names: set[str]) -> None:
    path = Path(cache) / PINS / f"{process_tag()}.json"
    if names:
        record = {"host": HOST, "pid": os.getpid(), "entries": sorted(names), "written_at": time.time()}
        write_text_atomic(path, json.dumps(record))
    else:
        path.unlink(missing_ok=True)


def pin(cache: str | Path, names: Iterable[str]) -> None:
    """Record that this process uses these entries of ``cache`` (until :func:`unpin`, or the process's normal
    exit)."""
    key, wanted = os.path.abspath(cache), set(names)
    with _lock:
        if not _pinned:
            atexit.register(_drop_pins)
        held = _pinned.setdefault(key, set())
        if wanted - held:
            held |= wanted
            _write_pins(key, held)


def _drop_pins() -> None:
    """At exit: this process uses no entry any more (a killed process's pins are judged by its pid)."""
    with _lock:
        for key in _pinned:
            with contextlib.suppress(OSError):
                (Path(key) / PINS / f"{process_tag()}.json").unlink(missing_ok=True)
        _pinned.clear()


def unpin(cache: str | Path, names: Iterable[str]) -> None:
    """This process no longer uses these entries of ``cache``."""
    key, done = os.path.abspath(cache), set(names)
    with _lock:
        held = _pinned.get(key, set())
        if held & done:
            held -= done
            _write_pins(key, held)


def _pin_records(cache: Path) -> list[tuple[Path, dict[str, Any], bool]]:
    """(file, record, live) of every pin in ``cache`` but this process's own."""
    folder, mine = cache / PINS, f"{process_tag()}.json"
    if not folder.is_dir():
        return []
    found = []
    for path in sorted(folder.iterdir()):
        if path.name.startswith(".") or not path.name.endswith(".json") or path.name == mine:
            continue
        try:
            record = json.loads(path.read_text())
            age = time.time() - path.stat().st_mtime
        except (OSError, ValueError):
            continue  # removed meanwhile, or no pin of ours
        pid = record.get("pid")
        if record.get("host") == HOST:
            live = isinstance(pid, int) and process_alive(pid)
        else:
            live = age < OTHER_MACHINE_PIN_S
        found.append((path, record, live))
    return found


def pinned_elsewhere(cache: str | Path) -> set[str]:
    """The entries of ``cache`` that other live processes pin."""
    return {
        str(name)
        for _, record, live in _pin_records(Path(cache))
        if live
        for name in record.get("entries") or ()
    }


def in_use(cache: str | Path) -> set[str]:
    """The entries of ``cache`` that live processes pin, this one included."""
    with _lock:
        mine = set(_pinned.get(os.path.abspath(cache), set()))
    return mine | pinned_elsewhere(cache)


def remove_entries(cache: str | Path, names: Iterable[str]) -> list[str]:
    """Remove these entries of ``cache`` unless another live process pins them; returns those removed."""
    others = pinned_elsewhere(cache)
    removed = []
    for name in sorted(set(names)):
        path = Path(cache) / name
        if name in others:
            log.info("cache entry %s is in use by another run; left to it", name)
        elif path.exists() or path.is_symlink():
            remove_path(path)
            removed.append(name)
    return removed


class CacheLifecycle:
    """One run's use of the cache (see the module doc): the entries its ``cases`` read are pinned from now
    on; :meth:`case_ended` removes those whose cases have all ended (unless ``keep`` or ``defer``) and
    :meth:`finish` every one still held. ``removed`` lists the entries removed so far."""

    def __init__(
        self, cache: str | Path, cases: Iterable[CaseRef], *, keep: bool = False, defer: bool = False
    ) -> None:
        self.cache, self.keep, self.defer = Path(cache), keep, defer
        self.removed: list[str] = []
        self._readers: dict[str, set[str]] = {}  # entry -> the cases of the run that read it and go on
        self._entries: dict[str, set[str]] = {}  # case id -> the entries it reads
        self._lock = threading.Lock()
        for case in cases:
            names = case_entries(case, self.cache)
            self._entries.setdefault(case.case_id, set()).update(names)
            for name in names:
                self._readers.setdefault(name, set()).add(case.case_id)
        pin(self.cache, self._readers)

    def case_ended(self, case_id: str) -> None:
        """The case has ended in this run: remove the entries no other case of the run still reads."""
        with self._lock:
            unread = []
            for name in self._entries.pop(case_id, set()):
                readers = self._readers.get(name)
                if readers is not None:
                    readers.discard(case_id)
                    if not readers:
                        unread.append(name)
        if not self.defer:
            self._release(unread)

    def finish(self) -> None:
        """The run has ended: remove (or with ``keep``, only unpin) every entry still held."""
        with self._lock:
            self._entries.clear()
            names = list(self._readers)
        self._release(names)

    def _release(self, names: list[str]) -> None:
        with self._lock:
            names = [name for name in names if self._readers.pop(name, None) is not None]
        if not names:
            return
        if not self.keep:
            self.removed += remove_entries(self.cache, names)
        unpin(self.cache, names)


# -- what `store clean` may remove -------------------------------------------------------------------------
def _partial_of(name: str) -> str | None:
    """The entry an unfinished sibling is written for: ``.<name>.<id>.partial`` (a folder being extracted or
    downloaded) or ``.<id>.partial.<name>`` (a file); None for another name."""
    if not name.startswith("."):
        return None
    if name.endswith(".partial"):
        return name[1 : -len(".partial")].rpartition(".")[0] or None
    return name.partition(".partial.")[2] or None


def cache_leftovers(cache: str | Path) -> list[Leftover]:
    """Every entry of ``cache`` (and unfinished sibling) that no live process pins, and the pins of
    processes that are gone."""
    cache, others = Path(cache), in_use(cache)
    found = []
    for folder, kind in CACHE_KINDS.items():
        if not (cache / folder).is_dir():
            continue
        for path in sorted((cache / folder).iterdir()):
            partial = _partial_of(path.name)
            name = f"{folder}/{partial or path.name}"
            if name in others or (path.name.startswith(".") and partial is None):
                continue
            why = "unfinished (its writer stopped)" if partial else "no live run uses it"
            found.append(Leftover(kind, str(path), tree_size(path), why))
    for path, _, live in _pin_records(cache):
        if not live:
            found.append(Leftover(STALE_PINS, str(path), tree_size(path), "pin of a process that is gone"))
    return found


def remove_cache_leftovers(cache: str | Path, leftovers: Iterable[Leftover]) -> list[Leftover]:
    """Remove what :func:`cache_leftovers` listed, but an entry a live process has pinned since; returns
    what was removed."""
    others = in_use(cache)
    removed = []
    for item in leftovers:
        path = Path(item.path)
        name = entry_name(path.parent / (_partial_of(path.name) or path.name), cache)
        if item.kind != STALE_PINS and name in others:
            continue
        remove_path(path)
        removed.append(item)
    return removed
