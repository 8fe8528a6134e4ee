"""DICOM SEG export (highdicom, BINARY): one SEG per case that references its source DICOM series.

Only cases read from a single-frame DICOM series can be written: a SEG must reference the images it segments,
so NIfTI, NRRD and 2D inputs are skipped with a reason (export those as NIfTI). Frames are matched to the
source files through the store's geometry (each file's ImagePositionPatient must fall on one slice of the
grid the case was annotated on, with the same orientation and size), never through file order or
InstanceNumber; a source series that changed since annotation (content hash) is refused.

Segments: one per label value present, numbered 1..N in value order; label (name), SNOMED CT category and
type (generic "Tissue" when the name is not known), display colour, and the algorithm type from the lineage:

* MANUAL       every instance of the label was drawn by a person (stage "manual");
* SEMIAUTOMATIC some instance had a person in the loop: a reviewer, a person's prompt or a manual edit;
* AUTOMATIC    otherwise (model output from coarse-mask or detector prompts, unreviewed).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np

from medsam_engine.pipeline.core.atomic import atomic_file
from medsam_engine.pipeline.core.errors import ReadError
from medsam_engine.pipeline.core.types import CaseAttributes, CaseRef, Geometry
from medsam_engine.pipeline.export.common import (
    ExportCheckError,
    ExportError,
    label_map_on_source,
    label_meanings,
)
from medsam_engine.pipeline.io.dicom_header import read_dicom_header
from medsam_engine.pipeline.io.discover import case_content_hash
from medsam_engine.pipeline.store.case_store import CaseStore
from medsam_engine.pipeline.store.labels_meta import LabelMeaning

LPS_FROM_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
# Type 2 patient/study attributes a SEG copies from its source; real archives sometimes omit them, and a
# present-but-empty value is what the standard asks for then (filled on the in-memory headers only).
TYPE2_FROM_SOURCE = (
    "PatientID",
    "PatientName",
    "PatientBirthDate",
    "PatientSex",
    "StudyID",
    "AccessionNumber",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
)
HUMAN_PROMPT_SOURCES = {"user", "user-box", "manual", "manual-box", "human", "person"}
TOLERANCE_MM = 1e-2


def algorithm_type(records: list[dict]) -> str:
    """AUTOMATIC, SEMIAUTOMATIC or MANUAL for one label from its instances' lineage records."""
    manual = [r.get("stage") == "manual" for r in records]
    if records and all(manual):
        return "MANUAL"
    human = any(manual) or any(
        r.get("reviewer") or r.get("prompt_source") in HUMAN_PROMPT_SOURCES for r in records
    )
    return "SEMIAUTOMATIC" if human else "AUTOMATIC"


def _source_files(store: CaseStore, case_id: str, attrs: CaseAttributes) -> list[Path]:
    """The case's source files (the manifest's ``files`` when it lists them, else its image folder), after
    checking that they still hash to the signature's input hash."""
    source_format = attrs.geometry.source_format
    manifest = store.manifest(case_id) or {}
    if source_format != "dicom" or not manifest.get("image"):
        raise ExportError(
            f"source is {source_format or 'unknown'}, not a DICOM series: a SEG "
            "must reference its source images (export it with --format nifti)"
        )
    path = Path(manifest["image"])
    files = tuple(str(f) for f in manifest.get("files") or ())
    if not path.exists() or not all(Path(f).is_file() for f in files):
        raise ExportError("source DICOM series is no longer where the manifest says")
    expected = attrs.signature.get("input_sha256")
    source = CaseRef(case_id=case_id, image=str(path), files=files)
    if expected and case_content_hash(source) != expected:
        raise ExportError("source DICOM series changed since it was annotated (content hash differs)")
    if files:
        return [Path(f) for f in files]
    if path.is_file():
        return [path]
    return sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))


def _slice_of(ds, lps: np.ndarray, shape: tuple[int, int, int]) -> int | None:
    """The slice k of the grid (voxel -> LPS affine ``lps``, source ``shape`` (i, j, k)) that single-frame
    image ``ds`` covers exactly (same size, orientation and an on-grid position), else None."""
    n_i, n_j, n_k = shape
    size = (int(ds.get("Rows", 0)), int(ds.get("Columns", 0)))
    if "ImagePositionPatient" not in ds or "ImageOrientationPatient" not in ds or size != (n_j, n_i):
        return None
    spacing = np.linalg.norm(lps[:3, :3], axis=0)
    orientation = np.asarray(ds.ImageOrientationPatient, dtype=float)
    if not (
        np.allclose(orientation[:3], lps[:3, 0] / spacing[0], atol=1e-3)
        and np.allclose(orientation[3:], lps[:3, 1] / spacing[1], atol=1e-3)
    ):
        return None
    ijk = np.linalg.solve(lps[:3, :3], np.asarray(ds.ImagePositionPatient, dtype=float) - lps[:3, 3])
    k = int(round(ijk[2]))
    off_grid = np.abs(ijk - [0, 0, k]) * spacing
    return k if np.all(off_grid <= TOLERANCE_MM) and 0 <= k < n_k else None


