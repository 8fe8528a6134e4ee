"""Expected per-case failures. Each is recorded against its case and the batch goes on.

Anything not derived from :class:`CaseError` is a bug: the per-case driver (pipeline/annotate/driver.py)
records it against its case as stage "internal". :class:`RunError` is a failure of the whole run (the model
cannot load, the store is gone): it propagates. :func:`is_transient` tells an I/O hiccup worth retrying.
"""

from __future__ import annotations

import errno
import re
from collections.abc import Iterator


class CaseError(Exception):
    """A case could not be processed; ``reason`` is for a person, ``stage`` says where it failed."""

    stage = "case"

    def __init__(self, reason: str, *, case_id: str | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.case_id = case_id

    def __str__(self) -> str:
        prefix = f"case {self.case_id}: " if self.case_id else ""
        return f"{prefix}{self.reason}"


class ReadError(CaseError):
    """The image or mask could not be read (missing, corrupt, unsupported format or syntax)."""

    stage = "read"


class GeometryError(CaseError):
    """Two inputs that must share a grid do not (a coarse mask on another grid, say)."""

    stage = "geometry"


class PromptError(CaseError):
    """No usable prompt could be made for the case."""

    stage = "prompt"


class StoreConflictError(CaseError):
    """The store already holds this case under another signature and ``overwrite`` was not asked for."""

    stage = "store"


class RunError(RuntimeError):
    """The run as a whole cannot go on (no usable model, no usable store); never recorded per case."""


class StoreUnavailableError(RunError):
    """The store (or the disk a run writes to) cannot be written: full, read-only or not ours to write."""


RESOURCE_ERRNOS = {
    errno.ENOSPC: "no space left on the device",
    errno.EDQUOT: "the disk quota is exhausted",
    errno.EROFS: "the file system is read-only",
    errno.EACCES: "permission denied",
}


def _chain(exc: BaseException | None) -> Iterator[BaseException]:
    """``exc`` and the exceptions it was raised from or while handling, each once."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def resource_fault(exc: BaseException | None) -> str | None:
    """Why a write failed for lack of a resource (no space, quota, read-only, permission) when ``exc`` or an
    exception it was raised from says so; None otherwise."""
    for link in _chain(exc):
        if isinstance(link, OSError) and link.errno in RESOURCE_ERRNOS:
            return f"{RESOURCE_ERRNOS[link.errno]} ({link.strerror or link})"
    return None


TRANSIENT_ERRNOS = frozenset(
    {
        errno.EIO,
        errno.EAGAIN,
        errno.ETIMEDOUT,
        errno.ESTALE,
        errno.EBUSY,
        errno.ECONNRESET,
        errno.ECONNREFUSED,
        errno.ECONNABORTED,
        errno.ENETDOWN,
        errno.ENETUNREACH,
        errno.EHOSTUNREACH,
        errno.EPIPE,
    }
)
# A reader error that crossed the isolated reader's process boundary (or became a failing case at discovery)
# has lost its cause; its reason still names the cause's type and errno ("... (OSError: [Errno 5] Input/output
# error)"), or says "temporarily unavailable" (a server that stayed busy through its retries).
_TRANSIENT_TEXT = re.compile(
    r"\b(TimeoutError|Connection\w*Error|BrokenPipeError|ReadTimeout"
    r"|temporarily unavailable)\b|\[Errno (" + "|".join(str(n) for n in sorted(TRANSIENT_ERRNOS)) + r")\]"
)


# Connection failures of the HTTP stacks under s3fs/requests that are not Python's ConnectionError; named, so
# this module imports none of them.
TRANSIENT_TYPES = frozenset(
    {
        "EndpointConnectionError",
        "ConnectionClosedError",
        "ReadTimeoutError",
        "ConnectTimeoutError",
        "ResponseStreamingError",
        "ServerDisconnectedError",
        "ClientConnectorError",
        "ClientOSError",
        "ClientPayloadError",
    }
)


def is_transient(exc: BaseException | None) -> bool:
    """Whether ``exc`` (or an exception it was raised from) is an I/O hiccup worth retrying."""
    for link in _chain(exc):
        if isinstance(link, (TimeoutError, ConnectionError)):
            return True
        if any(kind.__name__ in TRANSIENT_TYPES for kind in type(link).__mro__):
            return True
        if isinstance(link, OSError) and link.errno in TRANSIENT_ERRNOS:
            return True
        reason = getattr(link, "reason", None)
        if isinstance(reason, str) and _TRANSIENT_TEXT.search(reason):
            return True
    return False
