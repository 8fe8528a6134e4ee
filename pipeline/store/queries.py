"""Which committed cases a consumer takes, by their review status: one query, the rule a parameter.

``review_status`` is set by routing (auto-accepted / review / rejected, `round run`) and by a person's review
("accepted", `review import`). Only what a person accepted is ground truth for training; an export of a store
that was never routed takes every case.
"""

from __future__ import annotations

from typing import Literal

from medsam_engine.pipeline.core.types import CaseAttributes
from medsam_engine.pipeline.store.case_store import CaseStore

ACCEPTED = "accepted"
AcceptanceRule = Literal["accepted", "accepted-or-unrouted", "accepted-else-all"]
RULES: tuple[str, ...] = ("accepted", "accepted-or-unrouted", "accepted-else-all")


def review_statuses(store: CaseStore) -> dict[str, str | None]:
    """Every committed case's ``review_status`` (None when it was never routed nor reviewed), sorted by id."""
    return {case_id: attrs.review_status for case_id, attrs in store.all_attributes().items()}


def select_cases(
    store: CaseStore, rule: AcceptanceRule, *, attributes: dict[str, CaseAttributes] | None = None
) -> tuple[list[str], dict[str, str]]:
    """(chosen case ids, {left-out case id: why}) under ``rule``:

    * ``accepted``: only cases a person accepted (fine-tuning);
    * ``accepted-or-unrouted``: accepted cases and cases with no review status (exports);
    * ``accepted-else-all``: the accepted cases when the store has any review status, else every committed
      case (training the detector on a store that was never reviewed).

    ``attributes`` (``store.all_attributes()``) saves reading them again when the caller has them.
    """
    if rule not in RULES:
        raise ValueError(f"Argument 'rule' must be one of {RULES}; got {rule!r}.")
    statuses = (
        review_statuses(store)
        if attributes is None
        else {case_id: attrs.review_status for case_id, attrs in attributes.items()}
    )
    if rule == "accepted-else-all" and all(status is None for status in statuses.values()):
        return list(statuses), {}
    take_unrouted = rule == "accepted-or-unrouted"
    chosen, left_out = [], {}
    for case_id, status in statuses.items():
        if status == ACCEPTED or (status is None and take_unrouted):
            chosen.append(case_id)
        else:
            left_out[case_id] = (
                "not reviewed by a person"
                if status is None
                else f"review status is '{status}', not '{ACCEPTED}'"
            )
    return chosen, left_out