def _frames_on_grid(files: list[Path], geometry: Geometry) -> list:
    """The source datasets (headers only) in slice order k = 0..n-1 of the case's source grid.

    Files are matched by geometry, per series: exactly one series must cover every slice once (so localizers,
    derived images and other series in the same folder are left out, and an ambiguous folder is refused).
    """
    from pydicom.valuerep import format_number_as_ds

    lps = LPS_FROM_RAS @ np.asarray(geometry.source_affine)
    n_k = geometry.source_shape[2]
    series: dict[str, dict[int, list]] = {}
    for file in files:
        try:
            ds = read_dicom_header(file)
        except ReadError:
            continue
        if int(ds.get("NumberOfFrames", 1) or 1) > 1:
            raise ExportError("source is a multi-frame DICOM image; SEG export supports single-frame series")
        k = _slice_of(ds, lps, geometry.source_shape)
        if k is not None:
            series.setdefault(str(ds.get("SeriesInstanceUID", "")), {}).setdefault(k, []).append(ds)
    complete = [s for s in series.values() if len(s) == n_k and all(len(v) == 1 for v in s.values())]
    if len(complete) != 1:
        found = max((len(s) for s in series.values()), default=0)
        raise ExportError(
            f"{len(complete)} series in the source cover the annotated grid (expected 1; the "
            f"largest covers {found} of {n_k} slices once)"
        )
    datasets = [complete[0][k][0] for k in range(n_k)]
    if any("FrameOfReferenceUID" not in ds for ds in datasets):
        raise ExportError("source series has no FrameOfReferenceUID, which a SEG must share with its source")
    # the spacing the engine read from the positions: a SpacingBetweenSlices header that contradicts them
    # (some scanners write one) would be copied into the SEG, which then does not re-read as a volume
    spacing = format_number_as_ds(float(np.linalg.norm(lps[:3, 2])))
    for ds in datasets:
        for keyword in TYPE2_FROM_SOURCE:
            if keyword not in ds:
                setattr(ds, keyword, "")
        if "SpacingBetweenSlices" in ds:
            ds.SpacingBetweenSlices = spacing
    return datasets


def _sct(code: tuple[str, str]):
    import highdicom as hd

    return hd.sr.CodedConcept(value=code[0], scheme_designator="SCT", meaning=code[1])


def _segment_descriptions(case_id: str, meanings: list[LabelMeaning], attrs: CaseAttributes) -> list:
    """One description per label; the tracking UID follows the (case, label) across rounds and re-exports."""
    import highdicom as hd
    from pydicom.sr.codedict import codes

    signature = attrs.signature
    model = str(signature.get("model_sha256", ""))[:16]
    version = f"{model} medsam-engine {signature.get('package_version', '')}".strip()[:64]
    algorithm = hd.AlgorithmIdentificationSequence(
        name="LiteMedSAM", family=codes.cid7162.ArtificialIntelligence, version=version
    )
    descriptions = []
    for number, meaning in enumerate(meanings, start=1):
        records = [r for r in attrs.instances if int(r.get("label", -1)) == meaning.value]
        kind = algorithm_type(records)
        descriptions.append(
            hd.seg.SegmentDescription(
                segment_number=number,
                segment_label=meaning.name[:64],
                segmented_property_category=_sct(meaning.category),
                segmented_property_type=_sct(meaning.property_type),
                algorithm_type=kind,
                algorithm_identification=None if kind == "MANUAL" else algorithm,
                tracking_id=f"label {meaning.value}",
                tracking_uid=_uid(case_id, f"label {meaning.value}"),
                display_color=hd.color.CIELabColor.from_rgb(*meaning.rgb),
            )
        )
    return descriptions


