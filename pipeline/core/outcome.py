"""What became of one case in a run: the typed value every driver returns and every report is built from."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

Status = Literal["done", "skipped", "failed", "quarantined"]
STATUSES: tuple[str, ...] = ("done", "skipped", "failed", "quarantined")


@dataclass(frozen=True)
class CaseOutcome:
    """One case's outcome.

    ``status``: done (committed now), skipped (already committed with the same signature), failed, or
    quarantined (skipped: it failed before for a lasting reason under the same signature). ``stage`` names
    where a failure happened (read, geometry, prompt, store, io, killed, worker, internal…); ``reason`` is the
    person-readable why (it may name files, so it stays in the store's records and the terminal and is left
    out of :meth:`record`, which travels to Ray and Prefect). ``seconds`` and ``slices`` measure the work,
    ``stages`` its seconds per stage (read, prompts, model, clean, commit); ``node`` is the Ray node that did
    it.
    """

    case_id: str
    status: Status
    stage: str = ""
    reason: str = ""
    seconds: float = 0.0
    slices: int = 0
    node: str = ""
    stages: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.status not in STATUSES:
            raise ValueError(f"Argument 'status' must be one of {STATUSES}; got {self.status!r}.")

    def record(self) -> dict[str, Any]:
        """The outcome as a JSON record without the reason (ids, status, stage, figures; no file names)."""
        return {
            "case_id": self.case_id,
            "status": self.status,
            "stage": self.stage,
            "slices": self.slices,
            "seconds": round(self.seconds, 3),
            "node": self.node,
            "stages": {name: round(seconds, 3) for name, seconds in self.stages.items()},
        }

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> CaseOutcome:
        return cls(
            record["case_id"],
            record["status"],
            stage=record.get("stage", ""),
            reason=record.get("reason", ""),
            seconds=float(record.get("seconds", 0.0)),
            slices=int(record.get("slices", 0)),
            node=record.get("node", ""),
            stages=dict(record.get("stages") or {}),
        )
