"""DICOM SEG as input: a coarse mask or a reviewer's correction written by TotalSegmentator, 3D Slicer, OHIF
or this engine, read with highdicom onto the series it references.

Segments become label values: a segment whose tracking id is "label N" (as this engine writes them) keeps
the value N, any other takes its segment number. Where segments overlap, the later segment wins (as label
maps are written). The segment labels are the names (:func:`seg_label_names`).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from medsam_engine.pipeline.core.errors import ReadError
from medsam_engine.pipeline.core.orientation import LPS_TO_RAS, canonical_volume
from medsam_engine.pipeline.core.types import Volume
from medsam_engine.pipeline.io.dicom_header import read_dicom_header

if TYPE_CHECKING:
    from pydicom import Dataset

SEG_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"
_OURS = re.compile(r"label (\d+)")


def is_dicom_seg(path: str | Path) -> bool:
    """Whether ``path`` is a DICOM Segmentation object (its header only is read)."""
    try:
        ds = read_dicom_header(path, tags=["SOPClassUID"])
    except ReadError:
        return False
    return str(ds.get("SOPClassUID", "")) == SEG_SOP_CLASS


def referenced_series(path: str | Path) -> str | None:
    """The SeriesInstanceUID that ``path`` references when it is a DICOM SEG (one header read; for matching,
    never logged); None for any other file or a SEG without the reference."""
    try:
        ds = read_dicom_header(path)
        if str(ds.get("SOPClassUID", "")) != SEG_SOP_CLASS:
            return None
        return str(ds.ReferencedSeriesSequence[0].SeriesInstanceUID)
    except Exception:  # unreadable (a ReadError), or the reference missing or corrupt (decoded on access)
        return None


def _segment_values(ds: Dataset) -> dict[int, int]:
    """Segment number -> label value, from a SEG dataset's SegmentSequence (see the module doc)."""
    values = {}
    for item in ds.get("SegmentSequence", []):
        number = int(item.SegmentNumber)
        match = _OURS.fullmatch(str(item.get("TrackingID", "") or "").strip())
        values[number] = int(match.group(1)) if match else number
    return values


def seg_label_names(path: str | Path) -> dict[int, str]:
    """Label value -> the segment's label, for a DICOM SEG file (its header alone is read); ReadError when
    the file cannot be read."""
    ds = read_dicom_header(path)
    values = _segment_values(ds)
    return {
        values[int(item.SegmentNumber)]: str(item.get("SegmentLabel", ""))
        for item in ds.get("SegmentSequence", [])
    }


def read_dicom_seg(path: str | Path) -> Volume:
    """The SEG as a label map (uint16) on the grid of the frames it holds (cropped to them; the caller aligns
    it to the image, pipeline/core/geometry.align_to)."""
    import highdicom as hd

    path = Path(path)
    seg = hd.seg.segread(str(path))
    values = _segment_values(seg)
    if not values:
        raise ReadError(f"{path.name}: the DICOM SEG holds no segment")
    numbers = sorted(values)
    try:
        volume = seg.get_volume(segment_numbers=numbers, combine_segments=False)
    except (ValueError, RuntimeError) as exc:
        raise ReadError(f"{path.name}: the DICOM SEG's frames do not form one volume ({exc})") from exc
    if volume is None:
        raise ReadError(f"{path.name}: the DICOM SEG holds no frames")
    planes = np.asarray(volume.array)
    if planes.ndim == 3:
        planes = planes[..., None]
    labels = np.zeros(planes.shape[:3], dtype=np.uint16)
    for index, number in enumerate(numbers):  # later segments win where segments overlap
        labels[planes[..., index] > 0] = values[number]
    return canonical_volume(
        labels, LPS_TO_RAS @ np.asarray(volume.affine, dtype=float), modality="SEG", source_format="dicom-seg"
    )
