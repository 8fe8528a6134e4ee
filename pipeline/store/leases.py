"""Per-case leases: two runs on one store never work on, or commit, the same case at once.

A run takes a case's lease before reading it and gives it back after the commit (or the failure). The lease
is one small JSON object, ``STORE/_leases/<case_id>.json``, created exclusively:

* local stores: the file appears whole under its name or not at all (hard link of a finished file, which fails
  when the name exists);
* object stores: a conditional PUT (``If-None-Match: *``); renewing or taking over a stale lease is a PUT
  conditional on the ETag that was read (``If-Match``), so of two runs racing for it exactly one wins.

A holder renews its lease every ``ttl_s / 3`` seconds from a background thread while it works. A lease is
stale, and may be taken over, when it was not renewed within ``ttl_s`` (the holder died or lost the store), or
at once when its holder is a process of this machine that no longer exists (a killed run on the same node).
Clocks: expiry compares the holder's ``expires_at`` with this machine's clock; keep nodes NTP-synchronised and
the TTL well above their skew.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
import uuid
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from medsam_engine.pipeline.core.atomic import create_exclusive, write_text_atomic
from medsam_engine.pipeline.core.processes import HOST, process_alive

if TYPE_CHECKING:
    from collections.abc import Iterator

    from fsspec import AbstractFileSystem

    from medsam_engine.pipeline.store.case_store import CaseStore

log = logging.getLogger(__name__)

LEASES = "_leases"
DEFAULT_TTL_S = 300.0


def is_stale(record: dict[str, Any], *, now: float | None = None) -> bool:
    """Whether a lease record may be taken over: expired, or held by a dead process of this machine."""
    now = time.time() if now is None else now
    if float(record.get("expires_at", 0)) < now:
        return True
    return (
        record.get("host") == HOST and isinstance(record.get("pid"), int) and not process_alive(record["pid"])
    )


@dataclass
class Lease:
    """A held lease on one case; :meth:`renew` extends it, :meth:`release` gives it back."""

    store: CaseStore
    case_id: str
    run_id: str
    ttl_s: float
    token: str = field(default_factory=lambda: uuid.uuid4().hex)
    lost: bool = False

    @property
    def path(self) -> str:
        return str(self.store.root / LEASES / f"{self.case_id}.json")

    def record(self) -> dict[str, Any]:
        return {
            "case_id": self.case_id,
            "run_id": self.run_id,
            "token": self.token,
            "host": HOST,
            "pid": os.getpid(),
            "ttl_s": self.ttl_s,
            "expires_at": time.time() + self.ttl_s,
        }

    def renew(self) -> bool:
        """Extend the lease; False (and ``lost``) when another run has taken it over meanwhile."""
        current, etag = read_lease(self.store, self.case_id)
        if current is None or current.get("token") != self.token:
            self.lost = True
            return False
        text = json.dumps(self.record())
        if self.store.is_local:
            write_text_atomic(self.path, text)
            return True
        if not conditional_put(self.store.fs, self.path, text.encode(), if_match=etag):
            self.lost = True
            return False
        return True

    def release(self) -> None:
        """Give the lease back (only if it is still ours)."""
        current, _ = read_lease(self.store, self.case_id)
        if current is not None and current.get("token") == self.token:
            with suppress(FileNotFoundError):
                self.store.fs.rm_file(self.path)


def read_lease(store: CaseStore, case_id: str) -> tuple[dict[str, Any] | None, str | None]:
    """The case's lease record and (object stores) its ETag; (None, None) when there is none. An unreadable
    record (a torn write of some other tool) reads as an expired lease."""
    path = str(store.root / LEASES / f"{case_id}.json")
    try:
        if store.is_local:
            data, etag = store.fs.cat_file(path), None
        else:  # the ETag must be the one of the bytes read: the same before and after the GET
            for _ in range(5):
                store.fs.invalidate_cache(path)
                etag = store.fs.info(path).get("ETag")
                data = store.fs.cat_file(path)
                store.fs.invalidate_cache(path)
                if store.fs.info(path).get("ETag") == etag:
                    break
            else:
                return {"run_id": "(changing)", "expires_at": float("inf")}, None  # busy: treat as held
    except FileNotFoundError:
        return None, None
    try:
        record = json.loads(data)
    except ValueError:
        record = {"expires_at": 0}
    return (record if isinstance(record, dict) else {"expires_at": 0}), etag


def _precondition_failed(exc: BaseException) -> bool:
    if isinstance(exc, FileExistsError):
        return True
    text = f"{exc} {exc.__cause__ or ''}"
    return "PreconditionFailed" in text or "412" in text or "ConditionalRequestConflict" in text


def conditional_put(fs: AbstractFileSystem, path: str, data: bytes, *, if_match: str | None = None) -> bool:
    """One conditional PUT on an object store: create ``path`` only if it is absent (``if_match`` None), or
    replace only the version with that ETag. False when the condition failed (another writer was first)."""
    try:
        if if_match is None:
            fs.pipe_file(path, data, mode="create")
        else:
            fs.pipe_file(path, data, IfMatch=if_match)
    except OSError as exc:  # FileExistsError, or the 412 as s3fs raises it
        if _precondition_failed(exc):
            return False
        raise
    finally:
        fs.invalidate_cache(path)
    return True


GUARD_STALE_S = 30.0  # a takeover guard older than this was left by a killed process (a takeover takes ms)


def _take_over_local(lease: Lease, stale: dict[str, Any]) -> bool:
    """Replace a stale lease file with ours. Takeovers of one case are serialised by an exclusive guard file,
    and the lease file is replaced in one atomic rename, so it never vanishes: a new claimant's exclusive
    create keeps failing, and of racing takeovers exactly one finds the stale record still in place."""
    path = Path(lease.path)
    guard = path.with_name(f".{path.name}.takeover")
    if not create_exclusive(guard, lease.token):
        try:
            if time.time() - guard.stat().st_mtime > GUARD_STALE_S:
                guard.unlink(missing_ok=True)  # left by a killed takeover: the next attempt may go ahead
        except FileNotFoundError:
            pass
        return False
    try:
        current, _ = read_lease(lease.store, lease.case_id)
        if current is None or current.get("token") != stale.get("token") or not is_stale(current):
            return False  # released, or replaced by another run's fresh lease meanwhile
        write_text_atomic(path, json.dumps(lease.record()))
        return True
    finally:
        guard.unlink(missing_ok=True)


def acquire(store: CaseStore, case_id: str, *, run_id: str, ttl_s: float = DEFAULT_TTL_S) -> Lease | None:
    """Take the case's lease; None when a live run holds it (its record is logged at debug level)."""
    lease = Lease(store, case_id, run_id, ttl_s)
    text = json.dumps(lease.record())
    for _ in range(3):
        if store.is_local:
            if create_exclusive(lease.path, text):
                return lease
        elif conditional_put(store.fs, lease.path, text.encode()):
            return lease
        current, etag = read_lease(store, case_id)
        if current is None:
            continue  # released between our try and our read: try again
        if not is_stale(current):
            log.debug("case %s is leased by run %s", case_id, current.get("run_id"))
            return None
        log.info("case %s: taking over the stale lease of run %s", case_id, current.get("run_id"))
        if store.is_local:
            if _take_over_local(lease, current):
                return lease
        elif conditional_put(store.fs, lease.path, json.dumps(lease.record()).encode(), if_match=etag):
            return lease
    return None


