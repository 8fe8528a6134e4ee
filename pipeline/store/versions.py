"""Earlier versions of a case: ``STORE/_previous/<case_id>/<version>/``, each the case group as it was
committed (label map, lineage, signature), kept when the case is overwritten (a new round, a reviewer's
correction) and listed, oldest first, in the committed version's ``previous_versions``.

Retention (``store.keep_versions``, default 3): the newest N previous versions of a case are kept, newest by
that list's order; every other folder of the case under ``_previous/`` is removed when the case is committed,
or by `medsam-engine store clean` when a commit could not remove it.

Images: a previous version keeps no second copy of the image when the version that replaced it was made from
the same input (same ``input_sha256`` in both signatures): its image array ``0`` and the OME multiscales that
describe it are removed and its 'medsam' attributes say ``image_dropped: true`` (the image is that of the next
newer version with the same input hash, which keeps it). A version whose input differs keeps its image.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from medsam_engine.pipeline.store.case_store import CaseStore

log = logging.getLogger(__name__)

PREVIOUS = "_previous"
DEFAULT_KEEP_VERSIONS = 3
IMAGE = "0"  # the image array of a case group (pipeline/store/ome_zarr.py)


def retention(attrs: Mapping[str, Any]) -> int:
    """How many previous versions a case keeps: ``store.keep_versions`` of the configuration recorded in its
    'medsam' attributes, else :data:`DEFAULT_KEEP_VERSIONS`."""
    value = ((attrs.get("config") or {}).get("store") or {}).get("keep_versions")
    return DEFAULT_KEEP_VERSIONS if value is None else max(0, int(value))


def retained(history: list[dict[str, Any]], keep: int) -> list[dict[str, Any]]:
    """The entries of a ``previous_versions`` history (oldest first) that a retention of ``keep`` keeps."""
    return list(history[-keep:]) if keep > 0 else []


def version_name(entry: Mapping[str, Any]) -> str:
    """The folder name of a ``previous_versions`` entry (its ``path`` is relative to the store)."""
    return PurePosixPath(str(entry.get("path", ""))).name


def version_folder(store: CaseStore, case_id: str, name: str) -> Path | PurePosixPath:
    return store.root / PREVIOUS / case_id / name


def version_names(store: CaseStore, case_id: str) -> list[str]:
    """The names of the case's previous versions in the store (hidden entries left out)."""
    return [n for n in store.list_names(store.root / PREVIOUS / case_id) if not n.startswith(".")]


def versions_beyond(store: CaseStore, case_id: str, kept: list[dict[str, Any]]) -> list[str]:
    """The case's previous versions in the store that are not among ``kept`` (history entries)."""
    names = {version_name(entry) for entry in kept}
    return [name for name in version_names(store, case_id) if name not in names]


def same_input(old: Mapping[str, Any], new: Mapping[str, Any]) -> bool:
    """Whether two versions' signatures name the same input (``input_sha256``, known in both)."""
    before = (old.get("signature") or {}).get("input_sha256")
    return before is not None and before == (new.get("signature") or {}).get("input_sha256")


def drop_image(store: CaseStore, folder: Path | PurePosixPath) -> bool:
    """Remove a previous version's image (see the module doc): its root attributes first (no OME multiscales,
    ``image_dropped``), then the array. False when the version holds no image."""
    if IMAGE not in store.list_names(folder):
        return False
    meta = store.read_json(folder / "zarr.json")
    if meta is None:
        return False
    attributes = dict(meta.get("attributes") or {})
    attributes.pop("ome", None)
    attributes["medsam"] = dict(attributes.get("medsam") or {}, image_dropped=True)
    store.write_json(folder / "zarr.json", dict(meta, attributes=attributes))
    store.fs.rm(str(folder / IMAGE), recursive=True)
    return True


def settle_versions(
    store: CaseStore,
    case_id: str,
    *,
    old: Mapping[str, Any],
    new: Mapping[str, Any],
    previous: Path | PurePosixPath,
) -> list[str]:
    """After a commit that replaced ``old`` with ``new`` (both 'medsam' attributes) and kept ``old`` at
    ``previous``: drop its image when the input is the same, and remove the case's versions ``new`` does not
    list; returns the names removed. A failure is logged and leaves the rest to `store clean` (the commit
    itself is done)."""
    removed: list[str] = []
    try:
        kept = list(new.get("previous_versions") or [])
        if same_input(old, new) and PurePosixPath(str(previous)).name in {version_name(e) for e in kept}:
            drop_image(store, previous)
        for name in versions_beyond(store, case_id, kept):
            store.fs.rm(str(version_folder(store, case_id, name)), recursive=True)
            removed.append(name)
    except OSError as exc:
        log.warning("case %s: earlier versions not tidied (%s); `store clean` removes them", case_id, exc)
    return removed
