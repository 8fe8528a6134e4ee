"""Provenance: the package version, UTC time stamps, version ids and file hashes every record carries."""

from __future__ import annotations

import functools
import hashlib
import time
import uuid
from datetime import datetime, timezone
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

HASH_BLOCK = 1 << 20


@functools.cache
def package_version() -> str:
    """medsam-engine's installed version ("0+unknown" when run from a source tree without metadata); read from
    the package metadata once per process (every case's signature names it)."""
    try:
        return version("medsam-engine")
    except PackageNotFoundError:
        return "0+unknown"


def utc_stamp(when: float | None = None, *, precise: bool = False) -> str:
    """ISO 8601 UTC time of ``when`` (seconds since the epoch; default now): ``2026-12-02T03:16:00Z``, or
    with microseconds when ``precise`` (records that are ordered by their stamp)."""
    if precise:
        moment = datetime.fromtimestamp(time.time() if when is None else when, tz=timezone.utc)
        return moment.isoformat(timespec="microseconds")
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(when))


def version_id() -> str:
    """A sortable unique id for a run or a stored version: local ``YYYYmmddTHHMMSS`` and 6 random hex
    digits."""
    return f"{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:6]}"


def files_sha256(files: list[Path], *, root: Path | None = None) -> str:
    """One sha256 over ``files`` in the given order: their bytes, each preceded by its name relative to
    ``root`` when a root is given (so a folder's layout counts as well as its contents)."""
    digest = hashlib.sha256()
    block = memoryview(bytearray(HASH_BLOCK))  # one buffer read into: no new bytes object per block
    for file in files:
        if root is not None:
            digest.update(str(Path(file).relative_to(root)).encode())
        with open(file, "rb", buffering=0) as handle:
            while size := handle.readinto(block):
                digest.update(block[:size])
    return digest.hexdigest()


def file_sha256(path: str | Path) -> str:
    """The sha256 of one file's bytes."""
    return files_sha256([Path(path)])
