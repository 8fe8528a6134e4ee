"""DICOM header scanning and series grouping; reads headers only (never pixel data).

A folder of DICOM files becomes groups of files that each make one case: a single-frame series (files
sharing SeriesInstanceUID, orientation and size), a multi-frame file (enhanced CT/MR, cine), or a planar
image without patient geometry (CR, DX, US). Localizers/scouts and derived secondary captures are dropped
unless asked for. UIDs stay in memory for grouping and hashing: they are never logged or put in messages.
"""

from __future__ import annotations

import filecmp
import logging
import os
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

import numpy as np

from medsam_engine.pipeline.io.dicom_header import HeaderError, read_dicom_header
from medsam_engine.pipeline.io.dicom_part10 import (
    FAST_BYTES,
    FAST_MULTI_VALUED,
    Decline,
    part10_values,
    text_value,
)
from medsam_engine.pipeline.io.isolate import IsolatedWorker, WorkerCrash

if TYPE_CHECKING:
    from pydicom import Dataset

log = logging.getLogger(__name__)

HEADER_TAGS = [
    "SOPClassUID",
    "SOPInstanceUID",
    "SeriesInstanceUID",
    "Modality",
    "ImageType",
    "Rows",
    "Columns",
    "NumberOfFrames",
    "SamplesPerPixel",
    "ImageOrientationPatient",
    "ImagePositionPatient",
]
LOCALIZER_TYPES = {"LOCALIZER", "SCOUT", "SCANOGRAM"}
SECONDARY_CAPTURE_PREFIX = "1.2.840.10008.5.1.4.1.1.7"
NOT_ANNOTATED_CLASSES = {
    "1.2.840.10008.5.1.4.1.1.66.4": "segmentation",
    "1.2.840.10008.5.1.4.1.1.481.2": "RT dose",
    "1.2.840.10008.5.1.4.1.1.30": "parametric map",
}
ENHANCED_CLASSES = {
    "1.2.840.10008.5.1.4.1.1.2.1",
    "1.2.840.10008.5.1.4.1.1.2.2",  # enhanced / legacy converted CT
    "1.2.840.10008.5.1.4.1.1.4.1",
    "1.2.840.10008.5.1.4.1.1.4.3",
    "1.2.840.10008.5.1.4.1.1.4.4",  # MR
    "1.2.840.10008.5.1.4.1.1.128.1",
    "1.2.840.10008.5.1.4.1.1.130",  # PET
}
ORIENTATION_TOLERANCE = 1e-3
PARALLEL_FROM = 1000
CHUNK = 200


@dataclass(frozen=True)
class SliceHeader:
    """What grouping needs from one file's header. ``series_uid``/``sop_instance`` are for hashing only."""

    path: str
    sop_class: str
    sop_instance: str
    series_uid: str
    modality: str
    image_type: tuple[str, ...]
    rows: int
    columns: int
    frames: int
    orientation: tuple[float, ...] | None
    position: tuple[float, float, float] | None

    @property
    def is_localizer(self) -> bool:
        return bool(set(self.image_type) & LOCALIZER_TYPES)

    @property
    def is_derived_secondary(self) -> bool:
        derived = self.image_type[:1] == ("DERIVED",)
        if self.sop_class.startswith(SECONDARY_CAPTURE_PREFIX):
            return derived or not self.image_type
        return derived and self.image_type[1:2] == ("SECONDARY",)

    @property
    def is_multiframe(self) -> bool:
        return self.frames > 1 or self.sop_class in ENHANCED_CLASSES

    @property
    def is_planar(self) -> bool:
        """A projection or photo (CR, DX, US, SC...) without patient position/orientation."""
        return self.orientation is None or self.position is None


@dataclass(frozen=True)
class SeriesGroup:
    """Files that make one case. ``identity`` holds UIDs: hash it, never show it. ``frames``: the frames of
    all its files together, as their headers say."""

    kind: str  # "series" | "multiframe" | "planar"
    identity: str
    files: tuple[str, ...]
    modality: str
    frames: int = 1


