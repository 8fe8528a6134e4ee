"""Radiologists' marks as they are stored: GSPS presentation states and DICOM SR measurement reports.

:func:`read_marks` walks files or folders and returns every graphic it finds as a :class:`RawMark`, and the
image headers it met on the way (:class:`ImagePlane`: where each image lies, so a mark on a reformat can be
placed through physical coordinates).

* GSPS (Modality PR): each GraphicAnnotationSequence item's GraphicObjects (POLYLINE, INTERPOLATED, CIRCLE,
  ELLIPSE, POINT, MULTIPOINT) and the visible anchor points of its TextObjects (an arrow's tip). The images
  are the item's ReferencedImageSequence, else the presentation state's only referenced image. The finding is
  the object's TrackingUID/TrackingID when it has one; the label is the graphic layer's name.
* SR (TID 1500 and alike): every SCOORD and SCOORD3D content item anywhere in the tree. Its finding is the
  Tracking Unique Identifier (DCM 112040) or Tracking Identifier (DCM 112039) of the nearest enclosing
  container that has one; its label the Finding (DCM 121071) code's meaning there; its role the concept of
  the NUM it is inferred from ("Long axis", "Short axis") or of the SCOORD itself.

Points are kept as stored: image column/row with the origin at the top-left corner of the top-left pixel
(so a pixel centre is at index + 0.5), or patient LPS millimetres for SCOORD3D. A mark that cannot be read
(an unknown graphic type, DISPLAY units without a displayed area, an SR coordinate referencing no image)
carries its ``problem``. SOP instance UIDs are kept for lineage only: names meant for people (``name``) are
made of the file name and the item's position.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from medsam_engine.pipeline.core.errors import ReadError
from medsam_engine.pipeline.io.dicom_header import read_dicom_header
from medsam_engine.pipeline.io.pacs_marks import GSPS_CLASSES

SR_CLASS_PREFIX = "1.2.840.10008.5.1.4.1.1.88."
GRAPHIC_TYPES = {"POLYLINE", "INTERPOLATED", "CIRCLE", "ELLIPSE", "POINT", "MULTIPOINT", "POLYGON"}
TRACKING_UID, TRACKING_ID, FINDING = "112040", "112039", "121071"


@dataclass(frozen=True)
class ImagePlane:
    """One image's place in the patient: LPS position of its first pixel's centre, unit row/column
    directions (ImageOrientationPatient), (row, column) spacing in mm, size, Frame of Reference and series."""

    sop_instance: str
    series: str
    frame_of_reference: str
    position: np.ndarray
    row_dir: np.ndarray
    col_dir: np.ndarray
    spacing: tuple[float, float]
    size: tuple[int, int]  # rows, columns

    def to_lps(self, colrow: np.ndarray) -> np.ndarray:
        """(N, 2) column/row graphic coordinates (top-left corner of the image at 0, 0) -> (N, 3) LPS mm."""
        index = np.asarray(colrow, dtype=float) - 0.5
        return (
            self.position[None]
            + index[:, :1] * self.spacing[1] * self.row_dir[None]
            + index[:, 1:2] * self.spacing[0] * self.col_dir[None]
        )

    @property
    def normal(self) -> np.ndarray:
        return np.cross(self.row_dir, self.col_dir)


@dataclass(frozen=True)
class RawMark:
    """One graphic as stored. ``points``: (N, 2) column/row on ``image`` or (N, 3) LPS mm when ``image`` is
    None and ``frame_of_reference`` is set (SCOORD3D). ``source_uid`` is the PR/SR's SOP instance UID and
    ``index`` the mark's place among that object's marks (1, 2, ... in reading order): together they name the
    mark whatever file holds it."""

    name: str
    source_type: str  # "GSPS" | "SR"
    source_uid: str
    graphic_type: str
    points: np.ndarray
    image: str | None = None
    frame_of_reference: str | None = None
    finding: str | None = None
    label: str | None = None
    role: str | None = None
    problem: str | None = None
    index: int = 0


def _files(paths: list[str]) -> Iterator[str]:
    for path in paths:
        if os.path.isdir(path):
            for root, _, names in sorted(os.walk(path)):
                for name in sorted(names):
                    yield os.path.join(root, name)
        elif os.path.exists(path):
            yield path
        else:
            raise ValueError(f"marks: no such file or folder: {path}")


def read_marks(paths: list[str]) -> tuple[list[RawMark], dict[str, ImagePlane], list[str]]:
    """Every mark in the PR/SR objects under ``paths``, the image planes of the images found there (by SOP
    instance UID), and "file: why" for files that are not DICOM, could not be read, or are a PR/SR without
    a single mark."""
    marks: list[RawMark] = []
    planes: dict[str, ImagePlane] = {}
    skipped: list[str] = []
    for path in _files(paths):
        try:
            ds = read_dicom_header(path)
        except ReadError as exc:  # not DICOM, or corrupt: named, the others still count
            skipped.append(exc.reason)
            continue
        sop_class = str(ds.get("SOPClassUID", ""))
        name = os.path.basename(path)
        if sop_class in GSPS_CLASSES or sop_class.startswith(SR_CLASS_PREFIX):
            found = gsps_marks(ds, name) if sop_class in GSPS_CLASSES else sr_marks(ds, name)
            if not found:
                kind = "presentation state" if sop_class in GSPS_CLASSES else "structured report"
                skipped.append(f"{name}: a {kind} that references nothing (no graphics, no coordinates)")
            marks.extend(found)
        else:
            plane = image_plane(ds)
            if plane is not None:
                planes[plane.sop_instance] = plane
    return marks, planes, skipped


def image_plane(ds: Any) -> ImagePlane | None:
    """The plane of a single-frame image header; None for anything without position and orientation."""
    position, orientation = ds.get("ImagePositionPatient"), ds.get("ImageOrientationPatient")
    spacing = ds.get("PixelSpacing")
    if (
        position is None
        or orientation is None
        or spacing is None
        or int(ds.get("NumberOfFrames", 1) or 1) > 1
    ):
        return None
    orient = np.asarray([float(v) for v in orientation], dtype=float)
    return ImagePlane(
        sop_instance=str(ds.SOPInstanceUID),
        series=str(ds.get("SeriesInstanceUID", "")),
        frame_of_reference=str(ds.get("FrameOfReferenceUID", "")),
        position=np.asarray([float(v) for v in position], dtype=float),
        row_dir=orient[:3] / np.linalg.norm(orient[:3]),
        col_dir=orient[3:] / np.linalg.norm(orient[3:]),
        spacing=(float(spacing[0]), float(spacing[1])),
        size=(int(ds.Rows), int(ds.Columns)),
    )


def _points(data: Any, dims: int) -> np.ndarray:
    values = np.asarray([float(v) for v in data], dtype=float)
    return values.reshape(-1, dims) if values.size % dims == 0 else np.zeros((0, dims))


def _display_to_pixels(points: np.ndarray, ds: Any, image: str | None) -> np.ndarray | None:
    """DISPLAY units (fractions of the displayed area) as pixel coordinates, through the displayed area
    selection of ``image`` (or the one that applies to all images); None when there is none."""
    for area in ds.get("DisplayedAreaSelectionSequence", []):
        refs = [str(r.ReferencedSOPInstanceUID) for r in area.get("ReferencedImageSequence", [])]
        if refs and image not in refs:
            continue
        (c0, r0), (c1, r1) = area.DisplayedAreaTopLeftHandCorner, area.DisplayedAreaBottomRightHandCorner
        # the corners are 1-based pixel numbers, inclusive: the area spans c0 - 1 .. c1 in graphic coordinates
        return np.column_stack([c0 - 1 + points[:, 0] * (c1 - c0 + 1), r0 - 1 + points[:, 1] * (r1 - r0 + 1)])
    return None


def _gsps_images(ds: Any, annotation: Any) -> list[str]:
    own = [str(r.ReferencedSOPInstanceUID) for r in annotation.get("ReferencedImageSequence", [])]
    if own:
        return own
    return [
        str(r.ReferencedSOPInstanceUID)
        for series in ds.get("ReferencedSeriesSequence", [])
        for r in series.get("ReferencedImageSequence", [])
    ]


def gsps_marks(ds: Any, filename: str) -> list[RawMark]:
    """The marks of a presentation state: graphic objects and visible text anchor points."""
    uid, marks = str(ds.SOPInstanceUID), []
    counter = iter(range(1, 1_000_000))
    for a, annotation in enumerate(ds.get("GraphicAnnotationSequence", []), start=1):
        images = _gsps_images(ds, annotation)
        image = images[0] if len(images) == 1 else None
        problem = None if image else f"applies to {len(images)} images: no key slice"
        layer = str(annotation.get("GraphicLayer", "") or "") or None
        items = [(g, "graphic") for g in annotation.get("GraphicObjectSequence", [])]
        items += [(t, "text") for t in annotation.get("TextObjectSequence", []) if "AnchorPoint" in t]
        for o, (item, kind) in enumerate(items, start=1):
            if kind == "text":
                if str(item.get("AnchorPointVisibility", "Y")) != "Y":
                    continue
                gtype, data, units = (
                    "POINT",
                    item.AnchorPoint,
                    str(item.get("AnchorPointAnnotationUnits", "")),
                )
            else:
                gtype, data = str(item.get("GraphicType", "")), item.get("GraphicData", [])
                units = str(item.get("GraphicAnnotationUnits", ""))
            points, why = _points(data, 2), problem
            if gtype not in GRAPHIC_TYPES:
                why = why or f"unknown graphic type '{gtype}'"
            elif units == "DISPLAY":
                pixels = _display_to_pixels(points, ds, image)
                why = why or (None if pixels is not None else "DISPLAY units without a displayed area")
                points = pixels if pixels is not None else points
            tracking = item.get("TrackingUID") or item.get("TrackingID")
            marks.append(
                RawMark(
                    name=f"{filename} annotation {a} {kind} {o} ({gtype or '?'})",
                    source_type="GSPS",
                    source_uid=uid,
                    graphic_type=gtype,
                    points=points,
                    image=image,
                    finding=f"gsps:{tracking}" if tracking else None,
                    label=layer,
                    problem=why,
                    index=next(counter),
                )
            )
    return marks


def _meaning(item: Any, sequence: str = "ConceptNameCodeSequence") -> tuple[str, str]:
    codes = item.get(sequence) or [None]
    code = codes[0]
    return (str(code.CodeValue), str(code.CodeMeaning)) if code is not None else ("", "")


def sr_marks(ds: Any, filename: str) -> list[RawMark]:
    """The SCOORD/SCOORD3D items of a structured report, with their finding, label and role."""
    marks: list[RawMark] = []
    counter = iter(range(1, 1_000_000))

    def walk(items: Any, finding: str | None, label: str | None, role: str | None) -> None:
        for item in items:
            if str(item.get("ValueType", "")) == "CONTAINER":
                children = item.get("ContentSequence", [])
                found, named = finding, label
                for child in children:
                    code = _meaning(child)[0]
                    if code == TRACKING_UID and "UID" in child:
                        found = f"sr:{child.UID}"
                    elif code == TRACKING_ID and not (found or "").startswith("sr:") and "TextValue" in child:
                        found = f"sr-id:{child.TextValue}"
                    elif code == FINDING and "ConceptCodeSequence" in child:
                        named = _meaning(child, "ConceptCodeSequence")[1]
                walk(children, found, named, None)
            elif str(item.get("ValueType", "")) in ("SCOORD", "SCOORD3D"):
                marks.append(_sr_mark(ds, item, filename, next(counter), finding, label, role))
            elif "ContentSequence" in item:
                walk(item.ContentSequence, finding, label, _meaning(item)[1] or role)

    walk(ds.get("ContentSequence", []), None, None, None)
    return marks


def _sr_mark(
    ds: Any, item: Any, filename: str, n: int, finding: str | None, label: str | None, role: str | None
) -> RawMark:
    gtype, three_d = str(item.get("GraphicType", "")), str(item.ValueType) == "SCOORD3D"
    images = [
        str(ref.ReferencedSOPInstanceUID)
        for child in item.get("ContentSequence", [])
        for ref in child.get("ReferencedSOPSequence", [])
    ]
    problem = None
    if gtype not in GRAPHIC_TYPES:
        problem = f"unknown graphic type '{gtype}'"
    elif not three_d and not images:
        problem = "references no image"
    elif not three_d and len(images) > 1:
        problem = f"references {len(images)} images: no key slice"
    return RawMark(
        name=f"{filename} coordinate {n} ({gtype or '?'})",
        source_type="SR",
        source_uid=str(ds.SOPInstanceUID),
        graphic_type=gtype,
        points=_points(item.get("GraphicData", []), 3 if three_d else 2),
        image=images[0] if len(images) == 1 and not three_d else None,
        frame_of_reference=str(item.get("ReferencedFrameOfReferenceUID", "")) if three_d else None,
        finding=finding,
        label=label,
        role=(role or _meaning(item)[1] or None),
        problem=problem,
        index=n,
    )


def case_planes(files: tuple[str, ...]) -> dict[str, ImagePlane]:
    """The planes of a DICOM case's own images (headers only), by SOP instance UID."""
    planes = {}
    for path in files:
        plane = image_plane(read_dicom_header(path))
        if plane is not None:
            planes[plane.sop_instance] = plane
    return planes


def as_paths(value: str | list[str]) -> list[str]:
    """An option given once or several times (``marks=A`` ``marks=B``, or ``A,B``) as a list of paths."""
    items = [value] if isinstance(value, str) else list(value)
    return [str(Path(p)) for item in items for p in str(item).split(",") if p]
