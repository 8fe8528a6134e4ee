"""Exports from the store: NIfTI here; DICOM SEG, nnU-Net v2 and COCO RLE in their own modules.

Every export writes each file under a temporary name, re-reads it, compares it with the store and only then
gives it its final name. Cases an export cannot represent (a SEG for a NIfTI input, COCO for a 3D volume) are
skipped with a reason per case; everything else that goes wrong is a bug and propagates.
``out_dir`` may be a local folder or an fsspec URL (``s3://bucket/prefix``): files are then written and
checked locally first and uploaded once complete.
"""
from __future__ import annotations

import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pipeline.errors import CaseError
from pipeline.geometry import to_source_grid
from pipeline.store import CaseStore
from pipeline.types import Geometry

FORMATS = ("nifti", "dicom-seg", "nnunet", "coco")


class ExportError(CaseError):
    """This case cannot be written in the asked format (the reason says why and what to use instead)."""

    stage = "export"


class ExportCheckError(RuntimeError):
    """A written file did not read back identically to the store: a bug, never a per-case condition."""


@dataclass
class ExportReport:
    """What an export wrote (paths or URLs); the cases it could not write (``skipped``) and those it left out
    by design, e.g. not accepted in review (``excluded``), each with its reason."""

    format: str
    written: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    excluded: dict[str, str] = field(default_factory=dict)


def label_map_on_source(labels_zyx: np.ndarray, geometry: Geometry) -> np.ndarray:
    """The store's (z, y, x) label map in the input file's own (i, j, k) voxel order."""
    return to_source_grid(labels_zyx, geometry)


def save_nifti_checked(data: np.ndarray, affine: np.ndarray, path: Path, *, what: str) -> Path:
    """Save ``data`` (i, j, k[, ...]) with ``affine`` (voxel -> RAS mm) as NIfTI, re-read it and compare."""
    import nibabel as nib

    image = nib.Nifti1Image(data, affine)
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=1)
    tmp = path.with_name(f".{path.name}.tmp.nii.gz")
    nib.save(image, str(tmp))
    check = nib.load(str(tmp))
    same = np.array_equal(np.asanyarray(check.dataobj), data) and np.allclose(check.affine, affine, atol=1e-4)
    if not same:
        tmp.unlink()
        raise ExportCheckError(f"{what}: NIfTI did not read back identically")
    tmp.replace(path)
    return path


def write_case_nifti(store: CaseStore, case_id: str, out: Path) -> Path:
    """OUT/<case_id>.nii.gz: the label map (uint16) on exactly the input's grid and affine."""
    labels, attrs = store.read_labels(case_id)
    geometry = Geometry.from_json(attrs["geometry"])
    data = label_map_on_source(labels, geometry).astype(np.uint16)
    return save_nifti_checked(data, geometry.source_affine, out / f"{case_id}.nii.gz", what=f"case {case_id}")


def export_nifti(store: CaseStore, out_dir: str | Path) -> list[Path]:
    """Write OUT/<case_id>.nii.gz for every committed case; each is re-read and checked after writing."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    return [write_case_nifti(store, case_id, out) for case_id in store.committed_cases()]


def _per_case(write: Callable[[CaseStore, str, Path], Path]) -> Callable[[CaseStore, Path], ExportReport]:
    """An exporter that runs ``write`` per committed case and records ExportErrors as skipped cases."""
    def run(store: CaseStore, out: Path) -> ExportReport:
        report = ExportReport(format="")
        for case_id in store.committed_cases():
            try:
                report.written.append(str(write(store, case_id, out)))
            except ExportError as exc:
                report.skipped[case_id] = exc.reason
        return report
    return run


def _exporter(fmt: str) -> Callable[[CaseStore, Path], ExportReport]:
    if fmt == "nifti":
        return _per_case(write_case_nifti)
    if fmt == "dicom-seg":
        from pipeline.export_seg import write_case_seg

        return _per_case(write_case_seg)
    if fmt == "nnunet":
        from pipeline.export_nnunet import export_nnunet

        return export_nnunet
    if fmt == "coco":
        from pipeline.export_coco import export_coco

        return export_coco
    raise ValueError(f"Argument 'fmt' must be one of {FORMATS}; got {fmt!r}.")


def export_store(store: CaseStore, fmt: str, out_dir: str | Path) -> ExportReport:
    """Export every committed case of ``store`` in format ``fmt`` (one of FORMATS) to ``out_dir``."""
    import fsspec

    exporter = _exporter(fmt)
    fs, remote_path = fsspec.core.url_to_fs(str(out_dir))
    if "file" in ((fs.protocol,) if isinstance(fs.protocol, str) else fs.protocol):
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        report = exporter(store, out)
        report.format = fmt
        return report
    with tempfile.TemporaryDirectory(prefix="medsam-export-") as tmp:
        report = exporter(store, Path(tmp))
        local = sorted(p for p in Path(tmp).rglob("*") if p.is_file())
        for path in local:
            target = f"{remote_path}/{path.relative_to(tmp).as_posix()}"
            fs.put_file(str(path), target)
            if fs.size(target) != path.stat().st_size:
                raise ExportCheckError(f"{target}: the uploaded object differs in size from the checked file")
        prefix = str(out_dir).rstrip("/")
        report.written = [f"{prefix}/{Path(p).relative_to(tmp).as_posix()}" for p in report.written]
    report.format = fmt
    return report
