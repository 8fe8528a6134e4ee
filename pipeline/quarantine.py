"""The failure policy of a distributed run, per case: which errors are transient (retried in place, never
quarantined), which stage a failure belongs to, and the quarantine: STORE/_quarantine/<case_id>.json lists a
case that failed for a reason that will not go away by itself (corrupt input, a bug, a worker-killing case)
with its signature, so that later runs skip it until its input, the model, the configuration or the package
version change. Also the small outcome record that runs report per case (ids and stages, never file names).
No Ray and no Prefect here.
"""
from __future__ import annotations

import errno
import logging
import re
import time
from collections.abc import Callable

log = logging.getLogger(__name__)

TRANSIENT_ERRNOS = frozenset({errno.EIO, errno.EAGAIN, errno.ETIMEDOUT, errno.ESTALE, errno.EBUSY,
                              errno.ECONNRESET, errno.ECONNREFUSED, errno.ECONNABORTED, errno.ENETDOWN,
                              errno.ENETUNREACH, errno.EHOSTUNREACH, errno.EPIPE})
# A reader error that crossed the isolated reader's process boundary has lost its cause; its reason still
# names the cause's type and errno ("... (OSError: [Errno 5] Input/output error)").
_TRANSIENT_TEXT = re.compile(r"\b(TimeoutError|Connection\w*Error|BrokenPipeError)\b|\[Errno ("
                             + "|".join(str(n) for n in sorted(TRANSIENT_ERRNOS)) + r")\]")


def is_transient(exc: BaseException | None) -> bool:
    """Whether ``exc`` (or an exception it was raised from) is an I/O hiccup worth retrying."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, (TimeoutError, ConnectionError)):
            return True
        if isinstance(exc, OSError) and exc.errno in TRANSIENT_ERRNOS:
            return True
        reason = getattr(exc, "reason", None)
        if isinstance(reason, str) and _TRANSIENT_TEXT.search(reason):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


RETRY_NEXT_RUN = ("io", "killed")  # failing stages that are not quarantined: the next run tries again


def failure_of(exc: BaseException) -> tuple[str, str]:
    """(stage, reason) of a case's failure: "io" for a lasting transient error, "killed" when the reader was
    SIGKILLed from outside (the out-of-memory killer, a shutdown: not the input's fault), the CaseError's own
    stage, or "internal" for a bug."""
    from pipeline.errors import CaseError
    from pipeline.isolate import WorkerCrash

    reason = exc.reason if isinstance(exc, CaseError) else f"{type(exc).__name__}: {exc}"
    if is_transient(exc):
        return "io", reason
    if isinstance(exc.__cause__, WorkerCrash) and "SIGKILL" in exc.__cause__.why:
        return "killed", "the reader process was killed from outside (SIGKILL: out of memory, or a shutdown)"
    return (exc.stage, reason) if isinstance(exc, CaseError) else ("internal", reason)


def with_retries(call: Callable[[], dict], *, retries: int, delay_s: float = 1.0) -> dict:
    """``call()``, repeated up to ``retries`` times (1 s, 2 s, 4 s… apart) while it fails transiently."""
    attempt = 0
    while True:
        try:
            return call()
        except Exception as exc:  # noqa: BLE001 - only transient errors are retried; the rest re-raised
            if attempt >= retries or not is_transient(exc):
                raise
            log.warning("transient error (%s); retry %d of %d", type(exc).__name__, attempt + 1, retries)
            time.sleep(delay_s * 2**attempt)
            attempt += 1


def write_store_record(store, folder: str, name: str, record: dict) -> None:
    """Write STORE/<folder>/<name>.json whole or not at all (rename locally, one PUT on object stores)."""
    store.write_json(store.root / folder / f"{name}.json", record)


def read_store_record(store, folder: str, name: str) -> dict | None:
    return store.read_json(store.root / folder / f"{name}.json")


def quarantine(store, case_id: str, *, stage: str, signature: dict | None, run_id: str) -> None:
    record = {"case_id": case_id, "stage": stage, "signature": signature, "run_id": run_id, "time": _stamp()}
    write_store_record(store, "_quarantine", case_id, record)


def quarantined(store, case_id: str) -> dict | None:
    """The case's quarantine record (stage, signature, run), or None."""
    return read_store_record(store, "_quarantine", case_id)


def _stamp() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def outcome(case_id: str, status: str, *, stage: str = "", slices: int = 0, seconds: float = 0.0,
            node: str = "") -> dict:
    """A case's outcome record: ids, status (done|skipped|failed), the failing stage, never a reason text
    (reasons name files; they stay in STORE/_errors)."""
    return {"case_id": case_id, "status": status, "stage": stage, "slices": slices,
            "seconds": round(seconds, 3), "node": node}
