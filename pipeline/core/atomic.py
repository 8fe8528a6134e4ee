"""Atomic writes: a file or a folder appears whole under its final name, or not at all.

Every writer in the project goes through these: a hidden sibling (same folder, so the rename stays on one
file system) is written first and renamed into place last; a failure removes it. Readers therefore never see
a half-written file, and a killed writer leaves at most a hidden ``.partial`` sibling behind.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def partial_sibling(path: str | Path) -> Path:
    """A unique hidden name beside ``path`` that keeps its suffixes (writers such as nibabel read them)."""
    path = Path(path)
    return path.with_name(f".{uuid.uuid4().hex[:12]}.partial.{path.name}")


@contextmanager
def atomic_file(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` to write (and check) a file at; on a normal exit it is renamed
    to ``path`` (replacing any older file), on an exception it is removed and ``path`` is left as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = partial_sibling(path)
    try:
        yield temp
        os.replace(temp, path)
    finally:
        if temp.exists():
            temp.unlink()


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` whole or not at all."""
    with atomic_file(path) as temp:
        temp.write_text(text, encoding="utf-8")
    return Path(path)


def write_bytes_atomic(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` whole or not at all."""
    with atomic_file(path) as temp:
        temp.write_bytes(data)
    return Path(path)


def create_exclusive(path: str | Path, text: str) -> bool:
    """Create ``path`` holding ``text`` unless it exists; True when this call created it. The content is
    complete before the name appears (hard link of a finished temporary file), so a reader never sees it
    empty, and of two racing writers exactly one wins."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = partial_sibling(path)
    temp.write_text(text, encoding="utf-8")
    try:
        os.link(temp, path)
        return True
    except FileExistsError:
        return False
    finally:
        temp.unlink()


@contextmanager
def replaced_folder(dest: str | Path) -> Iterator[Path]:
    """Yield an empty hidden staging folder beside ``dest``; on a normal exit it takes ``dest``'s place (an
    older ``dest`` is moved aside first and removed after), on an exception it is removed and ``dest`` is
    left as it was. Readers see the old folder whole or the new one whole, never a mix; a writer killed
    between the two renames leaves the old copy beside it as ``.<name>.<id>.old``."""
    dest = Path(dest)
    staging = dest.with_name(f".{dest.name}.{uuid.uuid4().hex[:8]}.partial")
    staging.mkdir(parents=True)
    try:
        yield staging
        old = dest.with_name(f".{dest.name}.{uuid.uuid4().hex[:8]}.old")
        if dest.exists():
            dest.rename(old)
        staging.rename(dest)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


@contextmanager
def staged_folder(dest: str | Path) -> Iterator[Path]:
    """Yield an empty hidden staging folder beside ``dest``; on a normal exit it is renamed to ``dest``. When
    another writer put ``dest`` in place first, its copy is kept and ours discarded. The staging folder is
    removed whatever happens."""
    dest = Path(dest)
    staging = dest.with_name(f".{dest.name}.{uuid.uuid4().hex[:8]}.partial")
    staging.mkdir(parents=True)
    try:
        yield staging
        with contextlib.suppress(OSError):  # another process finished first: use its copy
            staging.rename(dest)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
