"""Inputs on the command line -> CaseRefs, paired with coarse masks.

An input is an image file, a folder, a zip/tar archive (extracted safely into STORE/_cache), an fsspec URL
such as s3://bucket/prefix (fetched into STORE/_cache), or DICOMweb: a study or series URL or a service root
(its studies by QIDO-RS). Folders give one case per image file and one case per DICOM series (grouped by
SeriesInstanceUID, orientation and size; localizers and derived secondary captures dropped unless asked
for); DICOMweb gives one case per image series from QIDO-RS alone, downloaded by whoever annotates it
(:func:`materialise`). Files that look like images but cannot be read become cases whose reading raises the
reason, so each is recorded in the store's errors and the batch goes on.

Each case names the cache entries it was unpacked or fetched into (``cached_from``), and discovery pins them
before it extracts or fetches, so that no other run's clean-up removes them meanwhile (pipeline/io/cache.py).

Case ids and series keys are keyed hashes (the store's key): no name, ID, date or UID reaches an id, a
path under the cache, a log line or a message.
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from medsam_engine.pipeline.core.errors import ReadError
from medsam_engine.pipeline.core.provenance import files_sha256
from medsam_engine.pipeline.core.types import CaseIds, CaseRef
from medsam_engine.pipeline.io.archives import ExtractLimits, extract_archive, is_archive
from medsam_engine.pipeline.io.cache import (
    ARCHIVES,
    DICOMWEB_SERIES,
    REMOTE,
    known_digest,
    pin,
    seg_download,
    series_download,
    unpin,
)
from medsam_engine.pipeline.io.channels import channel_cases, channel_of, channels_digest
from medsam_engine.pipeline.io.dicom_scan import (
    PARALLEL_FROM,
    SeriesGroup,
    SliceHeader,
    group_series,
    read_header,
    scan_headers,
    series_uid_of,
)
from medsam_engine.pipeline.io.dicom_seg_reader import referenced_series
from medsam_engine.pipeline.io.dicomweb import (
    INSTANCE_PATTERN,
    NON_IMAGE_MODALITIES,
    fetch_dicomweb,
    fetch_instance,
    find_segs,
    is_service_root,
    list_series,
    newest_per_series,
    query_studies,
)
from medsam_engine.pipeline.io.formats import DICOM, VOLUMES, format_of, stem_of, suffix_of
from medsam_engine.pipeline.io.pacs_marks import fetch_marks, own_series, studies_with_marks, study_marks
from medsam_engine.pipeline.io.readers import has_dicom_marker, mask_folder_files
from medsam_engine.pipeline.io.remote import fetch_remote, is_remote_url

log = logging.getLogger(__name__)

MAX_ARCHIVE_DEPTH = 2
GROUP_KINDS = {"series": "dicom-series", "multiframe": "dicom-multiframe", "planar": "dicom-image"}


@dataclass(frozen=True)
class DiscoveryOptions:
    """How inputs are expanded. ``cache_dir`` defaults to STORE/_cache (archives and DICOMweb downloads)."""

    keep_localizers: bool = False
    keep_derived: bool = False
    cache_dir: str | None = None
    scan_workers: int | None = None
    parallel_from: int = PARALLEL_FROM
    limits: ExtractLimits = field(default_factory=ExtractLimits)
    pacs_query: dict[str, str] = field(default_factory=dict)  # QIDO-RS filters for a DICOMweb service root
    seg_from_pacs: bool = False  # coarse masks of DICOMweb cases: the newest reviewer's SEG in the PACS
    marks_from_pacs: bool = False  # prompts of DICOMweb cases: the marks (GSPS, TID 1500 SR) in their study
    study_marks: bool = False  # DICOMweb cases carry their study's marks where it has any (reviewed cases')


FROM_PACS = "from-pacs"  # --coarse-mask from-pacs: each DICOMweb series' newest SEG in the PACS not made here
PACS_QUERIES = 4  # studies of a service root whose series are listed (QIDO-RS) at once


def content_hash(path: str | Path) -> str:
    """sha256 of a file, or of a folder's files (relative names and bytes, sorted)."""
    path = Path(path)
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return files_sha256(files, root=None if path.is_file() else path)