@dataclass(frozen=True)
class ScanResult:
    headers: list[SliceHeader]
    failures: list[tuple[str, str]]  # (path, reason) for DICOM-looking files whose header cannot be read
    ignored: Counter[str]  # what was skipped and how often: "not an image", "segmentation", ...


def _floats(value: Any, count: int) -> tuple[float, ...] | None:
    try:
        numbers = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        return None
    return numbers if len(numbers) == count and all(np.isfinite(numbers)) else None


def _multi(value: Any) -> list[Any]:
    """A multi-valued element's values: pydicom gives a single value as itself (a str is not its letters)."""
    if not value:
        return []
    return [value] if isinstance(value, str | bytes) else list(value)


def _int(value: Any, default: int) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        return default


# -- the header fast path ---------------------------------------------------------------------------------
# pydicom walks every element of a header in Python, which costs a series' scan about as much as reading
# its pixels; a discovery of a large archive, and the Ray driver's that feeds a GPU node, is mostly that
# (measured: docs/benchmarks.md). The fast path takes the values grouping needs from the first bytes of a
# Part 10 file (pipeline/io/dicom_part10.py) and declines whatever is not plain: then pydicom reads the file,
# with its reasons. Equal to the pydicom path on every test file of pydicom and pydicom-data
# (tests/io/test_dicom_scan_fast.py).


def _fast_header(path: str) -> SliceHeader | str | None:
    """:func:`read_header`'s result from the fast path, or None where it declines (see the notes above)."""
    try:
        with open(path, "rb") as handle:
            data = handle.read(FAST_BYTES)
        found = part10_values(data)
        if found is None:
            return None
        meta_class, raw = found
        texts = {key: text_value(value) for key, value in raw.items() if key not in ("Rows", "Columns")}
        sizes = {
            key: int.from_bytes(raw[key], "little") if len(raw.get(key, b"")) == 2 else 0
            for key in ("Rows", "Columns")
        }
        if min(sizes.values()) <= 0 and (texts.get("SOPClassUID") or meta_class) not in NOT_ANNOTATED_CLASSES:
            return None  # pydicom's reasons for a file without an image size
        frames = texts.pop("NumberOfFrames", "")
        fields = {
            **{
                key: text.split("\\") if key in FAST_MULTI_VALUED and text else text
                for key, text in texts.items()
            },
            **sizes,
            "NumberOfFrames": int(frames) if frames else None,
            "file_meta": SimpleNamespace(MediaStorageSOPClassUID=meta_class),
        }
        return _header_of(fields, path)  # the values as pydicom gives them: the same header by construction
    except (Decline, OSError, ValueError):
        return None


def read_header(path: str) -> SliceHeader | str:
    """One file's header as a SliceHeader, or a short reason it is skipped ("not an image" and the like).

    Raises ValueError with a reason a person understands when the file looks like DICOM but cannot be parsed.
    """
    fast = _fast_header(path)
    if fast is not None:
        return fast
    try:
        ds = read_dicom_header(path, tags=HEADER_TAGS)
    except HeaderError as exc:
        raise ValueError(exc.why) from exc
    try:
        return _header_of(ds, path)
    except ValueError:
        raise
    except Exception as exc:  # values are decoded on access: a corrupt element raises only now (pydicom
        # raises many types then; a bug of ours in _header_of would read as a corrupt header too)
        raise ValueError(f"corrupt DICOM header ({type(exc).__name__}: {str(exc)[:120]})") from exc


