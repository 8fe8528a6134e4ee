"""The model registry: fine-tuned checkpoints with their lineage, metrics, sha256 and promotion.

Each entry is written beside its checkpoint (``CKPT.json``) and, for a store, as STORE/_models/<sha16>.json.
Champion and challenger: a fine-tuned model is registered always, and becomes the store's current model only
when it is promoted (it beat the current model on the held-out reviewed cases, or a person asked for it). The
current model is named in STORE/_models/current.json ({"sha256" | "model": "base", "why", "set_at"});
`medsam-engine model use STORE SHA|base` rolls back (or forward) to any registered model. A store without that
record: the newest registered, promoted entry. A current model whose checkpoint is gone or changed is passed
over for the one before it. The nightly round and `round run` use the current model without any change to
their configuration. No torch here.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from medsam_engine.pipeline.core.atomic import write_text_atomic
from medsam_engine.pipeline.core.provenance import file_sha256, utc_stamp
from medsam_engine.pipeline.store.case_store import CaseStore
from medsam_engine.pipeline.store.records import MODELS, list_records, read_record, write_record

log = logging.getLogger(__name__)

CURRENT = "current.json"  # STORE/_models/current.json: which model is current
BASE = "base"  # the official LiteMedSAM weights, as a choice of `model use`


def register(entry: dict, checkpoint: Path | None, store: CaseStore | None) -> list[str]:
    """Write the registry entry as CKPT.json and, for a store, STORE/_models/<sha16>.json. A fine-tuning run
    that trained nothing (``checkpoint`` None, no sha256) is recorded in the store only, as
    STORE/_models/untrained-<stamp>.json, so the round report shows the attempt and why."""
    written = []
    if checkpoint is not None:
        side = checkpoint.with_name(checkpoint.name + ".json")
        write_text_atomic(side, json.dumps(entry, indent=1, sort_keys=True))
        written.append(str(side))
    if store is not None:
        name = (
            f"{entry['sha256'][:16]}.json"
            if entry.get("sha256")
            else "untrained-" + "".join(c for c in str(entry.get("created_at", "")) if c.isdigit()) + ".json"
        )
        written.append(write_record(store, entry, MODELS, name))
    return written


def registered_models(store: CaseStore) -> list[dict]:
    """Every registry entry of ``store``, oldest first (by their creation stamp)."""
    names = [name for name in list_records(store, MODELS) if name != CURRENT]
    entries = [read_record(store, MODELS, name) or {} for name in names]
    return sorted(entries, key=lambda e: e.get("created_at", ""))


def is_promoted(entry: dict) -> bool:
    """Whether the entry was promoted when it was registered (an entry without a promotion record counts as
    promoted)."""
    return bool((entry.get("promotion") or {}).get("promoted", True))


def _usable(entry: dict) -> bool:
    path = Path(entry.get("checkpoint", ""))
    return path.is_file() and file_sha256(path) == entry.get("sha256")


def current_choice(store: CaseStore) -> dict | None:
    """The record of which model is current (STORE/_models/current.json), or None when none was set."""
    return read_record(store, MODELS, CURRENT)


def current_model(store: CaseStore) -> dict | None:
    """The store's current model's registry entry; None for the official weights (nothing promoted yet, or
    ``model use base``)."""
    entries = registered_models(store)
    choice = current_choice(store)
    if choice is not None:
        if choice.get("model") == BASE:
            return None
        chosen = [e for e in entries if e.get("sha256") == choice.get("sha256")]
        if chosen and _usable(chosen[0]):
            return chosen[0]
        log.warning(
            "the current model %s is gone or changed on disk; using the newest promoted one",
            str(choice.get("sha256"))[:12],
        )
    for entry in reversed(entries):
        if is_promoted(entry) and _usable(entry):
            return entry
    return None


def set_current(store: CaseStore, sha256: str, *, why: str) -> dict | None:
    """Make the registered model whose sha256 starts with ``sha256`` (or ``base``) the current one; returns
    its entry (None for base). ValueError when no single usable registered model matches."""
    if sha256 == BASE:
        write_record(store, {"model": BASE, "why": why, "set_at": utc_stamp()}, MODELS, CURRENT)
        return None
    matches = [e for e in registered_models(store) if e.get("sha256") and str(e["sha256"]).startswith(sha256)]
    if len(matches) != 1:
        known = (
            ", ".join(str(e["sha256"])[:12] for e in registered_models(store) if e.get("sha256")) or "none"
        )
        how_many = "no" if not matches else "more than one"
        raise ValueError(
            f"{how_many} registered model starts with {sha256!r} (registered: {known}; or "
            "'base' for the official weights)"
        )
    entry = matches[0]
    if not _usable(entry):
        raise ValueError(
            f"the checkpoint of model {entry['sha256'][:12]} is gone or changed: {entry.get('checkpoint')}"
        )
    write_record(store, {"sha256": entry["sha256"], "why": why, "set_at": utc_stamp()}, MODELS, CURRENT)
    return entry
