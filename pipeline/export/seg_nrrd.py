"""The 3D Slicer export: one ``.seg.nrrd`` per case on exactly the input's grid, a named, coloured segment per
label with its terminology (SNOMED CT category and type, as Slicer's segment editor shows them), re-read and
compared with the store before it gets its name."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from medsam_engine.pipeline.core.geometry import to_source_grid
from medsam_engine.pipeline.export.common import ExportCheckError, label_meanings
from medsam_engine.pipeline.io.slicer_seg import write_seg_nrrd
from medsam_engine.pipeline.store.case_store import CaseStore


def write_case_seg_nrrd(store: CaseStore, case_id: str, out: Path, *, name: str | None = None) -> Path:
    """OUT/<name, default case_id>.seg.nrrd: the case's label map with one segment per label present."""
    labels, attrs = store.read_labels(case_id)
    values = [int(v) for v in np.unique(labels) if v != 0]
    meanings = label_meanings(store, case_id, values, attrs)
    source = to_source_grid(labels, attrs.geometry)
    path = write_seg_nrrd(source, attrs.geometry.source_affine, meanings, out / f"{name or case_id}.seg.nrrd")
    if not np.array_equal(_voxels(path, source.shape), source):
        path.unlink(missing_ok=True)
        raise ExportCheckError(f"{path.name}: the segmentation did not read back as the store holds it")
    return path


def _voxels(path: Path, shape: tuple[int, ...]) -> np.ndarray:
    """The label map a written .seg.nrrd holds on its own (i, j, k) grid, from its segments' layers and
    label values (ids ``label_<value>``), as 3D Slicer reads it."""
    import slicerio

    segmentation = slicerio.read_segmentation(str(path))
    voxels = np.asarray(segmentation["voxels"])
    layers = voxels if voxels.ndim == 4 else voxels[None]
    labels = np.zeros(shape, dtype=np.uint16)
    for segment in segmentation["segments"]:
        value = int(str(segment["id"]).removeprefix("label_"))
        labels[layers[int(segment.get("layer", 0) or 0)] == int(segment["labelValue"])] = value
    return labels
