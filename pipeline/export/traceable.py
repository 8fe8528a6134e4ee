"""Traceable exports: which input every exported file comes from, and the names files are given.

Every export folder carries ``cases.csv``, one row per committed case the export considered:

    case_id          the store's case id (a keyed hash)
    output           the file(s) written for the case, relative to the export folder, ``;``-joined (empty when
                     none was)
    input            the case's input as the user gave it
    input_resolved   its absolute path, or its URL
    study_uid        StudyInstanceUID and SeriesInstanceUID of a DICOM case, as its manifest recorded them
    series_uid       from its first file (older manifests: read from that file while it is still there)
    status           written, skipped (the format cannot represent the case) or excluded (left out by design,
                     e.g. not accepted in review)
    reason           why it was skipped or excluded, or what was left out of a written case

Names (``--name-by``): ``id`` names files by case id (no input name leaves the store); ``input`` by the
input's file name without its image suffixes (``ct.nii.gz`` -> ``ct``), for an nnU-Net case its case name
(``brain_0000.nii.gz``, ``brain_0001.nii.gz`` -> ``brain``), for a DICOM series its folder's name
(with ``_s<SeriesNumber>`` when one folder holds several committed series), for a DICOMweb series the last
part of its URL. Characters other than letters, digits, ``-``, ``_`` and ``.`` become ``_``; a name several
cases share (ignoring case, as some file systems do) gets ``_<first 8 characters of the case id>``, so every
name is unique. cases.csv maps each name back to its case and input.
"""

from __future__ import annotations

import csv
import io
import os
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from urllib.parse import urlparse

from medsam_engine.pipeline.core.atomic import write_text_atomic
from medsam_engine.pipeline.io.channels import channel_of
from medsam_engine.pipeline.io.dicom_scan import dicom_ids
from medsam_engine.pipeline.io.formats import stem_of
from medsam_engine.pipeline.store.case_store import CaseStore
from medsam_engine.pipeline.store.inventory import input_given

CASES_CSV = "cases.csv"
COLUMNS = ("case_id", "output", "input", "input_resolved", "study_uid", "series_uid", "status", "reason")
NAME_BY = ("id", "input")
DICOM_KINDS = ("dicom-series", "dicom-multiframe", "dicom-image")  # the manifest kinds of DICOM cases
UNSAFE = re.compile(r"[^A-Za-z0-9._-]")


@dataclass(frozen=True)
class CaseSource:
    """What a case was made from, as its manifest records it: ``given`` the input as the user gave it,
    ``resolved`` its absolute path or URL, ``image`` the local image file or series folder, ``kind`` the
    manifest's kind; the UIDs and SeriesNumber come from the first source file's header of a DICOM series
    ('' otherwise, or when the file is gone); ``channels`` are an nnU-Net case's channel files."""

    given: str
    resolved: str
    image: str
    kind: str
    study_uid: str = ""
    series_uid: str = ""
    series_number: str = ""
    channels: tuple[str, ...] = ()  # an nnU-Net case's channel files, channel 0 first


def case_source(store: CaseStore, case_id: str) -> CaseSource:
    """The case's :class:`CaseSource`; relative paths of manifests written before inputs were recorded
    absolute are taken from the working directory, as every reader of them does."""
    manifest = store.manifest(case_id) or {}
    image = str(manifest.get("image") or "")
    given = input_given(store, case_id)
    resolved = given if "://" in given else os.path.abspath(image) if image else ""
    kind = str(manifest.get("kind") or "")
    if kind not in DICOM_KINDS:
        return CaseSource(given, resolved, image, kind, channels=tuple(manifest.get("channels") or ()))
    recorded = manifest.get("dicom") or {}
    if recorded:  # recorded when the case was read: its files may be gone (a download removed after commit)
        ids = tuple(str(recorded.get(k) or "") for k in ("study_uid", "series_uid", "series_number"))
        return CaseSource(given, resolved, image, kind, *ids)
    files = [str(f) for f in manifest.get("files") or ()]
    return CaseSource(given, resolved, image, kind, *dicom_ids(files[0] if files else image))


def case_sources(store: CaseStore, case_ids: list[str]) -> dict[str, CaseSource]:
    """:func:`case_source` of each case, in the order given."""
    return {case_id: case_source(store, case_id) for case_id in case_ids}


def export_names(sources: dict[str, CaseSource], name_by: str) -> dict[str, str]:
    """The file name (without suffix) of each case under ``name_by`` (see the module doc); unique."""
    if name_by not in NAME_BY:
        raise ValueError(f"Argument 'name_by' must be one of {NAME_BY}; got {name_by!r}.")
    if name_by == "id":
        return {case_id: case_id for case_id in sources}
    folders = Counter(s.image for s in sources.values() if s.kind in DICOM_KINDS and "://" not in s.given)
    bases = {case_id: safe_name(_input_name(s, folders)) or case_id for case_id, s in sources.items()}
    return unique_names(bases)


def _input_name(source: CaseSource, folders: Counter[str]) -> str:
    if "://" in source.given:  # a DICOMweb series or a URL: the last part of its path
        return stem_of(PurePosixPath(urlparse(source.given).path).name)
    named = channel_of(source.channels[0]) if source.channels else None
    if named is not None:  # an nnU-Net case keeps its name (CASE_0000, CASE_0001 -> CASE)
        return named[0]
    if source.kind not in DICOM_KINDS:
        return stem_of(source.image or source.given)
    name = Path(source.image).name
    shared = folders[source.image] > 1 and source.series_number
    return f"{name}_s{source.series_number}" if shared else name


def safe_name(name: str) -> str:
    """``name`` with every character other than letters, digits, '-', '_' and '.' replaced by '_' (and no
    leading or trailing dot)."""
    return UNSAFE.sub("_", name).strip(".")


def unique_names(bases: dict[str, str]) -> dict[str, str]:
    """{case id: name}: a base several cases share (ignoring case) gets ``_<first 8 chars of the id>``, and
    the whole id where even that is shared."""
    shared = Counter(base.lower() for base in bases.values())
    names = {c: b if shared[b.lower()] == 1 else f"{b}_{c[:8]}" for c, b in bases.items()}
    taken = Counter(name.lower() for name in names.values())
    return {c: n if taken[n.lower()] == 1 else f"{bases[c]}_{c}" for c, n in names.items()}


def write_cases_csv(
    out: Path,
    sources: dict[str, CaseSource],
    *,
    outputs: dict[str, list[str]],
    skipped: dict[str, str],
    excluded: dict[str, str],
) -> Path:
    """Write OUT/cases.csv (columns :data:`COLUMNS`) whole: a row per case of ``sources`` the export
    considered (in ``outputs``, ``skipped`` or ``excluded``), in the order of ``sources``. ``outputs``: the
    files written per case, relative to ``out``."""
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(COLUMNS)
    for case_id, source in sources.items():
        files = outputs.get(case_id, [])
        if case_id in excluded:
            status, reason = "excluded", excluded[case_id]
        elif not files and case_id in skipped:
            status, reason = "skipped", skipped[case_id]
        elif files:
            status, reason = "written", skipped.get(case_id, "")
        else:
            continue
        writer.writerow(
            (
                case_id,
                ";".join(files),
                source.given,
                source.resolved,
                source.study_uid,
                source.series_uid,
                status,
                reason,
            )
        )
    return write_text_atomic(out / CASES_CSV, text.getvalue())
