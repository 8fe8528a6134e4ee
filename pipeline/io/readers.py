"""Readers: files and DICOM series -> Volume with explicit geometry. No torch here.

Every 3D volume is brought to one canonical voxel order so the model always sees axial slices the way
radiologists display them (row 0 anterior, column 0 the patient's right; slices inferior to superior): the
array axes (x, y, z) follow L, P, S, the nearest-axis reorientation that nibabel computes from the affine
(no resampling). ``Geometry.source_affine``/``source_shape`` keep the input's own grid so exports land on it.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
from collections.abc import Callable, Iterable
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import numpy as np

from medsam_engine.pipeline.core.errors import ReadError
from medsam_engine.pipeline.core.limits import check_voxels
from medsam_engine.pipeline.core.orientation import LPS_TO_RAS, canonical_volume
from medsam_engine.pipeline.core.types import CaseRef, Geometry, Volume
from medsam_engine.pipeline.io.dicom import read_dicom_files, read_dicom_series
from medsam_engine.pipeline.io.dicom_seg_reader import is_dicom_seg, read_dicom_seg, seg_label_names
from medsam_engine.pipeline.io.formats import (
    DICOM,
    IMAGE_2D,
    NIFTI,
    NRRD,
    format_of,
    stem_of,
    suffix_of,
)
from medsam_engine.pipeline.io.isolate import WorkerCrash, default_pool
from medsam_engine.pipeline.io.nifti_labels import nifti_label_names
from medsam_engine.pipeline.io.slicer_seg import read_seg_nrrd, seg_nrrd_names

if TYPE_CHECKING:
    from medsam_engine.pipeline.io.isolate import IsolatedWorker, WorkerPool

log = logging.getLogger(__name__)

READ_TIMEOUT_S = 1800.0


IN_MEMORY_NIFTI_BYTES = 1 << 30  # a .nii.gz up to this size (uncompressed) is inflated in one call


def read_nifti(path: Path) -> Volume:
    import nibabel as nib

    image = cast(nib.Nifti1Image, nib.load(str(path)))  # Nifti2Image is a subclass
    check_voxels(image.header.get_data_shape(), path.name)
    size = int(np.prod(image.header.get_data_shape())) * image.header.get_data_dtype().itemsize
    if path.name.lower().endswith(".gz") and size <= IN_MEMORY_NIFTI_BYTES:
        # inflated at once by ISA-L and parsed from memory: much faster than nibabel's streamed gzip
        # (measured: docs/benchmarks.md); the same header, scaling and values
        from isal import igzip

        image = type(image).from_bytes(igzip.decompress(path.read_bytes()))
    data = np.asanyarray(image.dataobj)
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim == 2:
        data = data[:, :, None]
    if data.ndim != 3:
        raise ReadError(f"{path.name}: NIfTI with shape {data.shape} is not a 3D volume")
    return canonical_volume(data, image.affine, modality=None, source_format="nifti")


def _nrrd_affine(header: dict[str, Any], name: str) -> np.ndarray:
    directions = np.asarray(header.get("space directions"), dtype=float)
    if directions.shape != (3, 3) or not np.all(np.isfinite(directions)):
        raise ReadError(f"{name}: NRRD without 3 spatial 'space directions' (got {directions.shape})")
    origin = np.asarray(header.get("space origin", np.zeros(3)), dtype=float)
    affine = np.eye(4)
    affine[:3, :3] = directions.T
    affine[:3, 3] = origin
    space = str(header.get("space", "left-posterior-superior")).lower()
    if space in ("left-posterior-superior", "lps"):
        return LPS_TO_RAS @ affine
    if space in ("right-anterior-superior", "ras"):
        return affine
    if space in ("left-anterior-superior", "las"):
        return np.diag([-1.0, 1.0, 1.0, 1.0]) @ affine
    raise ReadError(f"{name}: NRRD space '{space}' is not supported")


def read_nrrd(path: Path) -> Volume:
    import nrrd

    check_voxels(nrrd.read_header(str(path)).get("sizes", ()), path.name)
    if path.name.lower().endswith(".seg.nrrd"):  # 3D Slicer's segments (in layers where they overlap)
        return read_seg_nrrd(path)
    data, header = nrrd.read(str(path))
    if data.ndim == 4 and data.shape[0] == 1:
        data = data[0]
        header = dict(header, **{"space directions": np.asarray(header["space directions"])[1:]})
    if data.ndim != 3:
        raise ReadError(
            f"{path.name}: NRRD with shape {data.shape} is not a single 3D volume "
            "(multi-layer segmentations must be flattened first)"
        )
    return canonical_volume(data, _nrrd_affine(header, path.name), modality=None, source_format="nrrd")


def read_image_2d(path: Path) -> Volume:
    """PNG/JPEG/TIFF/BMP (8 or 16 bit, grey or RGB) -> Volume of shape (1, H, W) or (1, H, W, 3)."""
    import cv2

    if suffix_of(path) in (".tif", ".tiff"):
        import tifffile

        with tifffile.TiffFile(str(path)) as tiff:
            check_voxels(tiff.series[0].shape if tiff.series else (0,), path.name)
            data = tiff.asarray()
    else:
        data = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
        if data is None:
            raise ReadError(f"{path.name}: not a readable image")
        if data.ndim == 3:
            data = cv2.cvtColor(data[..., :3], cv2.COLOR_BGR2RGB)
    data = np.asarray(data)
    if data.ndim == 3 and data.shape[-1] == 4:
        data = data[..., :3]
    if data.ndim == 3 and data.shape[-1] == 1:
        data = data[..., 0]
    if not (data.ndim == 2 or (data.ndim == 3 and data.shape[-1] == 3)):
        raise ReadError(f"{path.name}: image of shape {data.shape} is neither grey nor RGB 2D")
    array = data[None]
    affine = np.array([[0.0, 0, 1, 0], [0, 1, 0, 0], [1, 0, 0, 0], [0, 0, 0, 1]])
    geometry = Geometry(
        affine=affine,
        shape=array.shape[:3],
        source_affine=np.eye(4),
        source_shape=(array.shape[2], array.shape[1], 1),
        source_format="2d",
    )
    return Volume(array, geometry, "2D")


def _guarded(path: Path, where: str, read: Callable[[], Volume]) -> Volume:
    """Run ``read()``; third-party failures become a ReadError naming ``where`` (paths reduced to names)."""
    try:
        volume = read()
    except ReadError as exc:
        if exc.reason.startswith(where):
            raise
        raise ReadError(f"{where}: {exc.reason}") from exc
    except Exception as exc:  # corrupt input makes third-party readers raise anything; keep the cause
        detail = str(exc)
        for place, name in ((path.resolve(), path.name), (path, path.name), (path.parent, "…")):
            detail = detail.replace(str(place), name)
        suffix = suffix_of(path) if path.is_file() else "DICOM"
        why = f"{type(exc).__name__}: {detail[:300]}"
        raise ReadError(f"{where}: unreadable {suffix or 'file'} ({why})") from exc
    if volume.array.dtype.kind in "fc":
        bad = int(volume.array.size - np.count_nonzero(np.isfinite(volume.array)))
        if bad:
            raise ReadError(
                f"{where}: {bad} voxel{'s' if bad > 1 else ''} NaN or infinite; the model needs finite "
                "intensities (fill them, e.g. with the background value, and rerun)"
            )
    return volume


def mask_folder_files(folder: str | Path) -> list[Path]:
    """The masks of a folder that holds one mask per structure (TotalSegmentator's output: ``liver.nii.gz``,
    ``spleen.nii.gz``, ...), in name order; [] unless the folder holds NIfTI/NRRD files and nothing else."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    files = sorted(p for p in folder.iterdir() if not p.name.startswith("."))
    if not files or not all(p.is_file() and format_of(p) in (NIFTI, NRRD) for p in files):
        return []
    return files