def case_content_hash(case: CaseRef) -> str:
    """sha256 of what the case reads: its series' files when it lists them, every channel of an nnU-Net
    case (whichever it segments), else its image file or folder (a file's digest from discovery when the
    case carries it); for a DICOMweb series not yet downloaded (:func:`materialise`), the digest an earlier
    download of as many instances had, else OSError."""
    if case.kind == DICOMWEB_SERIES:
        if case.content_sha256:  # an earlier download of as many instances had it (pipeline/io/cache.py)
            return case.content_sha256
        raise OSError("a DICOMweb series has a content hash once it is downloaded")
    if case.content_sha256 and not case.files:
        return case.content_sha256
    if len(case.channels) > 1:
        return channels_digest([content_hash(c) for c in case.channels])
    if case.files:
        root = Path(case.image)
        files = sorted(Path(f) for f in case.files)
        return files_sha256(files, root=root if all(root in f.parents for f in files) else None)
    return content_hash(case.image)


def _cached_in(cases: list[CaseRef], entry: Path) -> list[CaseRef]:
    """``cases`` marked as read from the cache entry ``entry`` (an archive's extraction, a fetched input)."""
    where = os.path.abspath(entry)
    return [replace(case, cached_from=(where, *case.cached_from)) for case in cases]


def _common_folder(files: tuple[str, ...]) -> Path:
    return Path(os.path.commonpath([str(Path(f).parent) for f in files]))


def _visible_files(folder: Path) -> list[Path]:
    """Files under ``folder`` (not hidden), including broken links so that they can be reported."""
    return sorted(
        p
        for p in folder.rglob("*")
        if (p.is_file() or (p.is_symlink() and not p.exists()))
        and not any(part.startswith(".") for part in p.relative_to(folder).parts)
    )


