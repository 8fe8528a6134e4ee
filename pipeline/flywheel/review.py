"""The review round-trip: export the queue in forms people open, import their corrections.

``export_queue`` writes, for every case whose ``review_status`` is "review" or "rejected", worst score first:

    OUT/queue.json                     the order, with each instance's score, route and features
    OUT/nifti/<case_id>.nii.gz         the proposal on the input's own grid (3D Slicer, ITK-SNAP)
    OUT/images/<case_id>_0000.nii.gz   the image on the same grid (one file per channel)
    OUT/zarr/<case_id>.ome.zarr        the case's OME-Zarr group, image + labels (napari)
    OUT/seg/<case_id>.seg.dcm          a DICOM SEG for cases read from a DICOM series
    OUT/report.html                    overlays and scores, worst first
    OUT/cases.csv                      each committed case's files and input (pipeline/export/traceable.py)

``import_corrections`` takes corrected label maps (any format the readers know, matched to the input's grid
physically, or an edited ``<case_id>.ome.zarr``), named by case id or by the input's file stem. Per instance
it records the reviewer, the voxels changed and the Dice between proposal and correction, marks the case
"accepted" and commits it through the store (the proposal is kept under ``_previous/``). Every correction is
read and checked before the first commit, so a bad file imports nothing.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from medsam_engine.pipeline.annotate.quality import box_region, fit_calibration
from medsam_engine.pipeline.core.atomic import write_text_atomic
from medsam_engine.pipeline.core.errors import CaseError, GeometryError, ReadError
from medsam_engine.pipeline.core.geometry import align_to, to_source_grid
from medsam_engine.pipeline.core.metrics import boundary_distance_mm, dice
from medsam_engine.pipeline.core.provenance import utc_stamp
from medsam_engine.pipeline.core.types import CaseAttributes
from medsam_engine.pipeline.export.common import ExportError
from medsam_engine.pipeline.export.dicom_seg import write_case_seg
from medsam_engine.pipeline.export.nifti import save_nifti_checked, write_case_nifti
from medsam_engine.pipeline.export.seg_nrrd import write_case_seg_nrrd
from medsam_engine.pipeline.export.traceable import case_source, case_sources, write_cases_csv
from medsam_engine.pipeline.io.dicom_seg_reader import referenced_series
from medsam_engine.pipeline.io.dicomweb import fetch_seg, find_segs, newest_per_series
from medsam_engine.pipeline.io.formats import stem_of
from medsam_engine.pipeline.io.readers import read_volume
from medsam_engine.pipeline.report.qc import write_review_report
from medsam_engine.pipeline.store.case_store import CaseStore
from medsam_engine.pipeline.store.labels_meta import meanings_from_properties, spec_of
from medsam_engine.pipeline.store.leases import leased
from medsam_engine.pipeline.store.queries import ACCEPTED, review_statuses
from medsam_engine.pipeline.store.records import QUALITY, write_record

log = logging.getLogger(__name__)

QUEUE_STATUSES = ("review", "rejected")
REVIEWED_STAGES = ("reviewed", "manual")  # an instance record's stage once a person has seen it
FORMATS = ("nifti", "seg-nrrd", "zarr", "dicom-seg")


# -- export -----------------------------------------------------------------------------------------------
def review_queue(store: CaseStore) -> list[dict]:
    """The cases waiting for a person, worst first: {case_id, review_status, worst_score, round,
    instances}. A case a person reviewed before lists only the instances added since (from marks:
    pipeline/flywheel/marked_findings.py)."""
    entries = []
    for case_id, attrs in store.all_attributes().items():
        if attrs.review_status not in QUEUE_STATUSES:
            continue
        instances = [
            {
                "label": i["label"],
                "instance": i["instance"],
                "slices": len(i.get("slices", [])),
                **{k: (i.get("quality") or {}).get(k) for k in ("score", "route", "features")},
            }
            for i in attrs.instances
            if i.get("stage") not in REVIEWED_STAGES
        ]
        instances.sort(key=lambda i: i["score"] if i["score"] is not None else 0.0)
        entries.append(
            {
                "case_id": case_id,
                "review_status": attrs.review_status,
                "round": attrs.round,
                "worst_score": attrs.quality.get("worst_score"),
                "instances": instances,
            }
        )
    entries.sort(key=lambda e: (e["worst_score"] if e["worst_score"] is not None else 0.0, e["case_id"]))
    return entries


@dataclass
class QueueExport:
    folder: Path
    cases: list[dict] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    report: Path | None = None


def export_queue(
    store: CaseStore, out_dir: str | Path, *, formats: tuple[str, ...] = FORMATS, limit: int | None = None
) -> QueueExport:
    """Write the review queue (see the module docstring) to ``out_dir``; a format a case cannot take (a SEG
    for a NIfTI input) is noted in ``skipped`` per case and in queue.json."""
    unknown = set(formats) - set(FORMATS)
    if unknown:
        raise ValueError(f"Argument 'formats' must be among {FORMATS}; got {sorted(unknown)}.")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    result = QueueExport(out)
    for rank, entry in enumerate(review_queue(store)[:limit], start=1):
        case_id, files = entry["case_id"], {}
        if "nifti" in formats:
            (out / "nifti").mkdir(exist_ok=True)
            files["labels"] = str(write_case_nifti(store, case_id, out / "nifti").relative_to(out))
            files["images"] = [str(p.relative_to(out)) for p in _write_image(store, case_id, out / "images")]
        if "seg-nrrd" in formats:  # named, coloured segments for 3D Slicer
            (out / "slicer").mkdir(exist_ok=True)
            files["slicer"] = str(_write_seg_nrrd(store, case_id, out / "slicer").relative_to(out))
        if "zarr" in formats:
            files["zarr"] = str(_copy_group(store, case_id, out / "zarr").relative_to(out))
        if "dicom-seg" in formats:
            (out / "seg").mkdir(exist_ok=True)
            try:
                files["seg"] = str(write_case_seg(store, case_id, out / "seg").relative_to(out))
            except ExportError as exc:
                result.skipped[case_id] = f"dicom-seg: {exc.reason}"
        result.cases.append(dict(entry, rank=rank, files=files))
    result.report = write_review_report(store, out / "report.html", result.cases)
    queue = {
        "created_at": utc_stamp(),
        "cases": result.cases,
        "skipped": result.skipped,
        "how_to": "correct slicer/<case_id>.seg.nrrd in 3D Slicer, seg/<case_id>.seg.dcm in OHIF, or "
        "nifti/<case_id>.nii.gz (or the labels of zarr/<case_id>.ome.zarr), then run "
        "`medsam-engine review import STORE <files or folder> --reviewer NAME`",
    }
    write_text_atomic(out / "queue.json", json.dumps(queue, indent=1, default=str))
    _write_cases_csv(store, out, result)
    return result


def _write_cases_csv(store: CaseStore, out: Path, result: QueueExport) -> None:
    """OUT/cases.csv: the exported cases' files (a format a case could not take as its reason) and every
    other committed case as excluded, with why."""
    outputs = {entry["case_id"]: _flat(entry["files"]) for entry in result.cases}
    excluded = {
        case_id: (
            "beyond the export's --limit"
            if status in QUEUE_STATUSES
            else "never routed (no review status)"
            if status is None
            else f"review status is '{status}', not one of {', '.join(QUEUE_STATUSES)}"
        )
        for case_id, status in review_statuses(store).items()
        if case_id not in outputs
    }
    sources = case_sources(store, store.committed_cases())
    write_cases_csv(out, sources, outputs=outputs, skipped=result.skipped, excluded=excluded)


def _flat(files: dict) -> list[str]:
    """A queue entry's files (a path or a list of paths per kind) as one list."""
    return [path for value in files.values() for path in ([value] if isinstance(value, str) else value)]


