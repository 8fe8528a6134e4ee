"""The store's JSON records beside the cases, all written whole through :meth:`CaseStore.write_json`
(a temporary file renamed into place locally, one PUT on object stores): readers never see a partial one.

    STORE/_rounds/current.json, round-NNN.json   the flywheel's rounds (pipeline/flywheel/rounds.py)
    STORE/_quality/calibration.json              the score calibration (pipeline/annotate/quality.py)
    STORE/_models/<sha16>.json                   registered fine-tuned models (pipeline/flywheel/registry.py)
    STORE/_quarantine/<case_id>.json             cases that failed for a lasting reason, with their signature
    STORE/_watermarks/<name>.json                how far the nightly runs have got (flows/watermark.py)
    STORE/_requests/<id>.json                    what a command asked a flow to run (inputs, masks, options),
                                                 so only the opaque id reaches the orchestrator
"""

from __future__ import annotations

import uuid
from typing import Any

from medsam_engine.pipeline.core.provenance import utc_stamp
from medsam_engine.pipeline.store.case_store import CaseStore

ROUNDS, QUALITY, MODELS, QUARANTINE, WATERMARKS, REQUESTS = (
    "_rounds",
    "_quality",
    "_models",
    "_quarantine",
    "_watermarks",
    "_requests",
)
PUSHED = (
    "_pushed"  # which committed version of a case was stored in which PACS (pipeline/export/pacs_push.py)
)


def read_record(store: CaseStore, *parts: str) -> dict[str, Any] | None:
    """A JSON record under the store root (``parts`` are path components), or None when absent."""
    return store.read_json(store.root.joinpath(*parts))


def write_record(store: CaseStore, data: dict[str, Any], *parts: str) -> str:
    """Write a JSON record whole under the store root; returns its path."""
    path = store.root.joinpath(*parts)
    store.write_json(path, data)
    return str(path)


def list_records(store: CaseStore, folder: str) -> list[str]:
    """Names of the JSON records in ``folder`` (hidden temporary files left out)."""
    return [n for n in store.list_names(store.root / folder) if n.endswith(".json") and not n.startswith(".")]


def write_request(store: CaseStore, request: dict[str, Any]) -> str:
    """Keep what a command asks a flow to run (input paths, mask paths, options that may name patients) in
    the store; returns the opaque id the flow is given instead."""
    request_id = uuid.uuid4().hex
    write_record(store, {**request, "written_at": utc_stamp()}, REQUESTS, f"{request_id}.json")
    return request_id


def read_request(store: CaseStore, request_id: str) -> dict[str, Any]:
    """The request written by :func:`write_request`; ValueError naming the id when the store has none."""
    if not request_id.isalnum():
        raise ValueError(f"run request {request_id!r} is not an id this engine wrote")
    found = read_record(store, REQUESTS, f"{request_id}.json")
    if found is None:
        raise ValueError(f"no run request {request_id} in the store {store.url}")
    return found


def current_round(store: CaseStore) -> int:
    """The round in progress or last run; 0 before the first `round run`."""
    return int((read_record(store, ROUNDS, "current.json") or {}).get("round", 0))


def quarantine(
    store: CaseStore, case_id: str, *, stage: str, signature: dict[str, Any] | None, run_id: str
) -> None:
    """Record that ``case_id`` failed at ``stage`` for a lasting reason; runs skip it while its signature
    holds."""
    record = {
        "case_id": case_id,
        "stage": stage,
        "signature": signature,
        "run_id": run_id,
        "time": utc_stamp(),
    }
    write_record(store, record, QUARANTINE, f"{case_id}.json")


def quarantined(store: CaseStore, case_id: str) -> dict[str, Any] | None:
    """The case's quarantine record (stage, signature, run), or None."""
    return read_record(store, QUARANTINE, f"{case_id}.json")


def read_watermark(store: CaseStore, name: str) -> dict[str, Any] | None:
    """The watermark record ``name`` ({"since", "since_utc", "run_id"[, "model"][, "pacs"]}), or None before
    its first run; ``model`` is the sha256 of the model a flywheel round annotated with, ``pacs`` the PACS
    studies done (keyed study -> number of instances)."""
    return read_record(store, WATERMARKS, f"{name}.json")


def write_watermark(
    store: CaseStore,
    name: str,
    since: float,
    *,
    run_id: str,
    model: str | None = None,
    pacs: dict[str, int] | None = None,
) -> None:
    record = {
        "since": since,
        "since_utc": utc_stamp(since),
        "run_id": run_id,
        **({"model": model} if model else {}),
        **({"pacs": pacs} if pacs else {}),
    }
    write_record(store, record, WATERMARKS, f"{name}.json")