class _Finder:
    """Expands inputs into CaseRefs for one store; see the module doc."""

    def __init__(self, ids: CaseIds, options: DiscoveryOptions) -> None:
        self.case_id, self.options = ids.case_id, options
        self.cache = Path(options.cache_dir) if options.cache_dir else ids.cache

    def error_case(self, identity: str, image: Path, reason: str) -> CaseRef:
        return CaseRef(
            case_id=self.case_id("unreadable:" + identity), image=str(image), kind="unreadable", error=reason
        )

    def file_case(self, path: Path) -> CaseRef:
        try:
            digest = content_hash(path)
            identity = "sha256:" + digest
        except OSError:
            digest, identity = None, "path:" + str(path.resolve())
        return CaseRef(
            case_id=self.case_id(identity),
            image=str(path),
            kind=suffix_of(path).lstrip("."),
            content_sha256=digest,
        )

    def group_case(self, group: SeriesGroup) -> CaseRef:
        return CaseRef(
            case_id=self.case_id(group.identity),
            image=str(_common_folder(group.files)),
            kind=GROUP_KINDS[group.kind],
            series=self.case_id("series|" + group.identity),
            files=group.files,
            frames=group.frames if group.kind == "multiframe" else None,
        )

    def expand(self, given: str | Path, depth: int = 0) -> list[CaseRef]:
        text = str(given)
        if is_service_root(text):
            return self.service_root(text)
        if text.startswith(("http://", "https://")):
            return self.dicomweb(text)
        if is_remote_url(text):
            return self.remote(text, depth)
        path = Path(given)
        if is_archive(path):
            return self.archive(path, depth)
        if path.is_dir():
            return self.folder(path, depth)
        return [self.file_case(path)]  # a missing or odd file: the reader says what is wrong with it

    def archive(self, path: Path, depth: int) -> list[CaseRef]:
        identity = "archive:" + content_hash(path)
        if depth >= MAX_ARCHIVE_DEPTH:
            return [self.error_case(identity, path, f"{path.name}: archive nested too deep; not extracted")]
        dest = self.cache / ARCHIVES / self.case_id(identity)
        pin(self.cache, [f"{ARCHIVES}/{dest.name}"])
        try:
            folder, refused = extract_archive(path, dest, limits=self.options.limits)
        except ReadError as exc:
            unpin(self.cache, [f"{ARCHIVES}/{dest.name}"])  # nothing was left behind
            return [self.error_case(identity, path, exc.reason)]
        cases = [
            self.error_case(f"{identity}:{i}:{name}", path, f"{path.name}: member '{name}' {why}")
            for i, (name, why) in enumerate(refused)
        ]
        return _cached_in(cases + self.folder(folder, depth + 1), dest)

    def folder(self, folder: Path, depth: int) -> list[CaseRef]:
        cases: list[CaseRef] = []
        candidates: list[Path] = []
        ignored: Counter[str] = Counter()
        for path in _visible_files(folder):
            suffix, fmt = suffix_of(path), format_of(path)
            if not path.exists():
                cases.append(self.error_case("path:" + str(path), path, f"{path.name}: a link to nothing"))
            elif is_archive(path):
                cases += self.archive(path, depth)
            elif fmt in VOLUMES:
                cases.append(self.file_case(path))
            elif fmt is DICOM or has_dicom_marker(path):
                candidates.append(path)
            else:
                ignored[suffix or "no suffix"] += 1
        cases += self.dicom(folder, candidates, ignored)
        if not cases:  # an input that yields nothing is reported, not silently skipped
            skipped = ", ".join(f"{n} {what}" for what, n in sorted(ignored.items())) or "none"
            reason = f"{folder.name}: no image or DICOM series found (skipped: {skipped})"
            cases.append(self.error_case("empty:" + str(folder.resolve()), folder, reason))
        return cases

    def dicom(self, folder: Path, files: list[Path], ignored: Counter[str]) -> list[CaseRef]:
        """Cases for the DICOM-looking ``files``; ``ignored`` gains what was skipped and why."""
        options = self.options
        scan = scan_headers(files, workers=options.scan_workers, parallel_from=options.parallel_from)
        groups, dropped = group_series(
            scan.headers, keep_localizers=options.keep_localizers, keep_derived=options.keep_derived
        )
        nearby = tuple(f"{Path(p).name} ({why})" for p, why in scan.failures)
        cases = [replace(self.group_case(g), unreadable_nearby=nearby) for g in groups]
        cases += [
            self.error_case("path:" + str(Path(p).resolve()), Path(p), f"{Path(p).name}: {why}")
            for p, why in scan.failures
        ]
        ignored.update(dropped + scan.ignored)
        if ignored or scan.failures:
            log.info(
                "%s: %d DICOM series/images, %d unreadable files, skipped %s",
                folder.name,
                len(groups),
                len(scan.failures),
                dict(ignored),
            )
        return cases

    def remote(self, url: str, depth: int) -> list[CaseRef]:
        key = self.case_id("remote:" + url)
        dest = self.cache / REMOTE / key
        pin(self.cache, [f"{REMOTE}/{key}"])
        try:
            local = fetch_remote(url, dest, max_bytes=self.options.limits.max_bytes)
        except ReadError as exc:
            unpin(self.cache, [f"{REMOTE}/{key}"])  # nothing was left behind
            return [self.error_case("remote:" + url, dest, exc.reason)]
        return self.superseding(_cached_in(self.expand(local, depth), dest), "remote:" + url)

    def superseding(self, cases: list[CaseRef], identity: str) -> list[CaseRef]:
        """``cases`` marked as replacing the failing case their input gave when it could not be fetched."""
        failed = self.case_id("unreadable:" + identity)
        return [replace(c, supersedes=failed) for c in cases]

    def service_root(self, root: str) -> list[CaseRef]:
        """Every study the PACS lists under the query filters, each fetched as its URL would be (downloads are
        kept in the cache, and committed cases are skipped by their signatures)."""
        filters = dict(self.options.pacs_query)
        identity = "dicomweb-root:" + root + "?" + "&".join(f"{k}={v}" for k, v in sorted(filters.items()))
        try:
            studies = (studies_with_marks if self.options.marks_from_pacs else query_studies)(root, filters)
        except ReadError as exc:
            return [self.error_case(identity, self.cache / "dicomweb", f"DICOMweb service: {exc.reason}")]
        if not studies:
            shown = ", ".join(sorted(filters)) or "none"  # the keys only: values may name a patient
            return [
                self.error_case(
                    identity,
                    self.cache / "dicomweb",
                    f"DICOMweb service: no study {'with marks ' if self.options.marks_from_pacs else ''}"
                    f"matches the query (filters on: {shown})",
                )
            ]
        log.info("DICOMweb service: %d studies match the query", len(studies))
        base = root.rstrip("/")
        with ThreadPoolExecutor(max_workers=PACS_QUERIES) as pool:
            found = list(pool.map(self.dicomweb, [f"{base}/studies/{uid}" for uid in studies]))
        return [case for cases in found for case in cases]

    def dicomweb(self, url: str) -> list[CaseRef]:
        """One case per image series of the study or series at ``url``, found by QIDO-RS only: the series is
        downloaded by whoever annotates the case (:func:`materialise`), a Ray actor on its own node."""
        identity = "dicomweb:" + url
        key = self.case_id(identity)
        try:
            listed = list_series(url)
        except ReadError as exc:
            return [
                self.error_case(
                    identity, self.cache / "dicomweb" / key, f"DICOMweb input {key[:8]}: {exc.reason}"
                )
            ]
        kept = [
            s
            for s in listed
            if s.modality not in NON_IMAGE_MODALITIES and (self.options.keep_localizers or not s.localizer)
        ]
        if not kept:
            dropped = Counter("localizer" if s.localizer else s.modality for s in listed)
            shown = ", ".join(f"{n} {what}" for what, n in sorted(dropped.items()))
            return [
                self.error_case(
                    identity,
                    self.cache / "dicomweb" / key,
                    f"DICOMweb input {key[:8]}: no image series (skipped: {shown})",
                )
            ]
        # "#N": the series' number of instances, so a series that grew on the PACS is downloaded again
        cases = [
            CaseRef(
                case_id=self.case_id("dicomweb-series:" + s.series),
                image=s.url + (f"#{s.instances}" if s.instances else ""),
                kind=DICOMWEB_SERIES,
                series=self.case_id("series|dicomweb-series:" + s.series),
            )
            for s in kept
        ]
        cases = [
            replace(c, content_sha256=known_digest(self.cache, c)) for c in self.superseding(cases, identity)
        ]
        if self.options.marks_from_pacs or self.options.study_marks:
            cases = self.with_pacs_marks(url, listed, cases, required=self.options.marks_from_pacs)
        return self.with_pacs_segs(kept, cases) if self.options.seg_from_pacs else cases

    def with_pacs_marks(
        self, url: str, listed: list[Any], cases: list[CaseRef], *, required: bool = True
    ) -> list[CaseRef]:
        """``cases`` with the marks of their study in the PACS (GSPS and TID 1500 SR instance URLs, from
        QIDO-RS and headers only: pipeline/io/pacs_marks.py); when the study has none, or they cannot be
        listed, each fails with that reason if the marks are ``required`` (its prompts), else is as it was."""
        root = listed[0].url.split("/studies/")[0]
        marks_series = [(s.series, s.modality) for s in listed if s.modality in ("PR", "SR")]
        try:
            marks = study_marks(
                root,
                listed[0].study,
                key=self.case_id,
                cache=self.cache,
                series=None if own_series(url) else marks_series,  # a study URL lists them all
            )
        except ReadError as exc:
            if not required:
                log.warning("DICOMweb input: the study's marks could not be listed: %s", exc.reason)
                return cases
            return [replace(c, kind="unreadable", error=f"marks from the PACS: {exc.reason}") for c in cases]
        if not marks and not required:
            return cases
        if not marks:
            none = "marks from the PACS: the study holds no GSPS presentation state or TID 1500 SR"
            return [replace(c, kind="unreadable", error=none) for c in cases]
        return [replace(c, marks=tuple(marks)) for c in cases]

    def with_pacs_segs(self, listed: list[Any], cases: list[CaseRef]) -> list[CaseRef]:
        """``cases`` (of the ``listed`` series, in order), each with the newest SEG in its study that
        references its series and was not written by this engine (a reviewer's or a model's) as its coarse
        mask, by URL (downloaded with the series); a series without one fails with that reason."""
        root = listed[0].url.split("/studies/")[0]
        try:
            newest = newest_per_series(find_segs(root, study=listed[0].study), {s.series for s in listed})
        except ReadError as exc:
            return [
                replace(case, kind="unreadable", error=f"coarse mask from the PACS: {exc.reason}")
                for case in cases
            ]
        masks = {
            uid: f"{root}/studies/{seg.study}/series/{seg.series}/instances/{seg.sop}"
            for uid, seg in newest.items()
        }
        none = "coarse mask from the PACS: no SEG there references this series (other than this engine's)"
        return [
            _with_mask(case, masks[s.series])
            if s.series in masks
            else replace(case, kind="unreadable", error=none)
            for s, case in zip(listed, cases, strict=True)
        ]