def holder(store: CaseStore, case_id: str) -> dict[str, Any] | None:
    """The live lease on a case (its record), or None when nobody holds it."""
    record, _ = read_lease(store, case_id)
    return None if record is None or is_stale(record) else record


@contextmanager
def leased(
    store: CaseStore, case_id: str, *, run_id: str, ttl_s: float = DEFAULT_TTL_S
) -> Iterator[Lease | None]:
    """Hold the case's lease for the block, renewing it in the background; yields None (and holds nothing)
    when another live run holds it."""
    lease = acquire(store, case_id, run_id=run_id, ttl_s=ttl_s)
    if lease is None:
        yield None
        return
    stop = threading.Event()

    def keep() -> None:
        while not stop.wait(ttl_s / 3):
            try:
                if not lease.renew():
                    log.warning("case %s: the lease was taken over by another run", case_id)
                    return
            except Exception as exc:
                log.warning("case %s: could not renew the lease (%s)", case_id, exc)

    beat = threading.Thread(target=keep, name=f"lease-{case_id}", daemon=True)
    beat.start()
    try:
        yield lease
    finally:
        stop.set()
        beat.join()
        try:
            lease.release()
        except Exception as exc:
            log.warning(
                "case %s: could not release the lease (%s); it expires in %.0f s", case_id, exc, ttl_s
            )