def _write_image(store: CaseStore, case_id: str, folder: Path) -> list[Path]:
    """The stored image on the input's grid as NIfTI, one file per channel ([] when the store kept none)."""
    image = store.read_image(case_id)
    if image is None:
        return []
    folder.mkdir(parents=True, exist_ok=True)
    geometry = store.attributes(case_id).geometry  # type: ignore[union-attr]
    channels = image[..., None] if image.ndim == 3 else image
    return [
        save_nifti_checked(
            to_source_grid(np.ascontiguousarray(channels[..., c]), geometry),
            geometry.source_affine,
            folder / f"{case_id}_{c:04d}.nii.gz",
            what=f"case {case_id} image channel {c}",
        )
        for c in range(channels.shape[-1])
    ]


def _write_seg_nrrd(store: CaseStore, case_id: str, folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    return write_case_seg_nrrd(store, case_id, folder)


def _copy_group(store: CaseStore, case_id: str, folder: Path) -> Path:
    target = folder / f"{case_id}.ome.zarr"
    if target.exists():
        shutil.rmtree(target)
    folder.mkdir(parents=True, exist_ok=True)
    if store.is_local:
        shutil.copytree(store.case_path(case_id), target)
    else:
        store.fs.get(str(store.case_path(case_id)), str(target), recursive=True)
    return target


# -- import -----------------------------------------------------------------------------------------------
class ReviewImportError(CaseError):
    """A correction cannot be imported (unreadable, on another grid, not matching any case)."""

    stage = "review"


@dataclass
class ImportReport:
    imported: dict[str, dict] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)  # file name -> reason
    already: list[str] = field(
        default_factory=list
    )  # cases that hold this very correction, accepted, already


