"""Marks as prompts: radiologists' GSPS graphics and SR measurements -> one seed box per finding.

Each mark (detectors/marks_files.py) is placed on the case's grid through physical coordinates: its image's
position and orientation (the case's own images, or images of another series found beside the marks that
share the case's Frame of Reference; SCOORD3D points are physical already) give LPS millimetres, the
Volume's affine gives the voxel. A mark must lie on one slice: marks on a plane tilted against the slices (a
coronal or sagittal reformat) are refused, as are marks off the image, on images that are neither in the
series nor found with the marks, on another Frame of Reference, or of an unknown graphic type. Each refused
mark is named with its reason in the Detection's ``warnings``; when none is usable the detector raises.

Marks of one finding are one instance: the same tracking identifier (SR TID 1500 groups, GSPS TrackingUID),
or lines that cross on one slice. A finding's box on its key slice (the slice of its longest mark):

* two or more lines (RECIST long + short axis): the bounding box of the ellipse whose diameters are the long
  axis and the longest other line (perpendicular to the long axis, centred on it) joined with the lines' end
  points (``axes_rule: ellipse``, the default: a lesion's outline bulges past the end points' box where its
  long axis runs obliquely), or of the end points alone (``endpoints``);
* one line: ``lone_line: axis`` (default) the ellipse with the line as long axis and ``short_ratio`` times
  it as short; ``square`` a square of the line's length around its middle; ``diagonal`` the line's own
  bounding box;
* circle / ellipse: the shape's bounding box; closed or open polylines, multipoints: the points' box;
* a point (POINT, a text's visible anchor point such as an arrow's tip): a square of ``point_box_mm``.

The defaults are the rules that measured best on real lesions (docs/benchmarks.md, "Marks as prompts").
Labels are the SR finding's code meaning or the GSPS layer's name, in order of first appearance
(values 1, 2, ...), else one label. Each object's extent across slices is left to propagation
(``Detection.objects``, the key slice as middle), whose stop rules end it (for such open ranges also
where the masks stop looking like the seed's, pipeline/annotate/propagate.py); its range is bounded by
``depth_factor`` (1.5) times half the finding's in-plane size above and below the key slice (a lesion is
about as deep as it is wide; without the bound, propagation on the chest CT ran on into neighbouring
structures). The Detection's label map holds the pixels along each finding's lines (else its box), so the
run's automatic CT window follows the HU the axes cross; a solid lesion in aerated lung is read in the lung
window (``Detection.window_kinds``, detectors/marks_window.py).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
from pydantic import Field

from medsam_engine.detectors.coarse_mask import BoxRules
from medsam_engine.detectors.marks_files import ImagePlane, RawMark, as_paths, case_planes, read_marks
from medsam_engine.detectors.marks_window import seed_map, window_kinds
from medsam_engine.detectors.protocol import Detection, DetectorOptions
from medsam_engine.pipeline.core.types import BoxPrompt, CaseRef, ObjectBox, Volume

SOURCE = "marks"
FROM_PACS = ("pacs", "from-pacs")  # ``marks:`` the marks in the PACS of a DICOMweb input's own study
LINES = {"POLYLINE"}
PARALLEL_COS = np.cos(np.radians(2.0))  # planes within 2 degrees of the slices count as parallel


class MarksOptions(DetectorOptions):
    """Where the marks are and how marks without a full outline become boxes."""

    marks: str | list[str] = Field(
        description="PR/SR files or folders (comma-separated or a list), or `pacs` (also `from-pacs`): for "
        "DICOMweb inputs, the GSPS and TID 1500 SR objects of the input's own study in the PACS"
    )
    images: str | list[str] = Field(
        default_factory=list, description="folders of images of other series the marks are drawn on"
    )
    axes_rule: Literal["ellipse", "endpoints"] = Field(
        "ellipse", description="long + short axis: their ellipse's box, or their end points' box"
    )
    lone_line: Literal["square", "diagonal", "axis"] = Field("axis", description="rule for a lone line")
    short_ratio: float = Field(0.7, gt=0, le=1, description="lone_line axis: short axis / long axis")
    point_box_mm: float = Field(30.0, gt=0, description="side of the square box around a point or arrow")
    depth_factor: float | None = Field(
        1.5,
        gt=0,
        description="propagation reaches at most this times half the finding's in-plane size (mm) "
        "above and below its key slice; None: the whole volume, the stop rule alone ends it",
    )
    label: int = Field(1, ge=1, description="first label value")


@dataclass(eq=False)
class _Placed:
    """A usable mark on the case's grid: slice ``z`` and (N, 2) x/y voxel coordinates (pixel centres)."""

    mark: RawMark
    z: int
    xy: np.ndarray

    @property
    def length(self) -> float:
        return float(np.ptp(self.xy, axis=0).max()) if len(self.xy) else 0.0