def read_mask_folder(folder: str | Path) -> Volume:
    """A folder of one mask per structure as one label map: the n-th file in name order (non-zero voxels)
    becomes label n; a later structure wins where two overlap. ReadError when a mask lies on another grid."""
    files = mask_folder_files(folder)
    if not files:
        raise ReadError(f"{Path(folder).name}: not a folder of NIfTI/NRRD masks")
    first = read_volume(files[0])
    labels = np.zeros(first.shape[:3], dtype=np.uint16)
    for value, path in enumerate(files, start=1):
        mask = first if value == 1 else read_volume(path)
        if mask.shape[:3] != labels.shape or not np.allclose(
            mask.geometry.affine, first.geometry.affine, atol=1e-3
        ):
            raise ReadError(
                f"{path.name}: not on the grid of {files[0].name}: the masks of a folder share one grid"
            )
        labels[np.asarray(mask.array) != 0] = value
    return replace(first, array=labels, modality="SEG")


def mask_folder_names(folder: str | Path) -> dict[int, str]:
    """Label value -> structure name (the file's stem) of a folder read by :func:`read_mask_folder`."""
    return {value: stem_of(path) for value, path in enumerate(mask_folder_files(folder), start=1)}


def read_volume(path: str | Path) -> Volume:
    """Read one image or label map; raises ReadError naming the file and the reason."""
    path = Path(path)
    if not path.exists():
        raise ReadError(f"{path.name}: no such file or folder")
    suffix, fmt = suffix_of(path), format_of(path)
    readers = {NIFTI: read_nifti, NRRD: read_nrrd, IMAGE_2D: read_image_2d}
    if not path.is_dir() and fmt in readers:
        read = readers[fmt]
        return _guarded(path, path.name, lambda: read(path))
    if path.is_dir() and mask_folder_files(path):  # one mask per structure
        return read_mask_folder(path)
    # DICOM: a series folder, a DICOM suffix, or a file with no suffix or the 'DICM' marker (often unnamed)
    dicom_file = not path.is_dir() and (fmt is DICOM or not suffix or has_dicom_marker(path))
    if dicom_file and is_dicom_seg(path):  # a segmentation (a coarse mask or a correction)
        return _guarded(path, path.name, lambda: read_dicom_seg(path))
    if path.is_dir() or dicom_file:
        return _guarded(path, path.name, lambda: read_dicom_series(path))
    raise ReadError(f"{path.name}: unsupported file type '{suffix}'")