def materialise(case: CaseRef, cache: Path) -> CaseRef:
    """The case as local files: a DICOMweb series (and a coarse mask that is a SEG in the PACS) downloaded
    into ``cache`` (reused when complete) and read as the DICOM series it is; other cases as they are.
    ReadError when the series cannot be fetched (PacsUnavailableError, transient, when the PACS stayed busy)
    or holds no single image stack."""
    if case.kind != DICOMWEB_SERIES:
        return case
    if case.marks:  # the study's marks first: a few small objects, kept in the cache
        url = case.image.partition("#")[0]
        case = replace(case, marks_files=tuple(fetch_marks(case.marks, cache, own_series=own_series(url))))
    folder = fetch_dicomweb(case.image.partition("#")[0], series_download(cache, case))
    scan = scan_headers(_visible_files(folder))
    groups, dropped = group_series(scan.headers)
    if len(groups) != 1:
        skipped = ", ".join(f"{n} {what}" for what, n in sorted(dropped.items())) or "none"
        raise ReadError(
            f"the DICOMweb series holds {len(groups)} image stacks (orientations or sizes "
            f"differ; skipped: {skipped}); annotate it from a folder to split it"
        )
    group = groups[0]
    mask = case.coarse_mask
    if mask and INSTANCE_PATTERN.match(mask):
        mask = str(fetch_instance(mask, seg_download(cache, case.case_id, mask)))  # one file per SEG
    nearby = tuple(f"{Path(p).name} ({why})" for p, why in scan.failures)
    return replace(
        case,
        image=str(_common_folder(group.files)),
        kind=GROUP_KINDS[group.kind],
        files=group.files,
        coarse_mask=mask,
        unreadable_nearby=nearby,
    )