def _correction_files(paths: list[str | Path]) -> list[Path]:
    files = []
    for path in (Path(p) for p in paths):
        if path.is_dir() and not path.name.endswith(".ome.zarr"):
            files.extend(
                sorted(
                    p
                    for p in path.iterdir()
                    if not p.name.startswith(".") and (p.is_file() or p.name.endswith(".ome.zarr"))
                )
            )
        else:
            files.append(path)
    return files


def _case_for(path: Path, store: CaseStore, cases: list[str]) -> str | None:
    """The case a correction belongs to: its name is the case id, or the stem of the case's input."""
    stem = path.name[: -len(".ome.zarr")] if path.name.endswith(".ome.zarr") else stem_of(path)
    if stem in cases:
        return stem
    owners = [c for c in cases if stem_of((store.manifest(c) or {}).get("image") or "") == stem]
    uid = referenced_series(path) if len(owners) != 1 and path.is_file() else None
    if uid:  # a DICOM SEG names its series, not its file
        owners = [c for c in cases if uid == _input_series(store, c)]
    return owners[0] if len(owners) == 1 else None


def pull_corrections(store: CaseStore, root: str, folder: Path) -> tuple[list[Path], dict[str, str]]:
    """The reviewers' corrections in a PACS: for each committed DICOM case, the newest SEG at the DICOMweb
    service ``root`` that references its series, was not written by this engine and was made after the
    case's proposal, downloaded into ``folder``. Returns (files, case id -> why its SEG was left: older than
    the proposal). SEG times (ContentDate/ContentTime) are compared with the proposal's commit time (UTC)
    as written, with no time zone."""
    series = {}
    for case_id in store.committed_cases():
        uid = _input_series(store, case_id)
        if uid:
            series[uid] = case_id
    files, left = [], {}
    for uid, seg in newest_per_series(find_segs(root), set(series)).items():
        case_id = series[uid]
        proposed = re.sub(r"\D", "", (store.attributes(case_id).committed_at or ""))[:14]
        if seg.made and proposed and seg.made <= proposed:
            left[case_id] = "its newest SEG in the PACS is older than the proposal"
            continue
        files.append(fetch_seg(root, seg, folder / f"{case_id}.dcm"))
    return files, left


def _input_series(store: CaseStore, case_id: str) -> str | None:
    """The SeriesInstanceUID of a DICOM case's input, as its manifest recorded it (for matching only)."""
    return case_source(store, case_id).series_uid or None


