"""The mask store: one OME-Zarr 0.5 (zarr v3) group per case, committed last by an atomic rename.

Layout::

    STORE/<case_id>.ome.zarr/      image "0" (optional) + labels/medsam/0 (uint16 label map, z, y, x)
        attrs["ome"]               OME-Zarr 0.5 multiscales (axes in mm)
        attrs["medsam"]            geometry, signature, instances (lineage), postprocess, status
    STORE/_staging/                cases being written; never read as done
    STORE/_previous/<case_id>/     earlier versions kept when a case is overwritten
    STORE/_manifest/<case_id>.json what each case is made from (input paths live only here)
    STORE/_errors/<case_id>.json   the reason a case failed, until it succeeds
    STORE/_runs/<run_id>.json      what ran, when, with which options and results

A case is done only when its folder exists under its final name and its status is "committed"; both are
written last, so a killed writer leaves only a staging folder that nothing reads.
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
from pathlib import Path

import numpy as np

from pipeline.errors import StoreConflictError

CASE_SUFFIX = ".ome.zarr"
STATUS_COMMITTED = "committed"


def _write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True, default=str))
    os.replace(tmp, path)


def _multiscales(name: str, axes: list[str], scale: list[float]) -> list[dict]:
    kinds = {"c": "channel", "z": "space", "y": "space", "x": "space"}
    return [{
        "name": name,
        "axes": [{"name": a, "type": kinds[a], **({"unit": "millimeter"} if kinds[a] == "space" else {})}
                 for a in axes],
        "datasets": [{"path": "0", "coordinateTransformations": [{"type": "scale", "scale": scale}]}],
    }]


class CaseStore:
    """A folder of committed cases plus their manifest, errors and runs."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    # -- identity -----------------------------------------------------------------------------------
    def id_key(self) -> bytes:
        """The key of the case-id hash: $MEDSAM_ENGINE_ID_KEY, else a random key kept in the store."""
        env = os.environ.get("MEDSAM_ENGINE_ID_KEY")
        if env:
            return env.encode()
        path = self.root / "_key"
        if not path.exists():
            self.root.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f"._key.{uuid.uuid4().hex}")
            tmp.write_text(secrets.token_hex(32))
            try:
                os.link(tmp, path)  # first writer wins; never replace an existing key
            except FileExistsError:
                pass
            tmp.unlink()
        return path.read_text().strip().encode()

    def case_id(self, identity: str) -> str:
        """A keyed hash of what identifies a case (content hash, series UID): no PHI survives it."""
        return hmac.new(self.id_key(), identity.encode(), hashlib.sha256).hexdigest()[:16]

    # -- reading ------------------------------------------------------------------------------------
    def case_path(self, case_id: str) -> Path:
        return self.root / f"{case_id}{CASE_SUFFIX}"

    def case_attrs(self, case_id: str) -> dict | None:
        """The case's 'medsam' attributes if it is committed, else None."""
        meta = self.case_path(case_id) / "zarr.json"
        if not meta.is_file():
            return None
        attrs = json.loads(meta.read_text()).get("attributes", {}).get("medsam", {})
        return attrs if attrs.get("status") == STATUS_COMMITTED else None

    def committed_cases(self) -> list[str]:
        if not self.root.is_dir():
            return []
        ids = sorted(p.name[: -len(CASE_SUFFIX)] for p in self.root.glob(f"*{CASE_SUFFIX}"))
        return [c for c in ids if self.case_attrs(c) is not None]

    def read_labels(self, case_id: str) -> tuple[np.ndarray, dict]:
        import zarr

        attrs = self.case_attrs(case_id)
        if attrs is None:
            raise KeyError(f"case {case_id} is not committed in {self.root}")
        group = zarr.open_group(str(self.case_path(case_id)), mode="r")
        return np.asarray(group["labels/medsam/0"][:]), attrs

    def manifest(self, case_id: str) -> dict | None:
        path = self.root / "_manifest" / f"{case_id}.json"
        return json.loads(path.read_text()) if path.is_file() else None

    def errors(self) -> dict[str, dict]:
        folder = self.root / "_errors"
        return {p.stem: json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))} if folder.is_dir() else {}

    # -- writing ------------------------------------------------------------------------------------
    def write_manifest(self, case_id: str, record: dict) -> None:
        _write_json(self.root / "_manifest" / f"{case_id}.json", record)

    def write_run(self, run_id: str, record: dict) -> Path:
        path = self.root / "_runs" / f"{run_id}.json"
        _write_json(path, record)
        return path

    def record_error(self, case_id: str, *, stage: str, reason: str, run_id: str) -> None:
        _write_json(self.root / "_errors" / f"{case_id}.json",
                    {"case_id": case_id, "stage": stage, "reason": reason, "run_id": run_id,
                     "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})

    def commit_case(self, case_id: str, *, labels: np.ndarray, attrs: dict, image: np.ndarray | None = None,
                    overwrite: bool = False, label_names: dict[int, str] | None = None) -> Path:
        """Write a case to staging, then rename it into place; returns its final path.

        ``labels`` is the (z, y, x) uint16 label map; ``attrs`` the 'medsam' attributes (its 'status' is
        set here, last). An existing committed case with another signature raises StoreConflictError
        unless ``overwrite``, which moves the old version to _previous/.
        """
        final = self.case_path(case_id)
        old = self.case_attrs(case_id)
        if old is not None and old.get("signature") != attrs.get("signature") and not overwrite:
            raise StoreConflictError("already committed with a different signature (model, config or input "
                                     "changed); pass --overwrite to replace it", case_id=case_id)
        staging = self.root / "_staging" / f"{case_id}-{uuid.uuid4().hex[:8]}{CASE_SUFFIX}"
        staging.parent.mkdir(parents=True, exist_ok=True)
        self._write_group(staging, labels=labels, image=image, attrs=attrs, label_names=label_names or {})
        if final.exists():
            previous = self.root / "_previous" / case_id / f"{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:6]}"
            previous.parent.mkdir(parents=True, exist_ok=True)
            os.replace(final, previous)
        os.replace(staging, final)
        error = self.root / "_errors" / f"{case_id}.json"
        error.unlink(missing_ok=True)
        return final

    @staticmethod
    def _write_group(path: Path, *, labels: np.ndarray, image: np.ndarray | None, attrs: dict,
                     label_names: dict[int, str]) -> None:
        import zarr

        spacing = [float(s) for s in attrs["geometry"]["spacing_zyx_mm"]]
        root = zarr.open_group(str(path), mode="w", zarr_format=3)
        plane = labels.shape[1:]
        if image is not None:
            axes = ["z", "y", "x"] if image.ndim == 3 else ["c", "z", "y", "x"]
            data = image if image.ndim == 3 else np.moveaxis(image, -1, 0)
            chunks = (1, *plane) if image.ndim == 3 else (data.shape[0], 1, *plane)
            root.create_array("0", data=np.ascontiguousarray(data), chunks=chunks)
            scale = spacing if image.ndim == 3 else [1.0, *spacing]
            root.attrs["ome"] = {"version": "0.5", "multiscales": _multiscales("image", axes, scale)}
        label_group = root.create_group("labels")
        label_group.attrs["ome"] = {"version": "0.5", "labels": ["medsam"]}
        medsam = label_group.create_group("medsam")
        medsam.create_array("0", data=labels.astype(np.uint16), chunks=(1, *plane))
        values = sorted(int(v) for v in np.unique(labels) if v != 0)
        rng = np.random.default_rng(7)
        medsam.attrs["ome"] = {
            "version": "0.5",
            "multiscales": _multiscales("medsam", ["z", "y", "x"], spacing),
            "image-label": {
                "version": "0.5",
                "colors": [{"label-value": v, "rgba": [int(c) for c in rng.integers(40, 255, 3)] + [255]}
                           for v in values],
                "properties": [{"label-value": v, "name": label_names.get(v, f"label {v}")} for v in values],
                "source": {"image": "../../"},
            },
        }
        root.attrs["medsam"] = dict(attrs, status=STATUS_COMMITTED)


def remove_stale_staging(store: CaseStore, *, older_than_s: float = 24 * 3600) -> int:
    """Delete staging folders left by killed writers; returns how many were removed."""
    folder = store.root / "_staging"
    removed = 0
    if folder.is_dir():
        for path in folder.iterdir():
            if time.time() - path.stat().st_mtime > older_than_s:
                shutil.rmtree(path, ignore_errors=True)
                removed += 1
    return removed
