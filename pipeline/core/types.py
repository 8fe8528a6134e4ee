"""Value types shared by every stage: one frozen dataclass per concept.

Conventions used everywhere in the project:

* Arrays are indexed ``(z, y, x)``; a 2D image is a Volume with ``z == 1``.
* ``spacing`` is in millimetres, in the same ``(z, y, x)`` order.
* ``affine`` is a 4x4 matrix mapping a voxel index ``(z, y, x, 1)`` to RAS+ world coordinates in mm
  (the NIfTI convention; DICOM's LPS is converted on read).
* Boxes are ``(x_min, y_min, x_max, y_max)`` in voxel indices of the Volume, inclusive on both ends
  (MedSAM's convention for boxes taken from masks). The model's 256-pixel boxes exist only in the runner.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np


@dataclass(frozen=True)
class Geometry:
    """Where a Volume's voxels lie, and the input's own grid so exports can land exactly on it.

    ``affine`` maps the Volume's (z, y, x, 1) voxel index to RAS+ mm. ``source_affine`` (4x4, voxel (i, j, k)
    of the input array to RAS+) and ``source_shape`` describe the file as it was read; the Volume's array is
    a nearest-axis reorientation of it (permutation and flips, never a resampling).
    """

    affine: np.ndarray
    shape: tuple[int, int, int]
    source_affine: np.ndarray
    source_shape: tuple[int, int, int]
    source_format: str = "nifti"

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel size in mm along (z, y, x), from the affine's column norms."""
        norms = np.linalg.norm(np.asarray(self.affine)[:3, :3], axis=0)
        return (float(norms[0]), float(norms[1]), float(norms[2]))

    def to_json(self) -> dict[str, Any]:
        return {
            "affine_zyx_to_ras": np.asarray(self.affine, dtype=float).tolist(),
            "shape_zyx": list(self.shape),
            "spacing_zyx_mm": [round(s, 6) for s in self.spacing],
            "source_affine": np.asarray(self.source_affine, dtype=float).tolist(),
            "source_shape": list(self.source_shape),
            "source_format": self.source_format,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Geometry:
        return cls(
            affine=np.asarray(data["affine_zyx_to_ras"], dtype=float),
            shape=tuple(int(s) for s in data["shape_zyx"]),  # type: ignore[arg-type]
            source_affine=np.asarray(data["source_affine"], dtype=float),
            source_shape=tuple(int(s) for s in data["source_shape"]),  # type: ignore[arg-type]
            source_format=data.get("source_format", "nifti"),
        )


@dataclass(frozen=True)
class Volume:
    """An image: ``array`` of shape (z, y, x) (or (z, y, x, 3) for colour), with its geometry and modality.

    Intensities are as stored after the modality LUT (CT in HU); 2D 8-bit images keep 0..255.
    """

    array: np.ndarray
    geometry: Geometry
    modality: str = "OT"

    def __post_init__(self) -> None:
        if self.array.ndim not in (3, 4):
            raise ValueError(
                f"Argument 'array' must be (z, y, x) or (z, y, x, 3); got shape {self.array.shape}."
            )
        if tuple(self.array.shape[:3]) != tuple(self.geometry.shape):
            raise ValueError(
                f"Argument 'array' has shape {self.array.shape[:3]} but the geometry says "
                f"{self.geometry.shape}."
            )

    @property
    def shape(self) -> tuple[int, int, int]:
        z, y, x = self.array.shape[:3]
        return int(z), int(y), int(x)

    @property
    def spacing(self) -> tuple[float, float, float]:
        return self.geometry.spacing

    @property
    def is_2d(self) -> bool:
        return bool(self.array.shape[0] == 1)

    def with_array(self, array: np.ndarray) -> Volume:
        """A new Volume on the same grid with another array (a label map, say)."""
        return replace(self, array=array)


@dataclass(frozen=True)
class BoxPrompt:
    """One box on one slice for one object: label value, instance number, slice index z, box XYXY (voxels)."""

    label: int
    instance: int
    z: int
    box: tuple[int, int, int, int]
    source: str = "coarse-mask"

    def __post_init__(self) -> None:
        x0, y0, x1, y1 = self.box
        if x1 < x0 or y1 < y0:
            raise ValueError(f"Argument 'box' must have x_max >= x_min and y_max >= y_min; got {self.box}.")


@dataclass(frozen=True)
class ObjectBox:
    """One object as a 3D box (the prompt of propagate mode): slices ``z_range`` (inclusive), the middle
    slice ``z_middle`` with its box ``box_middle``, and ``box_union`` over all slices (XYXY voxels)."""

    label: int
    instance: int
    z_range: tuple[int, int]
    z_middle: int
    box_middle: tuple[int, int, int, int]
    box_union: tuple[int, int, int, int]
    source: str = "coarse-mask"


@dataclass(frozen=True)
class InstanceRecord:
    """Lineage of one object (label, instance) in a case, stored in the case's attributes."""

    label: int
    instance: int
    prompt_source: str
    slices: tuple[int, ...]
    boxes: tuple[tuple[int, int, int, int], ...]
    predicted_iou: float
    voxels: int
    stage: str = "auto"
    round: int = 1
    model: str = ""
    reviewer: str | None = None
    edit_voxels: int | None = None
    stability: float | None = None  # mean over slices of IoU(logits > +1, logits > -1), SAM's stability score
    jitter_iou: float | None = None  # mean IoU of the mask with masks from jittered boxes (sampled slices)
    edit_dice: float | None = None  # Dice between the proposal and the reviewer's correction

    def to_json(self) -> dict[str, Any]:
        return {
            "label": self.label,
            "instance": self.instance,
            "prompt_source": self.prompt_source,
            "slices": list(self.slices),
            "boxes_xyxy": [list(b) for b in self.boxes],
            "predicted_iou": round(self.predicted_iou, 5),
            "voxels": self.voxels,
            "stage": self.stage,
            "round": self.round,
            "model": self.model,
            "reviewer": self.reviewer,
            "edit_voxels": self.edit_voxels,
            "stability": None if self.stability is None else round(self.stability, 5),
            "jitter_iou": None if self.jitter_iou is None else round(self.jitter_iou, 5),
            "edit_dice": None if self.edit_dice is None else round(self.edit_dice, 5),
        }


@dataclass(frozen=True)
class CaseRef:
    """One unit of work: an image (file or DICOM series folder) and its optional coarse mask.

    ``case_id`` is a keyed hash: it carries no name, ID, date or UID from the input. For DICOM, ``series`` is
    a keyed hash of the series (SeriesInstanceUID, orientation and size; never the UID itself) and ``files``
    lists the series' files inside ``image`` (a folder may hold several series). ``error`` is set when
    discovery could not make a readable case of an input (a corrupt file, a refused archive member): reading
    the case raises it as a ReadError so it is recorded like any other failure. ``content_sha256`` is the
    image file's sha256 as discovery read it for the case id, so the case's signature does not read the file
    again. ``unreadable_nearby`` names the files in a series' folders that could not be read as DICOM (each
    also its own failing case): when the series fails to read (a gap, say), its reason names them, as they may
    be its slices. ``supersedes`` is the id of the failing case a remote input (DICOMweb, s3://…) gave on a
    run where it could not be fetched; its error record is removed once this case is committed.
    ``cached_from`` lists the cache entries (absolute paths of folders in the discovery cache) the case's
    files were unpacked or fetched into: an extracted archive, an ``s3://`` copy (pipeline/io/cache.py).
    ``marks`` are the radiologists' marks of a DICOMweb case's study in the PACS (GSPS and TID 1500 SR
    instance URLs, each with the keyed hash of its SOP instance as fragment), found by discovery when the
    marks detector takes them from the PACS; ``marks_files`` their local copies (and header-only files of the
    images they are drawn on in other series), fetched with the case's series.
    ``frames`` is a multi-frame DICOM file's frame count as discovery's header scan read it (None for other
    kinds, or when discovery did not read it), so that shards are sized without reading the header again.
    ``channels`` lists the image files of an nnU-Net case (``CASE_0000``, ``CASE_0001``, ...), channel 0
    first; ``image`` is the one the engine reads, channel ``channel`` (pipeline/io/channels.py), and
    ``channel_names`` names them where the dataset's dataset.json does.
    """

    case_id: str
    image: str
    coarse_mask: str | None = None
    kind: str = "file"
    series: str | None = None
    files: tuple[str, ...] = ()
    error: str | None = None
    content_sha256: str | None = None  # of the image file, when discovery hashed it (the signature reuses it)
    unreadable_nearby: tuple[str, ...] = ()  # "name (why)" of unreadable files beside a DICOM series' files
    supersedes: str | None = None  # the failing case its remote input gave when it could not be fetched
    cached_from: tuple[str, ...] = ()  # cache entries its files were unpacked or fetched into
    marks: tuple[str, ...] = ()  # the study's marks in the PACS, by instance URL (``…#<keyed SOP instance>``)
    marks_files: tuple[str, ...] = ()  # the marks as local files, once fetched (pipeline/io/pacs_marks.py)
    frames: int | None = None  # a multi-frame DICOM file's frames, from discovery's header scan
    channels: tuple[str, ...] = ()  # an nnU-Net case's image files, channel 0 first
    channel: int = 0  # which of ``channels`` ``image`` is
    channel_names: tuple[str, ...] = ()  # the channels' names (nnU-Net's dataset.json), when known


@dataclass(frozen=True)
class CaseIds:
    """How discovery names cases and where it unpacks archives and downloads: ``case_id(identity)`` is a
    keyed hash (no PHI survives it) and ``cache`` a local folder. A store hands out both
    (:meth:`pipeline.store.case_store.CaseStore.case_ids`)."""

    case_id: Callable[[str], str]
    cache: Path


@dataclass(frozen=True)
class CaseAttributes:
    """A committed case's 'medsam' attributes (pipeline/store/case_store.py) as a value.

    ``geometry`` places the stored (z, y, x) label map; ``signature`` is what the result depends on (input,
    prompt and model sha256, config hash, package version); ``instances`` the lineage records, one per
    (label, instance); ``review_status`` is None until routing or a review set it (auto-accepted, review,
    rejected, accepted); ``round`` the flywheel round that wrote it; ``config`` the engine configuration
    used (JSON). ``raw`` is the whole JSON record as stored, for writers that carry it forward.
    """

    case_id: str
    geometry: Geometry
    modality: str
    signature: dict[str, Any]
    instances: tuple[dict[str, Any], ...]
    review_status: str | None
    round: int | None
    committed_at: str | None
    quality: dict[str, Any]
    config: dict[str, Any]
    raw: dict[str, Any]

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> CaseAttributes:
        return cls(
            case_id=str(data.get("case_id", "")),
            geometry=Geometry.from_json(data["geometry"]),
            modality=str(data.get("modality", "OT")),
            signature=dict(data.get("signature") or {}),
            instances=tuple(data.get("instances") or ()),
            review_status=data.get("review_status"),
            round=data.get("round"),
            committed_at=data.get("committed_at"),
            quality=dict(data.get("quality") or {}),
            config=dict(data.get("config") or {}),
            raw=dict(data),
        )

    def volume(self, array: np.ndarray) -> Volume:
        """``array`` (the case's label map or image) as a Volume on the case's grid."""
        return Volume(array, self.geometry, self.modality)


@dataclass(frozen=True)
class Leftover:
    """Something `medsam-engine store clean` may remove: its ``kind`` (the report's line it is counted on),
    its ``path`` (local, or in the store's file system for the store's own records), its size in bytes and
    why it may go."""

    kind: str
    path: str
    size: int
    reason: str