def read_correction(path: Path, labels: np.ndarray, attrs: CaseAttributes) -> np.ndarray:
    """A corrected label map on the case's (z, y, x) grid (uint16); ReviewImportError when it cannot be."""
    if path.name.endswith(".ome.zarr"):
        import zarr

        data = np.asarray(zarr.open_group(str(path), mode="r")["labels/medsam/0"][:])
        if data.shape != labels.shape:
            raise ReviewImportError(f"{path.name}: label array {data.shape} is not the case's {labels.shape}")
    else:
        try:
            data = align_to(read_volume(path), attrs.volume(labels), what=f"correction {path.name}")
        except (ReadError, GeometryError) as exc:
            raise ReviewImportError(exc.reason) from exc
    if data.ndim != 3:
        raise ReviewImportError(f"{path.name}: a label map must be one channel; got shape {data.shape}")
    data = np.rint(data) if not np.issubdtype(data.dtype, np.integer) else data
    if data.min() < 0 or data.max() > np.iinfo(np.uint16).max:
        raise ReviewImportError(f"{path.name}: label values must lie in 0..65535")
    return data.astype(np.uint16)


def _instance_region(record: dict, shape: tuple[int, int, int]) -> np.ndarray:
    region = np.zeros(shape, dtype=bool)
    for z, box in zip(record.get("slices", []), record.get("boxes_xyxy", []), strict=False):
        ys, xs = box_region(box, shape[1:])
        region[int(z), ys, xs] = True
    return region