def _header_of(ds: Dataset | dict[str, Any], path: str | Path) -> SliceHeader | str:
    """The header fields of a parsed dataset (or why it is skipped); raises ValueError when unusable."""
    import pydicom

    meta_class = getattr(ds.get("file_meta", {}), "MediaStorageSOPClassUID", "")
    sop_class = str(ds.get("SOPClassUID", "") or meta_class)
    if sop_class in NOT_ANNOTATED_CLASSES:
        return NOT_ANNOTATED_CLASSES[sop_class]
    rows, columns = _int(ds.get("Rows"), 0), _int(ds.get("Columns"), 0)
    if rows <= 0 or columns <= 0:
        if not sop_class:
            raise ValueError("no SOP Class and no image size: not a usable DICOM object (corrupt?)")
        name = pydicom.uid.UID(sop_class).name
        if "Image Storage" in name:
            what = name.replace(" Storage", "")
            raise ValueError(f"a {what} object without Rows/Columns (truncated or corrupt)")
        return "not an image"
    position = _floats(ds.get("ImagePositionPatient"), 3)
    return SliceHeader(
        path=str(path),
        sop_class=sop_class,
        sop_instance=str(ds.get("SOPInstanceUID", "") or path),
        series_uid=str(ds.get("SeriesInstanceUID", "") or ""),
        modality=str(ds.get("Modality", "") or "OT"),
        image_type=tuple(str(v).strip().upper() for v in _multi(ds.get("ImageType"))),
        rows=rows,
        columns=columns,
        frames=max(1, _int(ds.get("NumberOfFrames"), 1)),
        orientation=_floats(ds.get("ImageOrientationPatient"), 6),
        position=position,  # type: ignore[arg-type]
    )


def _scan_chunk(paths: list[str]) -> list[tuple[str, SliceHeader | str | None, str | None]]:
    """(path, header or skip reason, failure reason) for each path; runs in a worker process."""
    out: list[tuple[str, SliceHeader | str | None, str | None]] = []
    for path in paths:
        try:
            out.append((path, read_header(path), None))
        except (ValueError, OSError) as exc:
            why = str(exc) if isinstance(exc, ValueError) else f"cannot be read ({exc.strerror})"
            out.append((path, None, why))
    return out


def _scan_in_workers(chunks: list[list[str]], workers: int) -> list[Any]:
    """Chunks scanned by ``workers`` isolated processes (a parser crash loses only its chunk's headers)."""
    import queue
    from concurrent.futures import ThreadPoolExecutor

    idle: queue.Queue[Any] = queue.Queue()
    pool = [IsolatedWorker() for _ in range(workers)]
    for worker in pool:
        idle.put(worker)

    def run(chunk: list[str]) -> list[Any]:
        worker = idle.get()
        try:
            found: list[Any] = worker.call(_scan_chunk, chunk)
            return found
        except WorkerCrash as exc:
            return [(path, None, f"the header parser crashed ({exc.why})") for path in chunk]
        finally:
            idle.put(worker)

    try:
        with ThreadPoolExecutor(max_workers=workers) as threads:
            return [row for rows in threads.map(run, chunks) for row in rows]
    finally:
        for worker in pool:
            worker.close()