@dataclass
class _Finding:
    marks: list[_Placed] = field(default_factory=list)


def place(mark: RawMark, planes: dict[str, ImagePlane], own: dict[str, ImagePlane], volume: Volume):
    """The mark on the case's grid, or the reason it cannot be used."""
    if mark.problem:
        return mark.problem
    if not len(mark.points):
        return "no coordinates"
    frame = next(iter(own.values())).frame_of_reference if own else ""
    if mark.image is None:  # SCOORD3D: physical already
        if mark.frame_of_reference != frame or not frame:
            return "3D coordinates in another Frame of Reference than the series'"
        lps, normal = mark.points, None
    else:
        plane = own.get(mark.image) or planes.get(mark.image)
        if plane is None:
            return "drawn on an image that is not in this series (nor among the given images)"
        if mark.image not in own and (plane.frame_of_reference != frame or not frame):
            return "drawn on an image of another series with another Frame of Reference"
        lps, normal = plane.to_lps(mark.points), plane.normal
    affine = np.asarray(volume.geometry.affine, dtype=float)
    ras = lps * np.array([-1.0, -1.0, 1.0])
    zyx = (np.linalg.inv(affine) @ np.column_stack([ras, np.ones(len(ras))]).T).T[:, :3]
    slice_normal = affine[:3, 0] / np.linalg.norm(affine[:3, 0]) * np.array([-1.0, -1.0, 1.0])
    if normal is not None and abs(float(normal @ slice_normal)) < PARALLEL_COS:
        angle = np.degrees(np.arccos(min(1.0, abs(float(normal @ slice_normal)))))
        return f"drawn on a plane at {angle:.0f} degrees to the series' slices (a reformat): not mapped"
    if np.ptp(zyx[:, 0]) > 1.0:
        return f"spans slices {zyx[:, 0].min():.1f}..{zyx[:, 0].max():.1f}: not on one slice"
    z = int(round(float(zyx[:, 0].mean())))
    depth, height, width = volume.shape
    outside = (zyx[:, 1] < -0.5) | (zyx[:, 1] > height - 0.5) | (zyx[:, 2] < -0.5) | (zyx[:, 2] > width - 0.5)
    if not 0 <= z < depth or outside.all():
        return "off the image"
    return _Placed(mark, z, zyx[:, [2, 1]])


def place_marks(
    raw: list[RawMark], planes: dict[str, ImagePlane], own: dict[str, ImagePlane], volume: Volume
) -> tuple[list[_Placed], list[tuple[RawMark, str]]]:
    """The marks placed on the case's grid (:func:`place`), and those that cannot be, each with why."""
    placed, refused = [], []
    for mark in raw:
        where = place(mark, planes, own, volume)
        if isinstance(where, str):
            refused.append((mark, where))
        else:
            placed.append(where)
    return placed, refused


def _distinct(placed: list[_Placed]) -> list[_Placed]:
    """The marks without repeats: an SR may hold a finding's long axis twice (as its region and as the
    measurement's coordinates)."""
    seen, out = set(), []
    for p in placed:
        key = (p.mark.finding, p.z, tuple(np.round(p.xy, 2).ravel()))
        if key not in seen:
            seen.add(key)
            out.append(p)
    return out