def has_dicom_marker(path: Path) -> bool:
    """True when the file carries the DICOM Part 10 'DICM' marker after its 128-byte preamble."""
    try:
        with open(path, "rb") as handle:
            return handle.read(132)[128:132] == b"DICM"
    except OSError:
        return False


def case_label(case: CaseRef) -> str:
    """How a case is named in messages: the file or folder name, and the series' short hash (never a UID)."""
    name = Path(case.image).name
    return f"{name} series {case.series[:8]}" if case.series else name


def read_case_here(case: CaseRef) -> Volume:
    """:func:`read_case` in this process (no isolation)."""
    if case.error:
        raise ReadError(case.error)
    if case.files:
        where = case_label(case)
        return _guarded(
            Path(case.files[0]), where, lambda: read_dicom_files([Path(f) for f in case.files], where=where)
        )
    volume = read_volume(case.image)
    for channel in case.channels:
        if channel != case.image:
            _check_channel(Path(channel), volume, Path(case.image).name)
    return volume


def _source_grid(path: Path) -> tuple[tuple[int, ...], np.ndarray]:
    """The (i, j, k) shape and voxel-to-RAS affine of an image file as its reader takes them, from the
    header alone for NIfTI and NRRD."""
    fmt = format_of(path)
    if fmt is NIFTI:
        import nibabel as nib

        image = cast(nib.Nifti1Image, nib.load(str(path)))
        shape = tuple(int(n) for n in image.header.get_data_shape())
        shape = shape[:3] if len(shape) == 4 and shape[3] == 1 else shape
        return ((*shape, 1) if len(shape) == 2 else shape), np.asarray(image.affine)
    if fmt is NRRD:
        import nrrd

        header = nrrd.read_header(str(path))
        sizes = tuple(int(n) for n in header.get("sizes", ()))
        if len(sizes) == 4 and sizes[0] == 1:
            sizes = sizes[1:]
            header = dict(header, **{"space directions": np.asarray(header["space directions"])[1:]})
        return sizes, _nrrd_affine(header, path.name)
    geometry = read_volume(path).geometry
    return tuple(geometry.source_shape), np.asarray(geometry.source_affine)


def _check_channel(path: Path, volume: Volume, name: str) -> None:
    """Nothing when the channel file ``path`` lies on the grid of ``volume`` (read from the file ``name``):
    the same shape, and an affine within 1e-3 mm; ReadError naming both files otherwise (nnU-Net's channels
    share one grid), or naming ``path`` when it cannot be read."""
    if not path.is_file():
        raise ReadError(f"{path.name}: no such file (a channel of the case of {name})")
    try:
        shape, affine = _source_grid(path)
    except ReadError:
        raise
    except Exception as exc:  # corrupt headers make third-party readers raise anything; keep the cause
        detail = str(exc).replace(str(path.resolve()), path.name).replace(str(path), path.name)
        raise ReadError(f"{path.name}: unreadable channel ({type(exc).__name__}: {detail[:200]})") from exc
    geometry = volume.geometry
    if tuple(shape) != tuple(geometry.source_shape):
        why = f"shape {tuple(shape)}, not {tuple(geometry.source_shape)}"
    elif not np.allclose(affine, geometry.source_affine, atol=1e-3):
        moved = float(np.abs(np.asarray(affine) - np.asarray(geometry.source_affine)).max())
        why = f"its affine differs by up to {moved:.3g} mm"
    else:
        return
    raise ReadError(
        f"{path.name}: not on the grid of {name} ({why}); the channels of an nnU-Net case share one grid"
    )


