"""Radiologists' marks in a PACS: a study's GSPS presentation states and TID 1500 measurement reports, listed
by QIDO-RS and fetched by WADO-RS, never an image's pixels.

* :func:`studies_with_marks`: the studies of a service root that hold PR or SR series (QIDO-RS
  ``ModalitiesInStudy``, one query per modality: not every server matches a list of values), with their
  instance counts, the nightly watermark's measure of change.
* :func:`study_marks`: a study's marks as instance URLs. PR instances of a presentation-state class; SR
  instances of the Enhanced, Comprehensive, Comprehensive 3D or Extensible SR class whose header (WADO-RS
  metadata: an SR has no pixel data) names template TID 1500 or the title "Imaging Measurement Report" (DCM
  126000). Other SRs (dose reports, free text, CAD) are never fetched.
* :func:`fetch_marks`: those objects as Part 10 files, and header-only files (position, orientation, spacing,
  size: WADO-RS metadata, no pixel data) of the images they are drawn on in other series of the study, so
  that the marks detector places them through physical coordinates.

A mark's URL carries the keyed hash of its SOP Instance UID as its fragment (``…/instances/<uid>#<key>``),
given by discovery, which holds the store's key. The cache keeps what is fetched under that key and is never
emptied by a run (a SOP instance does not change, so a rerun fetches nothing again)::

    dicomweb-marks/<key>.dcm          a PR or SR fetched by WADO-RS
    dicomweb-marks/<key>.other        an SR of a report class that is not a measurement report (not fetched)
    dicomweb-marks/<key>.images-<n>/  header-only files of the images the mark is drawn on in its n-th
                                      referenced series (fetched for cases of other series; renamed into
                                      place whole)

Messages name the server, never a study; file names carry keyed hashes only.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from medsam_engine.pipeline.core.atomic import atomic_file, staged_folder
from medsam_engine.pipeline.core.errors import ReadError
from medsam_engine.pipeline.io.dicom_header import read_dicom_header
from medsam_engine.pipeline.io.dicomweb import (
    INSTANCE_PATTERN,
    URL_PATTERN,
    answers,
    dicomweb_client,
    query_studies,
)

if TYPE_CHECKING:
    from dicomweb_client.api import DICOMwebClient

log = logging.getLogger(__name__)

MARKS = "dicomweb-marks"
GSPS_CLASSES = frozenset(
    {
        "1.2.840.10008.5.1.4.1.1.11.1",  # grayscale softcopy presentation state
        "1.2.840.10008.5.1.4.1.1.11.2",  # colour
        "1.2.840.10008.5.1.4.1.1.11.3",  # pseudo-colour
        "1.2.840.10008.5.1.4.1.1.11.4",  # blending
    }
)
REPORT_CLASSES = frozenset(
    {
        "1.2.840.10008.5.1.4.1.1.88.22",  # Enhanced SR
        "1.2.840.10008.5.1.4.1.1.88.33",  # Comprehensive SR
        "1.2.840.10008.5.1.4.1.1.88.34",  # Comprehensive 3D SR
        "1.2.840.10008.5.1.4.1.1.88.35",  # Extensible SR
    }
)
MEASUREMENT_TEMPLATE, MEASUREMENT_TITLE = "1500", ("126000", "DCM")
SOP_CLASS, SOP_INSTANCE, SERIES, MODALITY = "00080016", "00080018", "0020000E", "00080060"
# what places an image (pipeline.io's ImagePlane): the only elements a header-only file keeps
PLANE_TAGS = frozenset(
    {
        SOP_CLASS,
        SOP_INSTANCE,
        SERIES,
        MODALITY,
        "00200052",  # FrameOfReferenceUID
        "00200032",  # ImagePositionPatient
        "00200037",  # ImageOrientationPatient
        "00280030",  # PixelSpacing
        "00280010",  # Rows
        "00280011",  # Columns
        "00280008",  # NumberOfFrames
    }
)


def studies_with_marks(root: str, filters: dict[str, str] | None = None) -> dict[str, int | None]:
    """StudyInstanceUID -> number of instances of the studies at ``root`` that hold PR or SR series, under
    the QIDO-RS ``filters`` (a ModalitiesInStudy filter of the caller's must hold as well); ReadError naming
    the server otherwise."""
    wanted = dict(filters or {})
    own = {k: v for k, v in wanted.items() if k not in ("ModalitiesInStudy", "00080061")}
    found: dict[str, int | None] = {}
    for modality in ("PR", "SR"):
        found.update(query_studies(root, {**own, "ModalitiesInStudy": modality}))
    if len(own) < len(wanted):
        also = query_studies(root, wanted)
        found = {uid: count for uid, count in found.items() if uid in also}
    return found


def _first(item: dict[str, Any], tag: str) -> str:
    value = (item.get(tag) or {}).get("Value") or [""]
    return str(value[0]) if not isinstance(value[0], dict) else ""


def _code(item: dict[str, Any], sequence: str) -> tuple[str, str]:
    entries = (item.get(sequence) or {}).get("Value") or [{}]
    return _first(entries[0], "00080100"), _first(entries[0], "00080102")


def is_measurement_report(item: dict[str, Any]) -> bool:
    """Whether an SR's header (DICOM JSON) names template TID 1500 or the measurement report's title."""
    template = _first(((item.get("0040A504") or {}).get("Value") or [{}])[0], "0040DB00")
    return template == MEASUREMENT_TEMPLATE or _code(item, "0040A043") == MEASUREMENT_TITLE


def _listed(
    client: DICOMwebClient, study: str, series: list[tuple[str, str]] | None
) -> list[tuple[str, str, str, str]]:
    """(modality, series, SOP instance, SOP class) of the study's PR and SR instances (QIDO-RS): in the given
    (series UID, modality) pairs, else by a query per modality."""
    fields = [SOP_CLASS, SERIES]
    if series is not None:
        asked = [(m, client.search_for_instances(study, uid, fields=fields)) for uid, m in series]
    else:
        asked = [
            (m, client.search_for_instances(study, search_filters={"Modality": m}, fields=fields))
            for m in ("PR", "SR")
        ]
    return [
        (modality, _first(item, SERIES), _first(item, SOP_INSTANCE), _first(item, SOP_CLASS))
        for modality, items in asked
        for item in items
    ]


def study_marks(
    root: str,
    study: str,
    *,
    key: Callable[[str], str],
    cache: Path,
    series: list[tuple[str, str]] | None = None,
) -> list[str]:
    """The instance URLs (``…#<keyed SOP instance>``, in UID order) of the study's GSPS and TID 1500 SR
    objects (see the module doc); ``key`` is the store's keyed hash, ``cache`` the discovery cache (an SR
    found not to be a measurement report is remembered there); ``series``: the study's PR/SR series as (UID,
    modality) when the caller listed them already. ReadError naming the server when the PACS cannot say."""
    base, client = root.rstrip("/"), dicomweb_client(root)
    kept: dict[str, tuple[str, str]] = {}  # SOP instance -> (series, keyed name)
    unsure: dict[str, list[str]] = {}  # SR series -> instances whose header is to be read
    with answers(root, missing="study not found"):
        for modality, series_uid, sop, sop_class in _listed(client, study, series):
            name = key(f"pacs-mark:{sop}")
            if not (series_uid and sop) or (cache / MARKS / f"{name}.other").exists():
                continue
            if modality == "PR" and sop_class in GSPS_CLASSES:
                kept[sop] = (series_uid, name)
            elif modality == "SR" and sop_class in REPORT_CLASSES:
                if (cache / MARKS / f"{name}.dcm").is_file():
                    kept[sop] = (series_uid, name)
                else:
                    unsure.setdefault(series_uid, []).append(sop)
        for series_uid, sops in unsure.items():
            headers = {_first(i, SOP_INSTANCE): i for i in client.retrieve_series_metadata(study, series_uid)}
            for sop in sops:
                name = key(f"pacs-mark:{sop}")
                if is_measurement_report(headers.get(sop, {})):
                    kept[sop] = (series_uid, name)
                elif sop in headers:
                    (cache / MARKS).mkdir(parents=True, exist_ok=True)
                    (cache / MARKS / f"{name}.other").touch()
    return [
        f"{base}/studies/{study}/series/{series_uid}/instances/{sop}#{name}"
        for sop, (series_uid, name) in sorted(kept.items())
    ]


def marks_digest(urls: tuple[str, ...] | list[str]) -> str:
    """sha256 of the keyed names of a case's marks (``#<key>`` of each URL): a SOP instance never changes, so
    the same marks are the same prompts, told without fetching them."""
    names = sorted(url.rpartition("#")[2] for url in urls)
    return hashlib.sha256("\n".join(names).encode()).hexdigest()


def fetch_marks(
    urls: tuple[str, ...] | list[str], cache: Path, *, own_series: str | None = None
) -> list[str]:
    """The marks at ``urls`` as local paths for the marks detector: each PR/SR file (fetched once, then
    kept) and, per series other than ``own_series`` that a mark is drawn on, a folder of header-only files
    of the images it references there. ReadError naming the server when the PACS cannot send them."""
    paths: list[str] = []
    for url in urls:
        address, _, name = url.partition("#")
        match = INSTANCE_PATTERN.match(address)
        if not match or not name:
            raise ReadError(
                "a mark in the PACS is named by its instance URL and keyed name (…/instances/<uid>#key)"
            )
        root, study = match.group("base").rstrip("/"), match.group("study")
        path = cache / MARKS / f"{name}.dcm"
        if not path.is_file():
            client = dicomweb_client(root)
            with answers(root, missing="mark not found"):
                dataset = client.retrieve_instance(study, match.group("series"), match.group("sop"))
            with atomic_file(path) as temp:
                dataset.save_as(temp, enforce_file_format=True)
        paths.append(str(path))
        try:
            drawn_on = referenced_images(path, study)
        except ReadError:  # an unreadable object: the marks detector names it with its reason
            drawn_on = {}
        for n, (ref_study, ref_series) in enumerate(sorted(drawn_on), start=1):  # n: the same for every case
            if ref_series == own_series:
                continue
            folder = cache / MARKS / f"{name}.images-{n}"
            paths.append(
                str(_image_headers(root, ref_study, ref_series, drawn_on[(ref_study, ref_series)], folder))
            )
    return paths


def referenced_images(path: Path, study: str) -> dict[tuple[str, str], set[str]]:
    """(study, series) -> SOP instances a PR or SR file refers to (a presentation state's referenced
    series, within its own study; an SR's evidence)."""
    ds = read_dicom_header(path)
    found: dict[tuple[str, str], set[str]] = {}
    for series in ds.get("ReferencedSeriesSequence", []):
        images = {str(r.ReferencedSOPInstanceUID) for r in series.get("ReferencedImageSequence", [])}
        found.setdefault((study, str(series.SeriesInstanceUID)), set()).update(images)
    for name in ("CurrentRequestedProcedureEvidenceSequence", "PertinentOtherEvidenceSequence"):
        for evidence in ds.get(name, []):
            where = str(evidence.get("StudyInstanceUID", study))
            for series in evidence.get("ReferencedSeriesSequence", []):
                images = {str(r.ReferencedSOPInstanceUID) for r in series.get("ReferencedSOPSequence", [])}
                found.setdefault((where, str(series.SeriesInstanceUID)), set()).update(images)
    return found


def _image_headers(root: str, study: str, series: str, wanted: set[str], folder: Path) -> Path:
    """Header-only files (the plane elements alone) of the ``wanted`` images of a series, from its WADO-RS
    metadata, in ``folder`` (reused when there: it is renamed into place whole; empty when the PACS does not
    hold the series)."""
    import pydicom
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian

    if folder.is_dir():
        return folder
    client = dicomweb_client(root)
    try:
        with answers(root, missing="series not found"):
            items = client.retrieve_series_metadata(study, series)
    except ReadError as exc:
        if "HTTP 404" not in exc.reason:
            raise
        items = []  # not in this PACS: the marks drawn there are refused with that reason
    with staged_folder(folder) as staging:
        count = 0
        for item in items:
            if _first(item, SOP_INSTANCE) not in wanted:
                continue
            ds = pydicom.Dataset.from_json({k: v for k, v in item.items() if k in PLANE_TAGS})
            ds.file_meta = FileMetaDataset()
            ds.file_meta.MediaStorageSOPClassUID = ds.get("SOPClassUID", "")
            ds.file_meta.MediaStorageSOPInstanceUID = ds.get("SOPInstanceUID", "")
            ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
            count += 1
            ds.save_as(staging / f"{count:05d}.dcm", enforce_file_format=True)
    log.debug("headers of %d images a mark is drawn on fetched (no pixel data)", count)
    return folder


def own_series(url: str) -> str | None:
    """The series UID of a DICOMweb series URL (``…#N`` allowed), else None."""
    match = URL_PATTERN.match(url.partition("#")[0])
    return match.group("series") if match else None