def _seg_masks(folder: Path) -> dict[str, Path]:
    """The DICOM SEG files in a mask folder, by the SeriesInstanceUID they reference (kept in memory only)."""
    found: dict[str, Path] = {}
    for path in sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")):
        if format_of(path) is DICOM or not suffix_of(path) or has_dicom_marker(path):
            uid = referenced_series(path)
            if uid:
                found.setdefault(uid, path)
    return found


def _masks_by_stem(folder: Path) -> dict[str, Path]:
    """A mask folder's files by stem (the first in name order when stems repeat): listed once per run."""
    found: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        found.setdefault(stem_of(path), path)
    return found


def _mask_for(
    image: Path,
    index: int,
    n_inputs: int,
    masks: list[Path],
    case: CaseRef | None = None,
    segs: dict[str, Path] | None = None,
    stems: dict[str, Path] | None = None,
) -> Path | None:
    if not masks:
        return None
    if segs and case is not None and case.files:  # a DICOM SEG that references this very series
        uid = series_uid_of(case.files[0])
        if uid in segs:
            return segs[uid]
    if len(masks) == 1 and masks[0].is_dir():
        stems = _masks_by_stem(masks[0]) if stems is None else stems
        for stem in _mask_stems(image):
            if stem in stems:
                return stems[stem]
        return None
    return masks[index] if len(masks) == n_inputs else None


def _mask_stems(image: Path) -> list[str]:
    """The mask stems that pair with ``image``: its own stem, then (nnU-Net's layout) without a channel
    suffix (``case_0000.nii.gz`` pairs with ``case.nii.gz``)."""
    stem, named = stem_of(image), channel_of(image)
    return [stem] if named is None else [stem, named[0]]


def _unpaired(case: CaseRef, folder: Path, stems: dict[str, Path]) -> CaseRef:
    """The case failing with a reason that names the masks looked for and those the folder holds."""
    wanted = " or ".join(f"{s}.*" for s in _mask_stems(Path(case.image)))
    held = sorted(p.name for p in stems.values())
    more = f" and {len(held) - 6} more" if len(held) > 6 else ""
    listing = ", ".join(held[:6]) + more if held else "nothing"
    return replace(
        case,
        kind="unreadable",
        error=f"no coarse mask in {folder.name} pairs with {Path(case.image).name}: looked for {wanted}; "
        f"the folder holds {listing}",
    )