def _crosses(a: np.ndarray, b: np.ndarray) -> bool:
    """Whether segments a and b ((2, 2) x/y) intersect."""

    def side(p, q, r) -> float:
        return float((q[0] - p[0]) * (r[1] - p[1]) - (q[1] - p[1]) * (r[0] - p[0]))

    d1, d2 = side(a[0], a[1], b[0]), side(a[0], a[1], b[1])
    d3, d4 = side(b[0], b[1], a[0]), side(b[0], b[1], a[1])
    return d1 * d2 <= 0 and d3 * d4 <= 0


def _is_line(p: _Placed) -> bool:
    return p.mark.graphic_type in LINES and len(p.xy) == 2


def group_findings(placed: list[_Placed]) -> list[_Finding]:
    """Marks of one finding together: the same tracking identifier, else lines crossing on one slice
    (repeated marks dropped first)."""
    placed = _distinct(placed)
    findings: dict[object, _Finding] = {}
    loose: list[_Placed] = []
    for p in placed:
        if p.mark.finding:
            findings.setdefault(p.mark.finding, _Finding()).marks.append(p)
        else:
            loose.append(p)
    groups: list[list[_Placed]] = []
    for p in loose:
        joined = [
            g
            for g in groups
            if _is_line(p) and any(_is_line(q) and q.z == p.z and _crosses(q.xy, p.xy) for q in g)
        ]
        merged = [p] + [q for g in joined for q in g]
        groups = [g for g in groups if not any(g is j for j in joined)] + [merged]
    out = list(findings.values()) + [_Finding(sorted(g, key=lambda q: placed.index(q))) for g in groups]
    return sorted(out, key=lambda f: min(placed.index(q) for q in f.marks))


def _ellipse_box(centre, axis_a, axis_b) -> np.ndarray:
    """(2, 2) [[x0, y0], [x1, y1]] of the ellipse with semi-axis vectors ``axis_a`` and ``axis_b``."""
    half = np.sqrt(np.asarray(axis_a) ** 2 + np.asarray(axis_b) ** 2)
    return np.array([centre - half, centre + half])


def shape_box(p: _Placed, options: MarksOptions, spacing_yx: tuple[float, float]) -> np.ndarray:
    """(2, 2) float box of one mark by its shape (the rules of the module docstring)."""
    xy, kind = p.xy, p.mark.graphic_type
    if kind == "CIRCLE" and len(xy) >= 2:
        radius = np.linalg.norm(xy[1] - xy[0])
        return np.array([xy[0] - radius, xy[0] + radius])
    if kind == "ELLIPSE" and len(xy) >= 4:
        centre = (xy[0] + xy[1]) / 2
        return _ellipse_box(centre, (xy[1] - xy[0]) / 2, (xy[3] - xy[2]) / 2)
    if kind == "POINT" or len(xy) == 1 or np.ptp(xy, axis=0).max() == 0:
        half = options.point_box_mm / 2 / np.array([spacing_yx[1], spacing_yx[0]])
        return np.array([xy.mean(axis=0) - half, xy.mean(axis=0) + half])
    if _is_line(p):
        return line_box(xy, options, spacing_yx)
    return np.array([xy.min(axis=0), xy.max(axis=0)])


def line_box(xy: np.ndarray, options: MarksOptions, spacing_yx: tuple[float, float]) -> np.ndarray:
    """A lone line's box by ``options.lone_line`` (computed in millimetres, so non-square pixels hold)."""
    if options.lone_line == "diagonal":
        return np.array([xy.min(axis=0), xy.max(axis=0)])
    scale = np.array([spacing_yx[1], spacing_yx[0]])
    mm = xy * scale
    centre, half = mm.mean(axis=0), (mm[1] - mm[0]) / 2
    length = float(np.linalg.norm(half))
    if options.lone_line == "square":
        return np.array([centre - length, centre + length]) / scale
    normal = np.array([-half[1], half[0]]) * options.short_ratio
    return _ellipse_box(centre, half, normal) / scale


