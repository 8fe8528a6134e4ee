"""Exports from the store. NIfTI: one label map per case on exactly the input's grid and affine."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from pipeline.geometry import to_source_grid
from pipeline.store import CaseStore
from pipeline.types import Geometry


def label_map_on_source(labels_zyx: np.ndarray, geometry: Geometry) -> np.ndarray:
    """The store's (z, y, x) label map in the input file's own (i, j, k) voxel order."""
    return to_source_grid(labels_zyx, geometry)


def export_nifti(store: CaseStore, out_dir: str | Path) -> list[Path]:
    """Write OUT/<case_id>.nii.gz for every committed case; each is re-read and checked after writing."""
    import nibabel as nib

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for case_id in store.committed_cases():
        labels, attrs = store.read_labels(case_id)
        geometry = Geometry.from_json(attrs["geometry"])
        data = label_map_on_source(labels, geometry).astype(np.uint16)
        image = nib.Nifti1Image(data, geometry.source_affine)
        image.set_qform(geometry.source_affine, code=1)
        image.set_sform(geometry.source_affine, code=1)
        path = out / f"{case_id}.nii.gz"
        tmp = out / f".{case_id}.tmp.nii.gz"
        nib.save(image, str(tmp))
        check = nib.load(str(tmp))
        if not (np.array_equal(np.asanyarray(check.dataobj), data)
                and np.allclose(check.affine, geometry.source_affine, atol=1e-4)):
            tmp.unlink()
            raise RuntimeError(f"case {case_id}: NIfTI export did not read back identically")
        tmp.replace(path)
        written.append(path)
    return written
