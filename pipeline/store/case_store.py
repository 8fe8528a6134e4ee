"""The mask store: one OME-Zarr 0.5 (zarr v3) group per case, committed last.

Layout::

    STORE/<case_id>.ome.zarr/      image "0" (optional) + labels/medsam/0 (uint16 label map, z, y, x)
        attrs["ome"]               OME-Zarr 0.5 multiscales (axes in mm); labels/medsam has "image-label"
                                   (colours; per label: name, SNOMED CT code where known, review status)
        attrs["medsam"]            geometry, signature, instances (lineage), postprocess, status
    STORE/_staging/                cases being written (local stores); never read as done
    STORE/_previous/<case_id>/     earlier versions (rounds) kept when a case is overwritten: the newest
                                   ``store.keep_versions``, without a second copy of an unchanged image
                                   (pipeline/store/versions.py)
    STORE/_manifest/<case_id>.json what each case is made from: its input as given and its files as absolute
                                   paths (exports copy the inputs into their cases.csv)
    STORE/_errors/<case_id>.json   the reason a case failed, until it succeeds
    STORE/_leases/<case_id>.json   which run works on the case now (pipeline/store/leases.py)
    STORE/_runs/<run_id>.json      what ran, when, with which options and results

A case is done only when its root ``zarr.json`` says ``status: committed``, and that is written last:

* local folders: the case is written under ``_staging/`` and renamed into place (atomic on one file system);
* object stores (``s3://``, through fsspec): no rename exists, so the commit marker is the last object written
  (an S3 PUT is atomic); an overwrite first copies the old version to ``_previous/`` and removes its marker.

Either way a killed writer leaves nothing that readers, exports or resume take as done. One writer per shard.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
import shutil
import time
import uuid
from enum import Enum
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any, cast

import numpy as np

from medsam_engine.pipeline.core.atomic import create_exclusive, write_text_atomic
from medsam_engine.pipeline.core.errors import StoreConflictError
from medsam_engine.pipeline.core.processes import MACHINE, process_tag, tagged_process_gone
from medsam_engine.pipeline.core.provenance import utc_stamp, version_id
from medsam_engine.pipeline.core.types import CaseAttributes, CaseIds
from medsam_engine.pipeline.store.leases import conditional_put
from medsam_engine.pipeline.store.ome_zarr import STATUS_COMMITTED, write_case_group, write_local_group
from medsam_engine.pipeline.store.versions import (
    PREVIOUS,
    retained,
    retention,
    settle_versions,
    version_folder,
)

if TYPE_CHECKING:
    import zarr
    from zarr.storage import FsspecStore

CASE_SUFFIX = ".ome.zarr"
STAGING = "_staging"


class _Unread(Enum):
    UNREAD = 0  # commit_case reads the case's committed attributes itself


UNREAD = _Unread.UNREAD
LABELS_PATH = "labels/medsam"


class CaseStore:
    """A folder (local path or fsspec URL such as ``s3://bucket/store``) of committed cases and records.

    ``root`` is the store's path inside ``fs`` (a ``Path`` for local stores). Remote credentials and
    endpoints come from ``storage_options`` or the usual environment (``AWS_ENDPOINT_URL`` and friends).
    """

    def __init__(self, root: str | Path, *, storage_options: dict[str, Any] | None = None) -> None:
        import fsspec

        self.url = str(root)
        self.storage_options = dict(storage_options or {})
        self.fs, path = fsspec.core.url_to_fs(self.url, **self.storage_options)
        protocols = (self.fs.protocol,) if isinstance(self.fs.protocol, str) else tuple(self.fs.protocol)
        self.is_local = "file" in protocols
        self.protocol = protocols[0]
        local = str(root)[len("file://") :] if str(root).startswith("file://") else root
        self.root: Path | PurePosixPath = Path(local) if self.is_local else PurePosixPath(path)

    # -- file primitives (local or remote) --------------------------------------------------------------
    def read_json(self, path: PurePosixPath | Path) -> dict[str, Any] | None:
        """A JSON record, or None when it does not exist."""
        try:
            return cast(dict[str, Any], json.loads(self.fs.cat_file(str(path))))
        except FileNotFoundError:
            return None

    def write_json(self, path: PurePosixPath | Path, data: dict[str, Any]) -> None:
        """Write a JSON record whole: a temporary file renamed into place (local), one PUT (object stores)."""
        text = json.dumps(data, indent=1, sort_keys=True, default=str)
        if not self.is_local:
            self.fs.pipe_file(str(path), text.encode())  # one PUT: readers see all of it or nothing
            return
        write_text_atomic(Path(path), text)

    def list_names(self, path: PurePosixPath | Path) -> list[str]:
        """Names (not paths) directly under ``path``; [] when it does not exist."""
        try:
            kwargs = {} if self.is_local else {"refresh": True}
            found = self.fs.ls(str(path), detail=False, **kwargs)
            return sorted(PurePosixPath(p.rstrip("/")).name for p in found)
        except FileNotFoundError:
            return []

    def _zarr_target(self, path: PurePosixPath | Path, *, read_only: bool) -> str | FsspecStore:
        if self.is_local:
            return str(path)
        from zarr.storage import FsspecStore

        return FsspecStore.from_url(
            f"{self.protocol}://{path}", storage_options=self.storage_options, read_only=read_only
        )

    # -- identity -----------------------------------------------------------------------------------
    def id_key(self) -> bytes:
        """The key of the case-id hash: $MEDSAM_ENGINE_ID_KEY, else a random key kept in the store."""
        env = os.environ.get("MEDSAM_ENGINE_ID_KEY")
        if env:
            return env.encode()
        path = self.root / "_key"
        if not self.is_local:
            if not self.fs.exists(str(path)):
                # a conditional PUT: of two runs creating the key at once, exactly one writes it
                conditional_put(self.fs, str(path), secrets.token_hex(32).encode())
            return bytes(self.fs.cat_file(str(path))).strip()
        path = Path(path)
        if not path.exists():
            create_exclusive(path, secrets.token_hex(32))  # first writer wins; never replace an existing key
        return path.read_text().strip().encode()

    def case_id(self, identity: str) -> str:
        """A keyed hash of what identifies a case (content hash, series UID): no PHI survives it."""
        return hmac.new(self.id_key(), identity.encode(), hashlib.sha256).hexdigest()[:16]

    def cache_dir(self) -> Path:
        """Where discovery unpacks archives and downloads: STORE/_cache for a local store; for a remote one
        $MEDSAM_ENGINE_CACHE, else ~/.cache/medsam-engine (the readers need local files)."""
        if self.is_local:
            return Path(self.root) / "_cache"
        return Path(os.environ.get("MEDSAM_ENGINE_CACHE") or Path.home() / ".cache" / "medsam-engine")

    def case_ids(self) -> CaseIds:
        """This store's case naming (keyed hash) and cache folder, for discovery (pipeline/io/discover.py)."""
        return CaseIds(case_id=self.case_id, cache=self.cache_dir())

    # -- reading ------------------------------------------------------------------------------------
    def case_path(self, case_id: str) -> Path | PurePosixPath:
        return self.root / f"{case_id}{CASE_SUFFIX}"

    def case_attrs(self, case_id: str) -> dict[str, Any] | None:
        """The case's 'medsam' attributes as stored (JSON) if it is committed, else None; readers that use
        its fields take :meth:`attributes` instead."""
        meta = self.read_json(self.case_path(case_id) / "zarr.json")
        attrs = (meta or {}).get("attributes", {}).get("medsam", {})
        return attrs if attrs.get("status") == STATUS_COMMITTED else None

    def committed_cases(self) -> list[str]:
        ids = [n[: -len(CASE_SUFFIX)] for n in self.list_names(self.root) if n.endswith(CASE_SUFFIX)]
        return [c for c in ids if self.case_attrs(c) is not None]

    def all_attributes(self) -> dict[str, CaseAttributes]:
        """Every committed case's attributes, by case id (sorted), each read once."""
        found = {case_id: self.attributes(case_id) for case_id in self.committed_cases()}
        return {case_id: attrs for case_id, attrs in found.items() if attrs is not None}

    def open_case(self, case_id: str) -> zarr.Group:
        """The committed case's zarr group, read-only; KeyError when the case is not committed."""
        import zarr

        if self.case_attrs(case_id) is None:
            raise KeyError(f"case {case_id} is not committed in {self.url}")
        return zarr.open_group(self._zarr_target(self.case_path(case_id), read_only=True), mode="r")

    def attributes(self, case_id: str) -> CaseAttributes | None:
        """The committed case's attributes as a value, or None when it is not committed."""
        attrs = self.case_attrs(case_id)
        return None if attrs is None else CaseAttributes.from_json(attrs)

    def read_labels(self, case_id: str) -> tuple[np.ndarray, CaseAttributes]:
        """The (z, y, x) uint16 label map and the case's attributes."""
        group = self.open_case(case_id)
        labels = cast("zarr.Array[Any]", group[f"{LABELS_PATH}/0"])
        attrs = cast(dict[str, Any], group.attrs["medsam"])
        return np.asarray(labels[:]), CaseAttributes.from_json(dict(attrs))

    def read_image(self, case_id: str) -> np.ndarray | None:
        """The stored image as (z, y, x) or (z, y, x, c), or None when the store kept no image."""
        group = self.open_case(case_id)
        if "0" not in group:
            return None
        data = np.asarray(cast("zarr.Array[Any]", group["0"])[:])
        return data if data.ndim == 3 else np.moveaxis(data, 0, -1)

    def read_version(self, case_id: str, version: str) -> tuple[np.ndarray, CaseAttributes]:
        """An earlier version's (z, y, x) uint16 label map and attributes (``_previous/<case_id>/<version>``,
        pipeline/store/versions.py); KeyError when the store has no such version."""
        import zarr

        folder = version_folder(self, case_id, version)
        meta = self.read_json(folder / "zarr.json")
        if meta is None:
            raise KeyError(f"case {case_id} has no earlier version {version} in {self.url}")
        group = zarr.open_group(self._zarr_target(folder, read_only=True), mode="r")
        labels = cast("zarr.Array[Any]", group[f"{LABELS_PATH}/0"])
        return np.asarray(labels[:]), CaseAttributes.from_json(dict(meta["attributes"]["medsam"]))

    def label_properties(self, case_id: str) -> list[dict[str, Any]]:
        """The case's OME-Zarr ``image-label.properties`` (one dict per label value)."""
        meta = self.read_json(self.case_path(case_id) / LABELS_PATH / "zarr.json") or {}
        return list(meta.get("attributes", {}).get("ome", {}).get("image-label", {}).get("properties", []))

    def manifest(self, case_id: str) -> dict[str, Any] | None:
        return self.read_json(self.root / "_manifest" / f"{case_id}.json")

    def errors(self) -> dict[str, dict[str, Any]]:
        folder = self.root / "_errors"
        names = [n for n in self.list_names(folder) if n.endswith(".json") and not n.startswith(".")]
        return {n[:-5]: self.read_json(folder / n) or {} for n in names}

    # -- writing ------------------------------------------------------------------------------------
    def write_manifest(self, case_id: str, record: dict[str, Any]) -> None:
        self.write_json(self.root / "_manifest" / f"{case_id}.json", record)

    def write_run(self, run_id: str, record: dict[str, Any]) -> Path | PurePosixPath:
        path = self.root / "_runs" / f"{run_id}.json"
        self.write_json(path, record)
        return path

    def record_error(self, case_id: str, *, stage: str, reason: str, run_id: str) -> None:
        self.write_json(
            self.root / "_errors" / f"{case_id}.json",
            {"case_id": case_id, "stage": stage, "reason": reason, "run_id": run_id, "time": utc_stamp()},
        )

    def commit_case(
        self,
        case_id: str,
        *,
        labels: np.ndarray,
        attrs: dict[str, Any],
        image: np.ndarray | None = None,
        overwrite: bool = False,
        label_names: dict[int, str | dict[str, Any]] | None = None,
        supersedes: str | None = None,
        current: dict[str, Any] | _Unread | None = UNREAD,
        voxels: dict[int, int] | None = None,
        keep_versions: int | None = None,
    ) -> Path | PurePosixPath:
        """Write a case and commit it last; returns its final path.

        ``labels`` is the (z, y, x) label map (stored uint16); ``image`` (z, y, x) or (z, y, x, c); ``attrs``
        the 'medsam' attributes (its 'status' is set here, last). An existing committed case with another
        signature raises StoreConflictError unless ``overwrite``, which keeps the old version under
        _previous/ and lists it in the new version's ``previous_versions``. The open failure of this case and
        of the case it ``supersedes`` (its input's failure to be fetched) are closed. ``current``: the case's
        committed attributes (None: not committed) as a caller that holds the case's lease read them, which
        saves reading them again (a request per case on object stores). ``voxels``: each label value's voxels
        in ``labels``, when the caller knows them exactly (saves a counting pass; recorded as the case's
        ``label_voxels``). ``keep_versions``: how many previous versions the case keeps (default:
        ``store.keep_versions`` of the configuration in ``attrs``, else 3); older ones are removed after the
        commit, and the replaced version keeps no image when its input is the same
        (pipeline/store/versions.py).
        """
        old = self.case_attrs(case_id) if isinstance(current, _Unread) else current
        if old is not None and old.get("signature") != attrs.get("signature") and not overwrite:
            raise StoreConflictError(
                "already committed with a different signature (model, config or input "
                "changed); pass --overwrite to replace it",
                case_id=case_id,
            )
        version = version_id()
        previous = self.root / PREVIOUS / case_id / version
        if old is not None:
            history = list(old.get("previous_versions", []))
            history.append(
                {
                    "path": str(previous.relative_to(self.root)),
                    "signature": old.get("signature"),
                    "committed_at": old.get("committed_at"),
                }
            )
            keep = retention(attrs) if keep_versions is None else keep_versions
            attrs = dict(attrs, previous_versions=retained(history, keep))
        content = {
            "labels": labels,
            "image": image,
            "attrs": attrs,
            "label_names": label_names or {},
            "voxels": voxels,
        }
        final: Path | PurePosixPath
        if self.is_local:
            final = self._commit_local(case_id, content, previous)
        else:
            remote_previous = PurePosixPath(previous) if old is not None else None
            final = self._commit_remote(case_id, content, remote_previous)
        if old is not None:
            settle_versions(self, case_id, old=old, new=attrs, previous=previous)
        self.close_failures(case_id, supersedes)
        return final

    def close_failures(self, *case_ids: str | None) -> None:
        """Remove the error and quarantine records of these cases (a committed case has no open failure;
        pipeline/store/records.py)."""
        for case_id in filter(None, case_ids):
            for folder in ("_errors", "_quarantine"):
                self.remove_json(self.root / folder / f"{case_id}.json")

    def remove_json(self, path: str | Path | PurePosixPath) -> None:
        """Remove a record if it is there."""
        if self.fs.exists(str(path)):
            self.fs.rm_file(str(path))

    def _commit_local(self, case_id: str, content: dict[str, Any], previous: Path | PurePosixPath) -> Path:
        final = Path(self.case_path(case_id))
        staging = Path(self.root) / STAGING / f"{case_id}.{process_tag()}.{uuid.uuid4().hex[:8]}{CASE_SUFFIX}"
        staging.parent.mkdir(parents=True, exist_ok=True)
        try:
            write_local_group(staging, **content)
        except BaseException:  # a full disk, a kill: leave no half-written group behind, not even in staging
            shutil.rmtree(staging, ignore_errors=True)
            raise
        if final.exists():
            Path(previous).parent.mkdir(parents=True, exist_ok=True)
            os.replace(final, previous)
        os.replace(staging, final)
        return final

    def _commit_remote(
        self, case_id: str, content: dict[str, Any], previous: PurePosixPath | None
    ) -> PurePosixPath:
        final = PurePosixPath(self.case_path(case_id))
        if self.list_names(final):
            if previous is not None:  # the old version was committed: keep it
                self.fs.copy(str(final), str(previous), recursive=True)
            self.remove_json(final / "zarr.json")  # un-commit first, then clear
            self.fs.rm(str(final), recursive=True)
        write_case_group(self._zarr_target(final, read_only=False), **content)
        return final


STALE_STAGING_S = 24 * 3600.0  # a staging folder of another machine's writer older than this was left behind


def _stale(path: Path, older_than_s: float) -> bool:
    """Whether the staging folder at ``path`` (``<case>.<process tag>.<id>.ome.zarr``) was left by a killed
    writer: a process of this machine that no longer exists, or (another machine's writer, whose liveness
    cannot be seen from here) one older than ``older_than_s``."""
    parts = path.name.split(".")
    tag = parts[1] if len(parts) >= 3 else ""
    if tag.partition("-")[0] == MACHINE:
        return tagged_process_gone(tag)
    return time.time() - path.stat().st_mtime > older_than_s


def stale_staging(store: CaseStore, *, older_than_s: float = STALE_STAGING_S) -> list[Path]:
    """Staging folders left by killed writers (local stores; see :func:`_stale`); never one of a live writer
    of this machine."""
    folder = Path(store.root) / STAGING
    if not store.is_local or not folder.is_dir():
        return []
    found = []
    for path in folder.iterdir():
        try:
            if _stale(path, older_than_s):
                found.append(path)
        except FileNotFoundError:  # committed meanwhile
            continue
    return found


def remove_stale_staging(store: CaseStore, *, older_than_s: float = STALE_STAGING_S) -> int:
    """Delete the staging folders :func:`stale_staging` finds; returns how many were removed."""
    found = stale_staging(store, older_than_s=older_than_s)
    for path in found:
        shutil.rmtree(path, ignore_errors=True)
    return len(found)