def _expected_frames(labels_zyx: np.ndarray, geometry: Geometry, values: list[int]) -> np.ndarray:
    """(k, rows, cols) segment numbers on the source grid (value v -> its 1-based rank in ``values``)."""
    lut = np.zeros(int(labels_zyx.max()) + 1, dtype=np.uint16)
    lut[values] = np.arange(1, len(values) + 1)
    source_ijk = label_map_on_source(labels_zyx, geometry)  # (i = column, j = row, k = slice)
    return np.ascontiguousarray(np.transpose(lut[source_ijk], (2, 1, 0)))


def _uid(*parts) -> str:
    """A UID derived from ``parts``: re-exporting the same committed case gives the same UIDs."""
    from pydicom.uid import generate_uid

    return str(generate_uid(entropy_srcs=[json.dumps(parts, sort_keys=True, default=str)]))


def write_case_seg(store: CaseStore, case_id: str, out: Path, *, name: str | None = None) -> Path:
    """OUT/<name, default case_id>.seg.dcm: a BINARY SEG referencing the case's source series; read back and
    compared."""
    labels, attrs = store.read_labels(case_id)
    geometry = attrs.geometry
    sources = _frames_on_grid(_source_files(store, case_id, attrs), geometry)
    values = [int(v) for v in np.unique(labels) if v != 0]
    if not values:
        raise ExportError("the label map is empty: a SEG needs at least one segment")
    frames = _expected_frames(labels, geometry, values)
    try:
        path = out / f"{name or case_id}.seg.dcm"
        return _write(store, case_id, path, values=values, attrs=attrs, sources=sources, frames=frames)
    except ExportCheckError:
        raise
    except (ValueError, RuntimeError, TypeError, AttributeError, KeyError, IndexError) as exc:
        raise ExportError(f"DICOM SEG could not be written ({type(exc).__name__}: {exc})") from exc


def _write(store: CaseStore, case_id: str, path: Path, *, values, attrs, sources, frames) -> Path:
    import highdicom as hd

    # highdicom logs, at INFO, the UID of every dataset it copies attributes from: no UID reaches a log
    logging.getLogger("highdicom").setLevel(logging.WARNING)

    signature = attrs.signature
    seg = hd.seg.Segmentation(
        source_images=sources,
        pixel_array=frames.astype(np.uint8 if len(values) < 256 else np.uint16),
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=_segment_descriptions(
            case_id, label_meanings(store, case_id, values, attrs), attrs
        ),
        series_instance_uid=_uid(case_id, signature, attrs.committed_at, "series"),
        series_number=900,
        sop_instance_uid=_uid(case_id, signature, attrs.committed_at, "instance"),
        instance_number=1,
        manufacturer="medsam-engine",
        manufacturer_model_name="LiteMedSAM",
        software_versions=str(signature.get("package_version", "unknown")),
        device_serial_number="0",
        content_label="MEDSAM",
        content_description="LiteMedSAM pre-annotation",
    )
    with atomic_file(path) as temp:
        seg.save_as(str(temp))
        check_seg(temp, sources, frames, attrs.geometry)
    return path


def check_seg(path: Path, sources: list, frames: np.ndarray, geometry: Geometry) -> None:
    """Re-read a SEG with highdicom: per referenced source image, and on its own plane geometry."""
    import highdicom as hd

    seg = hd.seg.segread(str(path))
    uids = [str(ds.SOPInstanceUID) for ds in sources]
    by_reference = seg.get_pixels_by_source_instance(uids, combine_segments=True, relabel=False)
    if not np.array_equal(by_reference, frames):
        raise ExportCheckError(f"{path.name}: frames read back by source reference differ from the store")
    volume = seg.get_volume(combine_segments=True, relabel=False)  # (slice, row, column), LPS affine
    to_source = np.linalg.inv(LPS_FROM_RAS @ np.asarray(geometry.source_affine)) @ np.asarray(volume.affine)
    linear, shift = to_source[:3, :3], to_source[:3, 3]
    step = round(float(linear[2, 0]))  # highdicom may stack the slices in either direction along the normal
    if not (
        np.allclose(linear, [[0, 0, 1], [0, 1, 0], [step, 0, 0]], atol=1e-3)
        and abs(step) == 1
        and np.allclose(shift[:2], 0, atol=1e-3)
        and np.isclose(shift[2], round(shift[2]), atol=1e-3)
    ):
        raise ExportCheckError(f"{path.name}: the SEG's plane geometry does not lie on the source grid")
    slices = round(float(shift[2])) + step * np.arange(volume.array.shape[0])
    inside = slices.min() >= 0 and slices.max() < len(frames)
    if not inside or not np.array_equal(np.asarray(volume.array), frames[slices]):
        raise ExportCheckError(f"{path.name}: the SEG read on its own geometry differs from the store")
