"""The one failure policy of a case, wherever it runs (local engine, Ray actor, flywheel round).

* Transient I/O errors (:func:`pipeline.core.errors.is_transient`: timeouts, lost connections, EIO…) are
  retried in place, ``retries`` times, 1 s, 2 s, 4 s… apart; one that lasts fails the case at stage "io",
  which is never quarantined: the next run tries again.
* Expected failures (:class:`~pipeline.core.errors.CaseError`) fail the case at their own stage with their
  reason; anything else is a bug, recorded against the case as stage "internal" (the batch goes on).
* A reader killed from outside (SIGKILL: the out-of-memory killer, a shutdown) fails at stage "killed", not
  the input's fault, so not quarantined either.
* With ``quarantine``, a case that failed for a lasting reason is listed in STORE/_quarantine with its
  signature; runs that honour quarantine skip it until its input, model, configuration or version change.
* :class:`~pipeline.core.errors.RunError` (the model cannot load) is not a case's failure: it propagates.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from medsam_engine.pipeline.core.errors import CaseError, is_transient
from medsam_engine.pipeline.io.isolate import WorkerCrash

log = logging.getLogger(__name__)

T = TypeVar("T")
RETRY_NEXT_RUN = ("io", "killed")  # failing stages that are not quarantined: the next run tries again


@dataclass(frozen=True)
class FailurePolicy:
    """How a case's failure is handled: retries of transient errors, and whether lasting failures are
    quarantined (distributed and scheduled runs) or only recorded (a person's local run)."""

    retries: int = 2
    retry_delay_s: float = 1.0
    quarantine: bool = False

    def __post_init__(self) -> None:
        if self.retries < 0:
            raise ValueError(f"Argument 'retries' must be >= 0; got {self.retries}.")
        if self.retry_delay_s < 0:
            raise ValueError(f"Argument 'retry_delay_s' must be >= 0; got {self.retry_delay_s}.")


LOCAL = FailurePolicy()
DISTRIBUTED = FailurePolicy(quarantine=True)


def failure_of(exc: BaseException) -> tuple[str, str]:
    """(stage, reason) of a case's failure: "io" for a lasting transient error, "killed" when the reader was
    SIGKILLed from outside, the CaseError's own stage, or "internal" for a bug."""
    reason = exc.reason if isinstance(exc, CaseError) else f"{type(exc).__name__}: {exc}"
    if is_transient(exc):
        return "io", reason
    if isinstance(exc.__cause__, WorkerCrash) and "SIGKILL" in exc.__cause__.why:
        return "killed", "the reader process was killed from outside (SIGKILL: out of memory, or a shutdown)"
    return (exc.stage, reason) if isinstance(exc, CaseError) else ("internal", reason)


def with_retries(call: Callable[[], T], policy: FailurePolicy) -> T:
    """``call()``, repeated up to ``policy.retries`` times while it fails transiently."""
    attempt = 0
    while True:
        try:
            return call()
        except Exception as exc:
            if attempt >= policy.retries or not is_transient(exc):
                raise
            log.warning(
                "transient error (%s); retry %d of %d", type(exc).__name__, attempt + 1, policy.retries
            )
            time.sleep(policy.retry_delay_s * 2**attempt)
            attempt += 1
