"""nnU-Net v2 raw dataset export: OUT/imagesTr/<case>_0000.nii.gz, OUT/labelsTr/<case>.nii.gz, dataset.json,
cases.csv.

OUT is the dataset folder itself (name it like ``nnUNet_raw/Dataset501_Chest``), or, with ``dataset_id``,
nnU-Net's raw folder, the dataset going to OUT/Dataset<id>_<name>. The export owns that folder: the whole
dataset is written beside it, checked, and then takes its place, so it never mixes with an older export's
files (labelsTr always holds exactly the cases dataset.json lists). A folder that holds files this engine did
not write is refused (:class:`ExportTargetError`), never overwritten. Images and labels are written on the
input's own grid and affine (as the NIfTI export), so they overlay the source exactly.

Which cases: every committed case whose ``review_status`` attribute is "accepted"; a case without that
attribute (nothing has been reviewed yet) is included too, so a first round can train on pre-annotations.
Cases with another review status are excluded (reported, not an error). The most common modality among the
rest is the dataset's and the first written case fixes the channel count (and, for an nnU-Net input, the
channel names its dataset.json gave); cases that differ are skipped with the reason. Images come from the
store (``store.write_image``) or, when it kept none, from the source the manifest names; every channel of a
multi-channel nnU-Net input from its channel files (the store keeps the channel it segmented). With
``name_by="input"`` such a case keeps its nnU-Net name (``CASE_0000``, ``CASE_0001`` -> ``CASE``).

Labels: nnU-Net wants consecutive values, so the store's values (union over the included cases) are mapped to
1..N in order; dataset.json's "labels" gives the names, and "medsam_label_values" the store value of each.

Case identifiers: the case ids, or with ``name_by="input"`` names made from the inputs
(pipeline/export/traceable.py); dataset.json's "medsam_cases" lists them and "medsam_case_ids" maps each to
its case id, as cases.csv does with the inputs.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import numpy as np

from medsam_engine.pipeline.core.atomic import replaced_folder, write_text_atomic
from medsam_engine.pipeline.core.errors import ReadError
from medsam_engine.pipeline.core.geometry import to_source_grid
from medsam_engine.pipeline.core.provenance import utc_stamp
from medsam_engine.pipeline.core.types import Geometry
from medsam_engine.pipeline.export.common import (
    ExportCheckError,
    ExportError,
    ExportReport,
    ExportTargetError,
    label_map_on_source,
)
from medsam_engine.pipeline.export.nifti import save_nifti_checked
from medsam_engine.pipeline.export.traceable import CASES_CSV, case_sources, export_names
from medsam_engine.pipeline.io.readers import read_volume
from medsam_engine.pipeline.store.case_store import CaseStore
from medsam_engine.pipeline.store.queries import select_cases

MARKER = ".medsam-engine-export"  # in every dataset folder this engine wrote: such a folder may be replaced
DATASET_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")


def _image_channels(store: CaseStore, case_id: str, geometry: Geometry) -> list[np.ndarray]:
    """The case image's channels, each (z, y, x): an nnU-Net case's from its channel files (the store keeps
    the one it segmented), else from the store or, when it kept none, the source named in the manifest."""
    channels = (store.manifest(case_id) or {}).get("channels") or []
    if len(channels) > 1:
        return [_source_channel(str(path), geometry) for path in channels]
    image = store.read_image(case_id)
    if image is None:
        source = (store.manifest(case_id) or {}).get("image")
        try:
            image = read_volume(source).array if source else None
        except ReadError as exc:
            raise ExportError(f"the store kept no image and the source is unreadable ({exc.reason})") from exc
        if image is None or tuple(image.shape[:3]) != tuple(geometry.shape):
            raise ExportError("the store kept no image and the source is missing or no longer matches")
    return [image[..., c] for c in range(image.shape[-1])] if image.ndim == 4 else [image]


def _source_channel(path: str, geometry: Geometry) -> np.ndarray:
    """One channel file of an nnU-Net case as (z, y, x) on the case's grid; ExportError when it cannot be
    read or no longer lies on that grid."""
    name = Path(path).name
    try:
        volume = read_volume(path)
    except ReadError as exc:
        raise ExportError(f"channel {name} of the case is unreadable ({exc.reason})") from exc
    placed = tuple(volume.shape) == tuple(geometry.shape) and np.allclose(
        volume.geometry.affine, geometry.affine, atol=1e-3
    )
    if volume.array.ndim != 3 or not placed:
        raise ExportError(f"channel {name} of the case no longer lies on the case's grid")
    return np.asarray(volume.array)


def _recorded_channel_names(store: CaseStore, case_id: str, channels: int) -> dict[str, str] | None:
    """dataset.json's channel_names from the case's manifest (an nnU-Net case's own), or None."""
    names = (store.manifest(case_id) or {}).get("channel_names") or []
    if len(names) != channels or not all(names):
        return None
    return {str(c): str(name) for c, name in enumerate(names)}


def _channel_names(modality: str, channels: int) -> dict[str, str]:
    if channels == 3:
        return {"0": "R", "1": "G", "2": "B"}
    return {str(c): modality for c in range(channels)}  # "CT" selects nnU-Net's CT normalisation


def _plan(store: CaseStore, report: ExportReport) -> tuple[list[str], dict[int, str]]:
    """The included cases (accepted or unreviewed, of the commonest modality) and each label value's name."""
    attributes = store.all_attributes()
    chosen, report.excluded = select_cases(store, "accepted-or-unrouted", attributes=attributes)
    candidates = {case_id: attributes[case_id].modality for case_id in chosen}
    counts = Counter(candidates.values())
    modality = max(sorted(counts), key=counts.__getitem__) if counts else "OT"
    cases, names = [], {}
    for case_id, case_modality in candidates.items():
        if case_modality != modality:
            report.skipped[case_id] = f"modality {case_modality} differs from the dataset's {modality}"
            continue
        cases.append(case_id)
        for entry in store.label_properties(case_id):
            value = int(entry["label-value"])
            names.setdefault(value, str(entry.get("name") or f"label {value}"))
    return cases, names


def _labels_json(names: dict[int, str]) -> tuple[dict[str, int], dict[str, int], dict[int, int]]:
    """(dataset.json labels, store value per name, store value -> consecutive value)."""
    labels, values, remap = {"background": 0}, {}, {}
    for index, value in enumerate(sorted(names), start=1):
        name = names[value] if names[value] not in labels else f"{names[value]} ({value})"
        labels[name], values[name], remap[value] = index, value, index
    return labels, values, remap


def _write_case(
    name: str,
    labels: np.ndarray,
    image: list[np.ndarray],
    geometry: Geometry,
    out: Path,
    remap: dict[int, int],
) -> list[Path]:
    """Write one case's label file and image channels (both on the source grid) under its identifier
    ``name``; returns the paths."""
    lut = np.zeros(max([int(labels.max()), *remap]) + 1, dtype=np.uint16)
    for value, index in remap.items():
        lut[value] = index
    target = lut[label_map_on_source(labels, geometry)].astype(np.uint8 if len(remap) < 256 else np.uint16)
    written = [
        save_nifti_checked(
            target,
            geometry.source_affine,
            out / "labelsTr" / f"{name}.nii.gz",
            what=f"case {name} labels",
        )
    ]
    for channel, array in enumerate(image):
        data = to_source_grid(np.ascontiguousarray(array), geometry)
        written.append(
            save_nifti_checked(
                data,
                geometry.source_affine,
                out / "imagesTr" / f"{name}_{channel:04d}.nii.gz",
                what=f"case {name} image channel {channel}",
            )
        )
    return written


def dataset_folder(out: Path, dataset_id: int | None, dataset_name: str) -> Path:
    """``out`` itself, or nnU-Net's ``out/Dataset<id, 3 digits>_<name>`` when an id is given."""
    if not DATASET_NAME.match(dataset_name):
        raise ValueError(
            f"Argument 'dataset_name' must be letters, digits, '_' or '-'; got {dataset_name!r}."
        )
    if dataset_id is None:
        return out
    if not 1 <= dataset_id <= 999:
        raise ValueError(f"Argument 'dataset_id' must be 1..999 (nnU-Net's dataset ids); got {dataset_id}.")
    return out / f"Dataset{dataset_id:03d}_{dataset_name}"


def export_nnunet(
    store: CaseStore,
    out: Path,
    *,
    dataset_id: int | None = None,
    dataset_name: str = "MedSAM",
    name_by: str = "id",
) -> ExportReport:
    """Write the dataset (see the module doc) and check dataset.json against its files before it replaces
    an earlier export; ExportTargetError for a folder this engine did not make."""
    target = dataset_folder(Path(out), dataset_id, dataset_name)
    if target.is_dir() and any(target.iterdir()) and not (target / MARKER).is_file():
        raise ExportTargetError(
            f"{target} holds files that no nnunet export of medsam-engine wrote; give a new "
            "or empty folder, or one an earlier nnunet export made"
        )
    with replaced_folder(target) as staging:
        report = _write_dataset(store, staging, dataset_name, name_by)
        write_text_atomic(staging / MARKER, json.dumps({"store": store.url, "written_at": utc_stamp()}))
    report.written = [str(target / Path(p).relative_to(staging)) for p in report.written]
    report.cases_csv = str(target / CASES_CSV)
    return report


def _write_dataset(store: CaseStore, out: Path, name: str, name_by: str) -> ExportReport:
    """Write the dataset and its cases.csv into ``out`` and check dataset.json against the files."""
    report = ExportReport(format="nnunet")
    sources = case_sources(store, store.committed_cases())
    identifiers = export_names(sources, name_by)
    cases, names = _plan(store, report)
    labels_json, store_values, remap = _labels_json(names)
    (out / "imagesTr").mkdir(parents=True, exist_ok=True)
    (out / "labelsTr").mkdir(parents=True, exist_ok=True)
    channels, modality, training, channel_names = None, "OT", [], None
    for case_id in cases:
        labels, attrs = store.read_labels(case_id)
        geometry = attrs.geometry
        try:
            image = _image_channels(store, case_id, geometry)
        except ExportError as exc:
            report.skipped[case_id] = exc.reason
            continue
        if channels is not None and len(image) != channels:
            report.skipped[case_id] = f"{len(image)} image channels, the dataset has {channels}"
            continue
        if channels is None:
            channel_names = _recorded_channel_names(store, case_id, len(image))
        channels, modality = len(image), attrs.modality
        files = _write_case(identifiers[case_id], labels, image, geometry, out, remap)
        report.written.extend(str(p) for p in files)
        report.outputs[case_id] = [p.relative_to(out).as_posix() for p in files]
        training.append(case_id)
    dataset = {
        "name": name,
        "description": "LiteMedSAM pre-annotations exported by medsam-engine",
        "channel_names": channel_names or _channel_names(modality, channels or 1),
        "labels": labels_json,
        "numTraining": len(training),
        "file_ending": ".nii.gz",
        "medsam_label_values": store_values,
        "medsam_cases": [identifiers[case_id] for case_id in training],
        "medsam_case_ids": {identifiers[case_id]: case_id for case_id in training},
    }
    path = out / "dataset.json"
    write_text_atomic(path, json.dumps(dataset, indent=1))
    _check_dataset(out, training)
    report.written.append(str(path))
    report.write_cases_csv(out, sources)
    return report


def _check_dataset(out: Path, training: list[str]) -> None:
    """Re-read dataset.json and confirm every listed case (identifier) has its label file and one image per
    channel."""
    dataset = json.loads((out / "dataset.json").read_text())
    channels = len(dataset["channel_names"])
    values = sorted(dataset["labels"].values())
    if dataset["numTraining"] != len(training) or values != list(range(len(values))):
        raise ExportCheckError("nnU-Net dataset.json does not match what was written")
    for identifier in dataset["medsam_cases"]:
        files = [out / "labelsTr" / f"{identifier}.nii.gz"]
        files += [out / "imagesTr" / f"{identifier}_{c:04d}.nii.gz" for c in range(channels)]
        if not all(f.is_file() for f in files):
            raise ExportCheckError(f"nnU-Net dataset: files of case {identifier} are missing")