def axes_box(lines: list[np.ndarray], options: MarksOptions, spacing_yx: tuple[float, float]) -> np.ndarray:
    """Long + short axis (the longest two lines; others only widen the box) -> (2, 2) float box."""
    ends = np.concatenate(lines)
    box = np.array([ends.min(axis=0), ends.max(axis=0)])
    if options.axes_rule == "endpoints":
        return box
    scale = np.array([spacing_yx[1], spacing_yx[0]])
    long_mm, short_mm = lines[0] * scale, lines[1] * scale
    half = (long_mm[1] - long_mm[0]) / 2
    unit = np.array([-half[1], half[0]]) / max(float(np.linalg.norm(half)), 1e-9)
    short_half = unit * float(np.linalg.norm(short_mm[1] - short_mm[0])) / 2
    ellipse = _ellipse_box(long_mm.mean(axis=0), half, short_half) / scale
    return np.array([np.minimum(box[0], ellipse[0]), np.maximum(box[1], ellipse[1])])


def finding_box(finding: _Finding, options: MarksOptions, volume: Volume) -> tuple[int, tuple, list[str]]:
    """The key slice, its XYXY voxel box (clipped to the image) and notes on marks left aside."""
    key = max(finding.marks, key=lambda p: p.length)
    on_key = [p for p in finding.marks if p.z == key.z]
    notes = [
        f"{p.mark.name}: on slice {p.z}, not its finding's key slice {key.z}; not used"
        for p in finding.marks
        if p.z != key.z
    ]
    spacing_yx = (volume.spacing[1], volume.spacing[2])
    lines = sorted(
        (p.xy for p in on_key if _is_line(p)), key=lambda xy: -float(np.linalg.norm(xy[1] - xy[0]))
    )
    boxes = [shape_box(p, options, spacing_yx) for p in on_key if not _is_line(p)]
    if len(lines) >= 2:
        boxes.append(axes_box(lines, options, spacing_yx))
    elif lines:
        boxes.append(line_box(lines[0], options, spacing_yx))
    low = np.min([b[0] for b in boxes], axis=0)
    high = np.max([b[1] for b in boxes], axis=0)
    height, width = volume.shape[1:]
    x0, y0 = (
        int(np.clip(np.floor(low[0] + 0.5), 0, width - 1)),
        int(np.clip(np.floor(low[1] + 0.5), 0, height - 1)),
    )
    x1, y1 = (
        int(np.clip(np.ceil(high[0] - 0.5), 0, width - 1)),
        int(np.clip(np.ceil(high[1] - 0.5), 0, height - 1)),
    )
    return key.z, (x0, y0, max(x0, x1), max(y0, y1)), notes


def _rule(finding: _Finding, z: int) -> str:
    lines = sum(1 for p in finding.marks if p.z == z and _is_line(p))
    kinds = sorted({p.mark.graphic_type for p in finding.marks if p.z == z and not _is_line(p)})
    parts = (["long+short axis"] if lines >= 2 else ["lone line"] if lines else []) + [
        k.lower() for k in kinds
    ]
    return " + ".join(parts)


