"""The model registry: fine-tuned checkpoints with their lineage, metrics and sha256.

Each entry is written beside its checkpoint (``CKPT.json``) and, for a store, as STORE/_models/<sha16>.json.
The store's current model is the newest registered entry whose checkpoint is still there with its sha256; the
nightly round and `round run` use it without any change to their configuration. No torch here.
"""
from __future__ import annotations

import json
from pathlib import Path

from pipeline.core.atomic import write_text_atomic
from pipeline.core.provenance import file_sha256
from pipeline.store.case_store import CaseStore
from pipeline.store.records import MODELS, list_records, read_record, write_record


def register(entry: dict, checkpoint: Path, store: CaseStore | None) -> list[str]:
    """Write the registry entry as CKPT.json and, for a store, STORE/_models/<sha16>.json."""
    side = checkpoint.with_name(checkpoint.name + ".json")
    write_text_atomic(side, json.dumps(entry, indent=1, sort_keys=True))
    written = [str(side)]
    if store is not None:
        written.append(write_record(store, entry, MODELS, f"{entry['sha256'][:16]}.json"))
    return written


def registered_models(store: CaseStore) -> list[dict]:
    """Every registry entry of ``store``, oldest first (by their creation stamp)."""
    entries = [read_record(store, MODELS, name) or {} for name in list_records(store, MODELS)]
    return sorted(entries, key=lambda e: e.get("created_at", ""))


def current_model(store: CaseStore) -> dict | None:
    """The newest registered model of ``store`` whose checkpoint is still there with its sha256."""
    for entry in reversed(registered_models(store)):
        path = Path(entry.get("checkpoint", ""))
        if path.is_file() and file_sha256(path) == entry.get("sha256"):
            return entry
    return None