def _rounded(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


def edit_records(
    proposal: np.ndarray,
    correction: np.ndarray,
    instances: list[dict],
    *,
    reviewer: str,
    number: int | None,
    spacing: tuple[float, ...] = (1.0, 1.0, 1.0),
) -> tuple[list[dict], dict]:
    """Instance records with the edit (voxels changed, Dice proposal vs correction, the mean distance between
    their boundaries in mm, reviewer) and a case summary. An instance is compared on the whole map when it is
    its label's only one, else inside its prompt boxes grown by 10 % + 2 px. Labels only the correction has
    become "manual" records. An instance a person reviewed before (sent back with instances added from
    marks) keeps its record when the correction leaves it as it was."""
    counts: dict[int, int] = {}
    for inst in instances:
        counts[int(inst["label"])] = counts.get(int(inst["label"]), 0) + 1
    out = []
    for inst in instances:
        label = int(inst["label"])
        mine, theirs = proposal == label, correction == label
        if counts[label] > 1:
            region = _instance_region(inst, proposal.shape)
            mine, theirs = mine & region, theirs & region
        changed = int(np.logical_xor(mine, theirs).sum())
        if inst.get("stage") in REVIEWED_STAGES and not changed:
            out.append(dict(inst))
            continue
        out.append(
            dict(
                inst,
                reviewer=reviewer,
                edit_voxels=changed,
                edit_dice=round(dice(mine, theirs), 5),
                edit_boundary_mm=_rounded(boundary_distance_mm(mine, theirs, spacing=spacing)),
                proposal_stage=inst.get("stage"),
                stage="reviewed",
            )
        )
    for label in sorted(set(np.unique(correction).tolist()) - set(counts) - {0}):
        drawn = correction == label
        zs = [int(z) for z in np.nonzero(drawn.any(axis=(1, 2)))[0]]
        out.append(
            {
                "label": int(label),
                "instance": 1,
                "prompt_source": "manual",
                "slices": zs,
                "boxes_xyxy": [],
                "predicted_iou": 0.0,
                "voxels": int(drawn.sum()),
                "stage": "manual",
                "round": number or 1,
                "model": "",
                "reviewer": reviewer,
                "edit_voxels": int(drawn.sum()),
                "edit_dice": 0.0,
            }
        )
    values = sorted((set(np.unique(proposal).tolist()) | set(np.unique(correction).tolist())) - {0})
    per_label = {str(v): round(dice(proposal == v, correction == v), 5) for v in values}
    summary = {
        "reviewer": reviewer,
        "reviewed_at": utc_stamp(),
        "round": number,
        "edit_voxels": int((proposal != correction).sum()),
        "edit_dice": round(float(np.mean(list(per_label.values()))), 5) if per_label else 1.0,
        "edit_dice_per_label": per_label,
    }
    return out, summary


def import_corrections(store: CaseStore, paths: list[str | Path], *, reviewer: str) -> ImportReport:
    """Import corrected label maps (see the module docstring); nothing is committed unless every file
    matches a case and reads onto its grid (``errors`` says why per file otherwise)."""
    if not reviewer.strip():
        raise ValueError("Argument 'reviewer' must not be empty.")
    report = ImportReport()
    cases = store.committed_cases()
    planned: dict[str, tuple[np.ndarray, np.ndarray, dict]] = {}
    for path in _correction_files(paths):
        if not path.exists():
            report.errors[path.name] = "no such file or folder"
            continue
        case_id = _case_for(path, store, cases)
        if case_id is None:
            report.errors[path.name] = "matches no committed case (name it <case_id>.nii.gz or as the input)"
            continue
        if case_id in planned:
            report.errors[path.name] = f"a second correction for case {case_id}"
            continue
        proposal, attrs = store.read_labels(case_id)
        try:
            planned[case_id] = (proposal, read_correction(path, proposal, attrs), attrs)
        except ReviewImportError as exc:
            report.errors[path.name] = exc.reason
    if report.errors:
        return report
    for case_id, (proposal, correction, attrs) in planned.items():
        if attrs.review_status == ACCEPTED and np.array_equal(proposal, correction.astype(proposal.dtype)):
            report.already.append(case_id)  # an import run again (after a kill, say): nothing to record twice
            continue
        with leased(store, case_id, run_id=f"review-{reviewer}") as lease:
            if lease is None:
                report.errors[case_id] = "the case is being annotated by a run now; import again when it ends"
                continue
            report.imported[case_id] = _commit_review(store, case_id, proposal, correction, attrs, reviewer)
    return report


def _commit_review(
    store: CaseStore,
    case_id: str,
    proposal: np.ndarray,
    correction: np.ndarray,
    attrs: CaseAttributes,
    reviewer: str,
) -> dict:
    number = attrs.round
    instances, summary = edit_records(
        proposal,
        correction,
        list(attrs.instances),
        reviewer=reviewer,
        number=number,
        spacing=attrs.geometry.spacing,
    )
    names = {
        value: spec_of(meaning)  # names, codes and colours kept as they were
        for value, meaning in meanings_from_properties(store.label_properties(case_id)).items()
    }
    new = {k: v for k, v in attrs.raw.items() if k != "status"}
    new.update(
        instances=instances, review=summary, review_status="accepted", proposal_status=attrs.review_status
    )
    store.commit_case(
        case_id,
        labels=correction,
        attrs=new,
        image=store.read_image(case_id),
        overwrite=True,
        label_names=names,
    )
    log.info(
        "case %s accepted by review: %d voxels changed, Dice %.3f",
        case_id,
        summary["edit_voxels"],
        summary["edit_dice"],
    )
    return {"edit_voxels": summary["edit_voxels"], "edit_dice": summary["edit_dice"]}


# -- calibration data -------------------------------------------------------------------------------------
def review_rows(store: CaseStore) -> tuple[list[dict], list[float]]:
    """(features at proposal time, edit Dice) of every reviewed model proposal in the store."""
    rows, dices = [], []
    for attrs in store.all_attributes().values():
        if attrs.review_status != ACCEPTED:
            continue
        for inst in attrs.instances:
            features = (inst.get("quality") or {}).get("features")
            if features and inst.get("edit_dice") is not None and inst.get("stage") != "manual":
                rows.append(features)
                dices.append(float(inst["edit_dice"]))
    return rows, dices


def calibrate_store(store: CaseStore, *, threshold: float = 0.9) -> dict:
    """Refit the score calibration on all reviews so far and save it (STORE/_quality/calibration.json);
    returns its report, or why there is none yet."""
    rows, dices = review_rows(store)
    calibration = fit_calibration(rows, dices, threshold=threshold)
    if calibration is None:
        good = int(sum(d >= threshold for d in dices))
        result = {
            "calibrated": False,
            "rows": len(rows),
            "good": good,
            "reason": "needs at least 8 reviewed instances with at least 2 of each outcome",
        }
        write_record(store, result, QUALITY, "calibration.json")
        return result
    write_record(store, calibration.to_json(), QUALITY, "calibration.json")
    return {"calibrated": True, **calibration.report}