@dataclass(frozen=True)
class MarksDetector:
    """Seed boxes from GSPS/SR marks for one case (the case's own images place the marks)."""

    rules: BoxRules
    options: MarksOptions
    case: CaseRef | None = None
    name: str = SOURCE

    def __call__(self, volume: Volume, coarse: np.ndarray | None = None) -> Detection:
        raw, planes, skipped = self.read()
        if not raw:
            why = "; ".join(skipped) or "no PR/SR objects"
            where = "the PACS" if marks_from_pacs(self.options) else self.options.marks
            raise ValueError(f"marks: no GSPS or SR marks found in {where}: {why}")
        placed, refused = place_marks(raw, planes, self.own_planes(), volume)
        warnings = list(skipped) + [f"{mark.name}: {why}" for mark, why in refused]
        if not placed:
            raise ValueError("marks: none of the marks is usable: " + "; ".join(warnings))
        return self.detection(group_findings(placed), volume, warnings)

    def read(self) -> tuple[list[RawMark], dict[str, ImagePlane], list[str]]:
        """The marks of this case's sources, the planes of the other images found with them and the files
        left aside with why (detectors/marks_files.py's ``read_marks``)."""
        return read_marks(self._sources())

    def own_planes(self) -> dict[str, ImagePlane]:
        """The planes of the case's own images by SOP instance UID; ValueError when it has none."""
        own = case_planes(self.case.files) if self.case is not None and self.case.files else {}
        if not own:
            raise ValueError(
                "marks: the case is not a DICOM series of single-frame images; marks cannot be placed"
            )
        return own

    def _sources(self) -> list[str]:
        """The PR/SR files and image folders to read: the case's marks fetched from the PACS (``marks:
        pacs``), else the paths given; ``images`` in both."""
        images = as_paths(self.options.images)
        if not marks_from_pacs(self.options):
            return as_paths(self.options.marks) + images
        if self.case is None or not self.case.marks_files:
            raise ValueError("marks: pacs takes the marks of a DICOMweb input's study; this case has none")
        return list(self.case.marks_files) + images

    def detection(self, findings: list[_Finding], volume: Volume, warnings: list[str]) -> Detection:
        """The Detection of ``findings`` (:func:`group_findings`): a seed box and object per finding, labels
        numbered from ``options.label``; ``warnings`` gets the notes on marks left aside."""
        names = list(dict.fromkeys(f.marks[0].mark.label or "" for f in findings))
        value_of = {name: self.options.label + i for i, name in enumerate(names)} if any(names) else {}
        counts: dict[int, int] = defaultdict(int)
        prompts, objects, origins, lines = [], [], {}, []
        for finding in findings:
            label = value_of.get(finding.marks[0].mark.label or "", self.options.label)
            counts[label] += 1
            z, box, notes = finding_box(finding, self.options, volume)
            warnings.extend(notes)
            prompts.append(BoxPrompt(label, counts[label], z, box, source=SOURCE))
            lines.append([p.xy for p in finding.marks if p.z == z and _is_line(p)])
            reach = z_reach(box, volume.spacing, self.options.depth_factor, volume.shape[0])
            objects.append(
                ObjectBox(
                    label,
                    counts[label],
                    (max(0, z - reach), min(volume.shape[0] - 1, z + reach)),
                    z,
                    box,
                    box,
                    source=SOURCE,
                )
            )
            origins[(label, counts[label])] = origin(finding, z)
        label_names = {value: name for name, value in value_of.items() if name}
        return Detection(
            prompts,
            seed_map(prompts, volume.shape, lines),
            label_names,
            objects=objects,
            warnings=tuple(warnings),
            origins=origins,
            window_kinds=window_kinds(volume, prompts, lines),
        )


def marks_from_pacs(options: MarksOptions | dict) -> bool:
    """Whether the marks detector's options (validated, or as configured) take the marks from the PACS."""
    given = options.marks if isinstance(options, MarksOptions) else options.get("marks")
    return isinstance(given, str) and given.strip().lower() in FROM_PACS


def origin(finding: _Finding, z: int) -> dict:
    """The lineage of a finding's instance: key slice, box rule, and each mark used (PR/SR type and SOP
    instance UID, graphic type, SR role such as "Long axis")."""
    marks = [
        {
            "type": p.mark.source_type,
            "sop_instance_uid": p.mark.source_uid,
            "graphic": p.mark.graphic_type,
            "role": p.mark.role,
        }
        for p in finding.marks
        if p.z == z
    ]
    return {"key_slice": z, "rule": _rule(finding, z), "marks": marks}


def z_reach(box: tuple, spacing: tuple[float, float, float], factor: float | None, depth: int) -> int:
    """Slices above and below the key slice propagation may visit: ``factor`` times half the box's larger
    side in mm, in slices (a lesion is about as deep as it is wide); the whole volume when ``factor`` is
    None."""
    if factor is None:
        return depth
    size = max((box[2] - box[0] + 1) * spacing[2], (box[3] - box[1] + 1) * spacing[1])
    return int(np.ceil(factor * size / 2 / spacing[0]))
