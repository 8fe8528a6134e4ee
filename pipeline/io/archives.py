"""Safe extraction of zip and tar archives into a cache folder.

Nothing is written outside the destination: absolute names, ``..`` parts, links, devices and encrypted
members are refused (each is reported, the rest is extracted). Extraction streams every member through a
byte counter, so a zip bomb stops at ``max_bytes`` (or at ``max_ratio`` times the archive's size) whatever
sizes the archive declares. A finished extraction is renamed into place and reused on the next run.
"""

from __future__ import annotations

import json
import logging
import lzma
import tarfile
import zipfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import IO

from medsam_engine.pipeline.core.atomic import staged_folder
from medsam_engine.pipeline.core.errors import ReadError

log = logging.getLogger(__name__)

ARCHIVE_SUFFIXES = (".zip", ".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz")
REFUSED_FILE = ".refused.json"
BLOCK = 1 << 20


@dataclass(frozen=True)
class ExtractLimits:
    """Bounds on what one archive may expand to (bytes written, members, and expansion ratio)."""

    max_bytes: int = 256 << 30
    max_members: int = 2_000_000
    max_ratio: float = 200.0
    ratio_from_bytes: int = 256 << 20  # the ratio is only checked once this much has been written


def is_archive(path: str | Path) -> bool:
    name = Path(path).name.lower()
    return Path(path).is_file() and name.endswith(ARCHIVE_SUFFIXES)


def safe_member_path(name: str) -> PurePosixPath | None:
    """The member's relative path, or None when it is absolute, climbs out with '..', or is empty."""
    name = name.replace("\\", "/")
    if name.startswith("/") or (len(name) > 1 and name[1] == ":"):
        return None
    parts = [p for p in PurePosixPath(name).parts if p not in ("", ".")]
    if not parts or any(p == ".." for p in parts):
        return None
    return PurePosixPath(*parts)


class _Budget:
    def __init__(self, archive: Path, limits: ExtractLimits) -> None:
        self.archive, self.limits = archive, limits
        self.size = max(1, archive.stat().st_size)
        self.written = 0
        self.members = 0

    def add_member(self) -> None:
        self.members += 1
        if self.members > self.limits.max_members:
            raise ReadError(
                f"{self.archive.name}: more than {self.limits.max_members} members; extraction stopped"
            )

    def add(self, count: int) -> None:
        self.written += count
        if self.written > self.limits.max_bytes:
            raise ReadError(
                f"{self.archive.name}: expands beyond {self.limits.max_bytes} bytes; extraction "
                "stopped (a zip bomb, or raise the limit)"
            )
        ratio = self.written / self.size
        if self.written > self.limits.ratio_from_bytes and ratio > self.limits.max_ratio:
            raise ReadError(
                f"{self.archive.name}: expands more than {self.limits.max_ratio:g} times its "
                "size; extraction stopped (a zip bomb?)"
            )


def _copy(source: IO[bytes], target: Path, budget: _Budget) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target, "wb") as out:
        for block in iter(lambda: source.read(BLOCK), b""):
            budget.add(len(block))
            out.write(block)


def _zip_members(archive: Path) -> Iterator[tuple[str, str, object]]:
    """(name, kind, handle) per member: kind is 'file', 'dir', 'link' or 'encrypted'."""
    with zipfile.ZipFile(archive) as zf:
        for info in zf.infolist():
            mode = (info.external_attr >> 16) & 0o170000
            if info.is_dir():
                yield info.filename, "dir", None
            elif mode == 0o120000:
                yield info.filename, "link", None
            elif info.flag_bits & 0x1:
                yield info.filename, "encrypted", None
            else:
                with zf.open(info) as handle:
                    yield info.filename, "file", handle


def _tar_members(archive: Path) -> Iterator[tuple[str, str, object]]:
    with tarfile.open(archive, "r:*") as tf:
        for member in tf:
            if member.isdir():
                yield member.name, "dir", None
            elif member.issym() or member.islnk():
                yield member.name, "link", None
            elif not member.isfile():
                yield member.name, "special", None
            else:
                handle = tf.extractfile(member)
                yield member.name, "file", handle


REFUSALS = {
    "link": "is a link (links are never extracted; they could point outside the archive)",
    "encrypted": "is encrypted",
    "special": "is a device, pipe or other special file",
    "unsafe": "has an unsafe path (absolute or with '..'); not extracted",
}


def _extract_into(archive: Path, dest: Path, limits: ExtractLimits) -> list[tuple[str, str]]:
    budget = _Budget(archive, limits)
    refused: list[tuple[str, str]] = []
    members = _zip_members(archive) if archive.name.lower().endswith(".zip") else _tar_members(archive)
    for name, kind, handle in members:
        budget.add_member()
        relative = safe_member_path(name)
        label = PurePosixPath(name.replace("\\", "/")).name or "(unnamed)"  # folder names may carry PHI
        if relative is None and kind != "dir":
            refused.append((label, REFUSALS["unsafe"]))
        elif kind in REFUSALS:
            refused.append((label, REFUSALS[kind]))
        elif kind == "dir" and relative is not None:
            (dest / relative).mkdir(parents=True, exist_ok=True)
        elif kind == "file" and relative is not None:
            _copy(handle, dest / relative, budget)  # type: ignore[arg-type]
    return refused


def extract_archive(
    archive: str | Path, dest: str | Path, *, limits: ExtractLimits = ExtractLimits()
) -> tuple[Path, list[tuple[str, str]]]:
    """Extract ``archive`` into the folder ``dest`` (reused when already complete).

    Returns the folder and the refused members as (file name, reason). Raises ReadError when the archive is
    corrupt or exceeds ``limits``; nothing is left behind then.
    """
    archive, dest = Path(archive), Path(dest)
    if (dest / REFUSED_FILE).is_file():
        return dest, [tuple(r) for r in json.loads((dest / REFUSED_FILE).read_text())]
    try:
        with staged_folder(dest) as staging:
            refused = _extract_into(archive, staging, limits)
            (staging / REFUSED_FILE).write_text(json.dumps(refused))
    except ReadError:
        raise
    except (
        zipfile.BadZipFile,
        tarfile.TarError,
        zlib.error,
        lzma.LZMAError,
        EOFError,
        OSError,
        ValueError,
        RuntimeError,
        NotImplementedError,
    ) as exc:
        raise ReadError(
            f"{archive.name}: corrupt or unreadable archive ({type(exc).__name__}: {str(exc)[:160]})"
        ) from exc
    if refused:
        log.warning("%s: %d archive members refused", archive.name, len(refused))
    return dest, [tuple(r) for r in json.loads((dest / REFUSED_FILE).read_text())]