def discover(
    inputs: Sequence[str | Path],
    ids: CaseIds,
    *,
    coarse_masks: Sequence[str | Path] = (),
    options: DiscoveryOptions | None = None,
) -> list[CaseRef]:
    """CaseRefs for every image under ``inputs``; masks pair by order or, for a mask folder, by file stem.

    ``ids`` names the cases (a keyed hash) and says where archives and downloads are unpacked; a store's
    :meth:`~pipeline.store.case_store.CaseStore.case_ids` gives both. Raises ValueError for unusable
    arguments (mask count); unreadable inputs become failing cases instead.
    """
    options = options or DiscoveryOptions()
    if [str(p) for p in coarse_masks] == [FROM_PACS]:
        options, coarse_masks = replace(options, seg_from_pacs=True), ()
    masks = [Path(p) for p in coarse_masks]
    if masks and not (len(masks) == len(inputs) or (len(masks) == 1 and masks[0].is_dir())):
        raise ValueError(
            f"--coarse-mask takes one mask per input ({len(inputs)}) or one folder; got {len(masks)}"
        )
    finder = _Finder(ids, options)
    found: dict[str, tuple[int, CaseRef]] = {}  # case id -> (index of the first input that holds it, case)
    merged: set[str] = set()
    for index, given in enumerate(inputs):
        for case in finder.expand(given):
            if case.case_id not in found:
                found[case.case_id] = (index, case)
            elif case.kind == GROUP_KINDS["series"] and found[case.case_id][1].kind == case.kind:
                first, earlier = found[case.case_id]  # one series whose files sit in several inputs
                found[case.case_id] = (first, _union(earlier, case))
                merged.add(case.case_id)
            else:
                log.warning("case %s appears more than once in the inputs; keeping the first", case.case_id)
    folder = len(masks) == 1 and masks[0].is_dir()
    segs = _seg_masks(masks[0]) if folder else {}
    stems = _masks_by_stem(masks[0]) if folder else None
    grouped = channel_cases(list(found.values()), finder.case_id, mask_stems=stems)
    found = {case.case_id: (index, case) for index, case in grouped}
    cases = []
    for case_id, (index, case) in found.items():
        case = _one_file_per_instance(case) if case_id in merged else case
        mask = _mask_for(Path(case.image), index, len(inputs), masks, case, segs, stems)
        if mask is None and folder and len(found) == 1 and mask_folder_files(masks[0]):
            mask = masks[0]  # one input, a folder of one mask per structure (TotalSegmentator's output)
        if mask is None and folder and stems is not None and not case.error:
            cases.append(_unpaired(case, masks[0], stems))
            continue
        cases.append(case if mask is None else _with_mask(case, mask))
    if options.marks_from_pacs:  # a local input has no PACS to take marks from
        local = "marks from the PACS: the input is not a DICOMweb study, series or service root"
        cases = [c if c.marks or c.error else replace(c, kind="unreadable", error=local) for c in cases]
    return cases


def _union(first: CaseRef, second: CaseRef) -> CaseRef:
    """One DICOM series from the files of both cases (paths in order, each once)."""
    files = tuple(dict.fromkeys(first.files + second.files))
    nearby = tuple(dict.fromkeys(first.unreadable_nearby + second.unreadable_nearby))
    return replace(
        first, image=str(_common_folder(files)), files=files, content_sha256=None, unreadable_nearby=nearby
    )


def _one_file_per_instance(case: CaseRef) -> CaseRef:
    """A merged series with one file per SOP instance: copies with the same bytes are dropped; copies that
    differ make the case fail with a reason naming both files (which is the right one is for a person)."""
    by_instance: dict[str, list[str]] = {}
    for path in case.files:
        header = read_header(path)
        key = header.sop_instance if isinstance(header, SliceHeader) and header.sop_instance else path
        by_instance.setdefault(key, []).append(path)
    kept, conflicts = [], []
    for paths in by_instance.values():
        digests = {content_hash(p) for p in paths}
        if len(digests) > 1:
            conflicts.append(" and ".join(Path(p).name for p in paths[:2]))
        kept.append(paths[0])
    if conflicts:
        return replace(
            case,
            kind="unreadable",
            error=f"the series' files in several inputs disagree: "
            f"{'; '.join(conflicts[:5])} hold the same DICOM instance "
            "with different content",
        )
    files = tuple(kept)
    log.info(
        "series %s: %d files from several inputs, %d duplicate copies dropped",
        case.case_id[:8],
        len(case.files),
        len(case.files) - len(files),
    )
    return replace(case, image=str(_common_folder(files)), files=files)


def _with_mask(case: CaseRef, mask: str | Path) -> CaseRef:
    return replace(case, coarse_mask=str(mask))
