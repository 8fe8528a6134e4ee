"""The NIfTI export: one label map per case on exactly the input's grid and affine.

Every export writes each file under a temporary name, re-reads it, compares it with the store and only then
gives it its final name. Cases an export cannot represent (a SEG for a NIfTI input, COCO for a 3D volume) are
skipped with a reason per case; everything else that goes wrong is a bug and propagates.
``out_dir`` may be a local folder or an fsspec URL (``s3://bucket/prefix``): files are then written and
checked locally first and uploaded once complete.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from medsam_engine.pipeline.core.atomic import atomic_file
from medsam_engine.pipeline.export.common import ExportCheckError, label_map_on_source
from medsam_engine.pipeline.store.case_store import CaseStore


def save_nifti_checked(data: np.ndarray, affine: np.ndarray, path: Path, *, what: str) -> Path:
    """Save ``data`` (i, j, k[, ...]) with ``affine`` (voxel -> RAS mm) as NIfTI, re-read it and compare."""
    import nibabel as nib

    image = nib.Nifti1Image(data, affine)
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=1)
    with atomic_file(path) as temp:
        nib.save(image, str(temp))
        check = nib.load(str(temp))
        same = np.array_equal(np.asanyarray(check.dataobj), data) and np.allclose(
            check.affine, affine, atol=1e-4
        )
        if not same:
            raise ExportCheckError(f"{what}: NIfTI did not read back identically")
    return path


def write_case_nifti(store: CaseStore, case_id: str, out: Path, *, name: str | None = None) -> Path:
    """OUT/<name, default case_id>.nii.gz: the label map (uint16) on exactly the input's grid and affine."""
    labels, attrs = store.read_labels(case_id)
    geometry = attrs.geometry
    data = label_map_on_source(labels, geometry).astype(np.uint16)
    path = out / f"{name or case_id}.nii.gz"
    return save_nifti_checked(data, geometry.source_affine, path, what=f"case {case_id}")


def export_nifti(store: CaseStore, out_dir: str | Path) -> list[Path]:
    """Write OUT/<case_id>.nii.gz for every committed case; each is re-read and checked after writing."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    return [write_case_nifti(store, case_id, out) for case_id in store.committed_cases()]