def scan_headers(
    paths: Sequence[str | Path], *, workers: int | None = None, parallel_from: int = PARALLEL_FROM
) -> ScanResult:
    """Read the headers of ``paths``; in parallel worker processes from ``parallel_from`` files on."""
    names = [str(p) for p in paths]
    workers = workers or min(8, os.cpu_count() or 1)
    if len(names) >= max(parallel_from, 2) and workers > 1:
        size = max(1, min(CHUNK, -(-len(names) // (4 * workers))))
        chunks = [names[i : i + size] for i in range(0, len(names), size)]
        rows = _scan_in_workers(chunks, min(workers, len(chunks)))
    else:
        rows = _scan_chunk(names)
    headers: list[SliceHeader] = []
    failures: list[tuple[str, str]] = []
    ignored: Counter[str] = Counter()
    for path, header, failure in rows:
        if failure is not None:
            failures.append((path, failure))
        elif isinstance(header, SliceHeader):
            headers.append(header)
        else:
            ignored[str(header)] += 1
    return ScanResult(headers, failures, ignored)


def series_uid_of(path: str | Path) -> str | None:
    """The SeriesInstanceUID of one DICOM file (for matching only, never logged), or None."""
    try:
        header = read_header(str(path))
    except (OSError, ValueError):
        return None
    return header.series_uid if isinstance(header, SliceHeader) and header.series_uid else None


def dicom_ids(path: str | Path) -> tuple[str, str, str]:
    """(StudyInstanceUID, SeriesInstanceUID, SeriesNumber) from a DICOM file's header (pixels not read); ''
    each when the file is gone or not DICOM. Kept in a case's manifest and its exports' cases.csv, never in an
    id, a path or a log line."""
    if not path or not Path(path).is_file():
        return "", "", ""
    try:
        ds = read_dicom_header(path, tags=["StudyInstanceUID", "SeriesInstanceUID", "SeriesNumber"])
    except HeaderError:
        return "", "", ""
    study, series, number = (
        str(ds.get(key, "") or "") for key in ("StudyInstanceUID", "SeriesInstanceUID", "SeriesNumber")
    )
    return study, series, number


def _same_bytes(a: str, b: str) -> bool:
    try:
        return filecmp.cmp(a, b, shallow=False)
    except OSError:
        return False


def _same_orientation(a: tuple[float, ...] | None, b: tuple[float, ...] | None) -> bool:
    if a is None or b is None:
        return a is b
    return bool(np.max(np.abs(np.subtract(a, b))) <= ORIENTATION_TOLERANCE)


def group_series(
    headers: list[SliceHeader], *, keep_localizers: bool = False, keep_derived: bool = False
) -> tuple[list[SeriesGroup], Counter[str]]:
    """Group headers into cases; returns the groups (in a stable order) and counts of what was dropped."""
    dropped: Counter[str] = Counter()
    volumes: dict[tuple[Any, ...], list[SliceHeader]] = {}
    groups: list[SeriesGroup] = []
    instances: dict[str, str] = {}  # SOP Instance UID -> the first file that holds it
    for header in sorted(headers, key=lambda h: h.path):
        first = instances.setdefault(header.sop_instance, header.path)
        if first != header.path:
            if _same_bytes(first, header.path):
                dropped["duplicate instance"] += 1
                continue
            # another file claims the same instance with other content: keep it, so that it fails where it
            # lands (two slices at one position, or its own case) rather than vanish
            log.warning(
                "%s and %s hold the same DICOM instance with different content",
                Path(first).name,
                Path(header.path).name,
            )
        if header.is_localizer and not keep_localizers:
            dropped["localizer"] += 1
            continue
        if header.is_derived_secondary and not keep_derived:
            dropped["derived secondary capture"] += 1
            continue
        if header.is_multiframe or header.is_planar:
            kind = "multiframe" if header.is_multiframe else "planar"
            identity = f"dicom-{kind}:{header.sop_instance}"
            groups.append(SeriesGroup(kind, identity, (header.path,), header.modality, header.frames))
            continue
        key = next(
            (
                k
                for k in volumes
                if k[0] == header.series_uid
                and k[1] == (header.rows, header.columns)
                and _same_orientation(k[2], header.orientation)
            ),
            None,
        )
        if key is None:
            key = (header.series_uid, (header.rows, header.columns), header.orientation)
            volumes[key] = []
        volumes[key].append(header)
    for (uid, size, orientation), members in volumes.items():
        identity = f"dicom-series:{uid}|{size[0]}x{size[1]}|{np.round(orientation, 3).tolist()}"
        paths, frames = tuple(h.path for h in members), sum(h.frames for h in members)
        groups.append(SeriesGroup("series", identity, paths, members[0].modality, frames))
    groups.sort(key=lambda g: g.files[0])
    return groups, dropped
