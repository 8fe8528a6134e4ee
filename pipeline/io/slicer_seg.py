"""3D Slicer segmentations (.seg.nrrd) through slicerio: named, coloured segments, overlapping ones in layers.

Reading (a reviewer's correction, a coarse mask): every segment becomes a label value — "label_N" segment ids
(as :func:`write_seg_nrrd` writes them) keep N, others are numbered 1, 2, … in the file's order; overlaps
resolve in that order, later segments winning. Writing (the review queue): one segment per label value with
the store's name and colour, on the input's own grid.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from medsam_engine.pipeline.core.atomic import atomic_file
from medsam_engine.pipeline.core.errors import ReadError
from medsam_engine.pipeline.core.orientation import LPS_TO_RAS, canonical_volume
from medsam_engine.pipeline.core.types import Volume

_OURS = re.compile(r"label_(\d+)")


def _segment_values(segments: list[dict[str, Any]]) -> list[int]:
    """Each segment's label value: N for our "label_N" ids; the stored value in a one-layer file; else the
    next unused value (layers reuse their values)."""
    layered = any(int(segment.get("layer", 0) or 0) > 0 for segment in segments)
    values = []
    for segment in segments:
        match = _OURS.fullmatch(str(segment.get("id", "")))
        values.append(int(match.group(1)) if match else 0 if layered else int(segment.get("labelValue", 0)))
    used = set(values)
    spare = (v for v in range(1, 65536) if v not in used)
    return [v or next(spare) for v in values]


def seg_nrrd_segments(path: str | Path, *, voxels: bool = True) -> tuple[dict[str, Any], list[int]]:
    """slicerio's segmentation of ``path`` (its header only unless ``voxels``) and the label value of each of
    its segments."""
    import slicerio

    try:
        segmentation = slicerio.read_segmentation(str(path), skip_voxels=not voxels)
    except Exception as exc:
        raise ReadError(
            f"{Path(path).name}: unreadable 3D Slicer segmentation ({type(exc).__name__}: {exc})"
        ) from exc
    return segmentation, _segment_values(list(segmentation.get("segments") or []))


def seg_nrrd_names(path: str | Path) -> dict[int, str]:
    """Label value -> segment name, as :func:`read_seg_nrrd` numbers them (the header alone is read)."""
    segmentation, values = seg_nrrd_segments(path, voxels=False)
    return {
        value: str(s.get("name") or f"label {value}")
        for s, value in zip(segmentation["segments"], values, strict=False)
    }


def read_seg_nrrd(path: str | Path) -> Volume:
    """The segmentation as one (uint16) label map, whatever its layers."""
    segmentation, values = seg_nrrd_segments(path)
    voxels = np.asarray(segmentation["voxels"])
    layers = voxels if voxels.ndim == 4 else voxels[None]
    labels = np.zeros(layers.shape[1:], dtype=np.uint16)
    for segment, value in zip(segmentation["segments"], values, strict=False):
        layer = int(segment.get("layer", 0) or 0)
        labels[layers[layer] == int(segment.get("labelValue", 1))] = value
    affine = LPS_TO_RAS @ np.asarray(segmentation["ijkToLPS"], dtype=float)
    return canonical_volume(labels, affine, modality="SEG", source_format="nrrd")


def write_seg_nrrd(
    labels_ijk: np.ndarray, affine_ras: np.ndarray, meanings: Sequence[Any], path: str | Path
) -> Path:
    """Write ``labels_ijk`` (on the grid of ``affine_ras``) as a .seg.nrrd with one named, coloured segment
    per value in ``meanings`` (pipeline.store.labels_meta.LabelMeaning), its SNOMED CT category and type as
    the segment's terminology; atomic."""
    import slicerio

    segmentation = slicerio.create_segmentation(
        labels_ijk.shape,
        np.linalg.inv(LPS_TO_RAS) @ affine_ras,
        dtype="uint16" if len(meanings) > 255 else "uint8",
    )
    for meaning in meanings:
        slicerio.add_segment(
            segmentation,
            labels_ijk == meaning.value,
            {
                "id": f"label_{meaning.value}",
                "name": meaning.name,
                "color": [round(c / 255, 4) for c in meaning.rgb],
                "terminology": {
                    "contextName": "Segmentation category and type - DICOM master list",
                    "category": ["SCT", *meaning.category],
                    "type": ["SCT", *meaning.property_type],
                },
            },
        )
    path = Path(path)
    with atomic_file(path) as temp:
        slicerio.write_segmentation(str(temp), segmentation)
    return path