def read_case(
    case: CaseRef,
    *,
    isolated: bool = True,
    worker: IsolatedWorker | WorkerPool | None = None,
    timeout_s: float | None = None,
) -> Volume:
    """The engine's entry point: a case's image as a canonical Volume, or a ReadError with the reason.

    Decoding runs in an isolated child process (see :mod:`pipeline.io.isolate`): a decoder that crashes or
    hangs fails this case only. ``timeout_s`` defaults to $MEDSAM_ENGINE_READ_TIMEOUT_S, else 1800 s.
    """
    if case.error:
        raise ReadError(case.error)
    try:
        if not isolated:
            return read_case_here(case)
        return _read_isolated(case, worker, timeout_s)
    except ReadError as exc:
        if not case.unreadable_nearby:
            raise
        names = ", ".join(case.unreadable_nearby[:5]) + (" …" if len(case.unreadable_nearby) > 5 else "")
        raise ReadError(
            f"{exc.reason}; {len(case.unreadable_nearby)} unreadable file(s) beside the series, "
            f"perhaps its missing slices: {names}"
        ) from exc


def libraries_for(cases: Iterable[CaseRef] | None) -> tuple[str, ...]:
    """The modules that reading ``cases`` will import (by each input's format, pipeline/io/formats.py);
    None: those of DICOM and NIfTI, the formats an archive mostly holds."""
    if cases is None:
        return DICOM.libraries + NIFTI.libraries
    formats = {(None if case.files else format_of(case.image)) or DICOM for case in cases}
    return tuple(name for fmt in sorted(formats, key=lambda f: f.name) for name in fmt.libraries)


def preload(names: tuple[str, ...]) -> None:
    """Import ``names`` in a reader process as it starts (:func:`warm_readers`) instead of in its first case,
    which would wait for those imports (measured: docs/benchmarks.md). Never raises: a library that cannot be
    imported fails where a read needs it, with its reason."""
    import importlib

    for name in names:
        with contextlib.suppress(Exception):
            importlib.import_module(name)


def warm_readers(count: int, cases: Iterable[CaseRef] | None = None, *, when_needed: bool = False) -> int:
    """Start reader processes until this process's pool holds ``count`` (one per case worker), each
    importing the libraries that reading ``cases`` needs (:func:`libraries_for`) while the caller goes on: the
    first cases of a run don't each wait for an interpreter and its imports. Now, or with ``when_needed`` at
    the first read. Returns how many were started now."""
    return default_pool().warm(
        count, preload=functools.partial(preload, libraries_for(cases)), when_needed=when_needed
    )


def _read_isolated(
    case: CaseRef, worker: IsolatedWorker | WorkerPool | None, timeout_s: float | None
) -> Volume:
    if timeout_s is None:
        timeout_s = float(os.environ.get("MEDSAM_ENGINE_READ_TIMEOUT_S", READ_TIMEOUT_S))
    try:
        volume: Volume = (worker or default_pool()).call(read_case_here, _absolute(case), timeout_s=timeout_s)
        return volume
    except WorkerCrash as exc:
        log.error("reader process for %s ended: %s", case.case_id, exc.why)
        raise ReadError(
            f"{case_label(case)}: the image decoder crashed ({exc.why}); the file is probably "
            "corrupt or uses an encoding the decoder mishandles"
        ) from exc


def _absolute(case: CaseRef) -> CaseRef:
    """The case with absolute local paths: a reader process keeps the working directory it was started in,
    which need not be this process's working directory now."""

    def absolute(path: str) -> str:
        return path if "://" in path else os.path.abspath(path)

    return replace(case, image=absolute(case.image), files=tuple(absolute(f) for f in case.files))


def label_names_of(path: str | Path) -> dict[int, str]:
    """Label value -> name stored with a label map (3D Slicer's .seg.nrrd ``Segment<i>_Name`` and
    ``Segment<i>_LabelValue`` header keys, a DICOM SEG's segment labels, the label table in a NIfTI header
    extension as TotalSegmentator's multilabel output carries it, a mask folder's file names); {} when the
    file names none."""
    if Path(path).is_dir():
        return mask_folder_names(path)
    if format_of(path) is NIFTI:
        return nifti_label_names(path)
    if not str(path).lower().endswith(".nrrd"):
        if Path(path).is_file() and is_dicom_seg(path):
            try:
                return seg_label_names(path)
            except Exception:
                return {}
        return {}
    import nrrd

    try:
        header = nrrd.read_header(str(path))
    except (OSError, nrrd.NRRDError):
        return {}
    if str(path).lower().endswith(".seg.nrrd") and any(k.startswith("Segment") for k in header):
        try:
            return seg_nrrd_names(path)  # values as read_seg_nrrd gives them
        except ReadError:
            return {}
    names = {}
    for key, value in header.items():
        if key.startswith("Segment") and key.endswith("_Name"):
            index = key[len("Segment") : -len("_Name")]
            label = header.get(f"Segment{index}_LabelValue", int(index) + 1 if index.isdigit() else None)
            if label is not None:
                names[int(label)] = str(value)
    return names
