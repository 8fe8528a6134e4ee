"""DICOM files -> Volume: slices sorted along the normal, spacing from positions, HU via the modality LUT.

Three shapes of input, as grouped by :mod:`pipeline.io.dicom_scan`:

* a single-frame series (one file per slice): sorted by position along the slice normal (never by
  InstanceNumber); spacing from the positions (``SpacingBetweenSlices`` can lie); gaps, duplicates and uneven
  steps are refused with the positions in mm; oblique and tilted series keep their affine;
* a multi-frame file with per-frame positions (enhanced CT/MR): read through highdicom, which applies the
  per-frame rescale that pydicom's ``apply_modality_lut`` ignores;
* a planar image or frame stack without patient geometry (CR, DX, US cine, photos): frames in file order,
  pixel spacing kept, no reorientation (like a PNG).

Pixel decoding may crash the process on corrupt input; :func:`pipeline.io.readers.read_case` runs this module
in an isolated worker process for that reason.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np
import numpy.typing as npt

from medsam_engine.pipeline.core.errors import ReadError
from medsam_engine.pipeline.core.limits import check_voxels
from medsam_engine.pipeline.core.orientation import LPS_TO_RAS, canonical_flips, canonical_volume
from medsam_engine.pipeline.core.types import Geometry, Volume
from medsam_engine.pipeline.io.dicom_scan import NOT_ANNOTATED_CLASSES, group_series, scan_headers

if TYPE_CHECKING:
    from pydicom import Dataset
    from pydicom.uid import UID

DEFAULT_ORIENTATION = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
IRREGULAR_STEP = 0.2  # relative deviation of one slice step from the median that is refused
T = TypeVar("T")


def _syntax(ds: Dataset) -> UID:
    from pydicom.uid import UID

    return UID(str(getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", "") or "1.2.840.10008.1.2"))


def check_decodable(ds: Dataset, where: str) -> None:
    """Refuse, with the reason, a dataset without pixel data or in a syntax no installed decoder reads."""
    from pydicom.pixels import get_decoder

    syntax = _syntax(ds)
    if not any(k in ds for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
        raise ReadError(f"{where}: no pixel data in the file")
    if syntax.is_compressed:
        try:
            decoder = get_decoder(syntax)
        except NotImplementedError as exc:
            raise ReadError(f"{where}: unsupported transfer syntax {syntax.name} ({syntax})") from exc
        if not decoder.is_available:
            raise ReadError(
                f"{where}: no decoder installed for transfer syntax {syntax.name} (install "
                "pylibjpeg, pylibjpeg-libjpeg, pylibjpeg-openjpeg, pylibjpeg-rle, pyjpegls)"
            )


def decoding(ds: Dataset, where: str, call: Callable[[], T]) -> T:
    """Run ``call()`` (which decodes ``ds``); any failure becomes a ReadError naming the syntax and reason."""
    check_decodable(ds, where)
    try:
        return call()
    except ReadError:
        raise
    except BaseException as exc:
        if isinstance(exc, (KeyboardInterrupt, SystemExit)):
            raise
        raise ReadError(
            f"{where}: pixel data could not be decoded (transfer syntax {_syntax(ds).name}: "
            f"{type(exc).__name__}: {str(exc)[:200]})"
        ) from exc


def decode_pixels(ds: Dataset, where: str) -> np.ndarray:
    """``ds.pixel_array`` with every failure turned into a ReadError that names the syntax and the reason."""
    return decoding(ds, where, lambda: ds.pixel_array)


NATIVE_LITTLE_ENDIAN = ("1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.1.99")


def native_grey_frame(ds: Dataset) -> np.ndarray | None:
    """The one greyscale frame of uncompressed little-endian 8/16-bit pixel data, read straight from the
    buffer; None for anything else (pydicom decodes that).

    The same array as ``ds.pixel_array`` (bits above Bits Stored cleared, or sign-extended when signed, as
    pydicom's native decoder does), without pydicom's per-call set-up and checks, which cost as much as
    reading the file (measured: docs/benchmarks.md). Data shorter than the frame is left to pydicom, which
    names the fault.
    """
    if str(_syntax(ds)) not in NATIVE_LITTLE_ENDIAN:
        return None
    try:
        rows, columns = int(ds.Rows), int(ds.Columns)
        allocated, stored = int(ds.BitsAllocated), int(ds.BitsStored)
        signed = int(ds.PixelRepresentation)
        samples, frames = int(ds.get("SamplesPerPixel", 1) or 1), int(ds.get("NumberOfFrames", 1) or 1)
        data = ds.get("PixelData")
    except (AttributeError, KeyError, TypeError, ValueError):
        return None
    if (
        samples != 1
        or frames != 1
        or allocated not in (8, 16)
        or not 0 < stored <= allocated
        or signed not in (0, 1)
        or rows <= 0
        or columns <= 0
        or not isinstance(data, bytes)
        or len(data) < rows * columns * allocated // 8
    ):
        return None
    dtype = np.dtype(f"<{'i' if signed else 'u'}{allocated // 8}")
    plane: np.ndarray = np.frombuffer(data, dtype=dtype, count=rows * columns).reshape(rows, columns).copy()
    if stored < allocated:
        shift = allocated - stored
        np.left_shift(plane, shift, out=plane)
        np.right_shift(plane, shift, out=plane)
    return plane


def _compact(values: np.ndarray, stored: npt.DTypeLike = np.int16) -> np.ndarray:
    """Values as uint8 (8-bit stored data) or int16 when exact (HU usually is), else float32."""
    if not values.size or (values.dtype.kind == "f" and not np.all(values == np.rint(values))):
        return values.astype(np.float32)
    low, high = values.min(), values.max()
    if np.dtype(stored) == np.uint8 and low >= 0 and high <= 255:
        return values.astype(np.uint8)
    return values.astype(np.int16) if low >= -32768 and high <= 32767 else values.astype(np.float32)


def _compact_stack(
    planes: list[np.ndarray], flips: tuple[bool, bool, bool] | None = None, shifts: list[int] | None = None
) -> np.ndarray:
    """``_compact(np.stack(planes + shifts))`` (k, rows, cols) without a whole-series copy of wider values
    when every plane holds integers: the range is taken plane by plane and each plane (plus its shift, in
    int32) is written once into the int16 (or float32) result. ``flips`` (columns, rows, planes) are applied
    in that same copy."""
    cols, rows, order = (-1 if f else 1 for f in (flips or (False, False, False)))
    shifts = shifts or [0] * len(planes)
    if not planes or any(p.dtype.kind not in "iu" for p in planes):
        return _compact(
            np.stack([p + s if s else p for p, s in zip(planes, shifts, strict=False)])[
                ::order, ::rows, ::cols
            ]
        )
    low = min(int(p.min()) + s for p, s in zip(planes, shifts, strict=False))
    high = max(int(p.max()) + s for p, s in zip(planes, shifts, strict=False))
    out = np.empty(
        (len(planes), *planes[0].shape), dtype=np.int16 if low >= -32768 and high <= 32767 else np.float32
    )
    for index, (plane, shift) in enumerate(list(zip(planes, shifts, strict=False))[::order]):
        np.add(plane[::rows, ::cols], shift, out=out[index], dtype=np.int32, casting="unsafe")
    return out


def _modality_stack(frames: list[tuple[Any, ...]], flips: tuple[bool, bool, bool] | None) -> np.ndarray:
    """The modality values of a series' (dataset, stored pixels) frames as one compact (k, rows, cols) stack:
    ``_compact_stack([grey_values(ds, pixels) ...], flips)``.

    When every frame has 8/16-bit integer pixels, a unit slope and a whole intercept (CT's usual 1/-1024; no
    Modality LUT, not MONOCHROME1), each frame is written once, straight from its stored values plus the
    intercept: the same values without an int32 copy of every frame."""
    rescales = [_integer_rescale(ds, pixels) for ds, pixels in frames]
    if (
        frames
        and all(rescale is not None and rescale[0] == 1 for rescale in rescales)
        and all(str(getattr(ds, "PhotometricInterpretation", "")) != "MONOCHROME1" for ds, _ in frames)
    ):
        return _compact_stack(
            [pixels for _, pixels in frames], flips, shifts=[r[1] for r in rescales if r is not None]
        )
    return _compact_stack([grey_values(ds, pixels) for ds, pixels in frames], flips)


def _integer_rescale(ds: Dataset, pixels: np.ndarray) -> tuple[int, int] | None:
    """(slope, intercept) when the modality transform maps integers to integers exactly (integer pixels, no
    Modality LUT, whole-number slope and intercept: CT's usual 1 and -1024), else None."""
    if pixels.dtype.kind not in "iu" or pixels.dtype.itemsize > 2 or "ModalityLUTSequence" in ds:
        return None
    try:
        slope, intercept = float(ds.get("RescaleSlope", 1) or 1), float(ds.get("RescaleIntercept", 0) or 0)
    except (TypeError, ValueError):
        return None
    if slope != round(slope) or intercept != round(intercept) or max(abs(slope), abs(intercept)) > 1 << 15:
        return None
    return int(slope), int(intercept)


def grey_values(ds: Dataset, pixels: np.ndarray) -> np.ndarray:
    """Stored values -> modality values (HU for CT): int32 when the rescale is in whole numbers (the same
    values as pydicom's float64 arithmetic, without it), else float32; MONOCHROME1 inverted over the stored
    range."""
    from pydicom.pixels import apply_modality_lut

    rescale = _integer_rescale(ds, pixels)
    if rescale is not None:
        values = pixels.astype(np.int32)
        if rescale != (1, 0):
            values *= rescale[0]
            values += rescale[1]
    else:
        values = np.asarray(apply_modality_lut(pixels, ds), dtype=np.float32)
    if str(getattr(ds, "PhotometricInterpretation", "")) == "MONOCHROME1":
        bits = int(getattr(ds, "BitsStored", 16) or 16)
        signed = int(getattr(ds, "PixelRepresentation", 0) or 0) == 1
        stored = np.array([-(1 << (bits - 1)), (1 << (bits - 1)) - 1] if signed else [0, (1 << bits) - 1])
        low, high = np.asarray(apply_modality_lut(stored, ds), dtype=values.dtype)
        values = (low + high) - values
    return values


def colour_values(ds: Dataset, pixels: np.ndarray) -> np.ndarray:
    """RGB (or palette colour) pixels -> uint8 RGB with the channel last."""
    from pydicom.pixels import apply_color_lut

    if str(getattr(ds, "PhotometricInterpretation", "")) == "PALETTE COLOR":
        pixels = apply_color_lut(pixels, ds)
    if pixels.dtype != np.uint8:
        top = float(pixels.max()) if pixels.size else 0.0
        pixels = (pixels.astype(np.float32) * (255.0 / top if top > 255 else 1.0)).round().astype(np.uint8)
    return pixels


def _is_colour(ds: Dataset) -> bool:
    return (
        int(getattr(ds, "SamplesPerPixel", 1) or 1) == 3
        or str(getattr(ds, "PhotometricInterpretation", "")) == "PALETTE COLOR"
    )


def _modality(ds: Dataset) -> str:
    return str(getattr(ds, "Modality", "") or "OT")


def _planar_volume(frames: np.ndarray, ds: Dataset) -> Volume:
    """(frames, rows, cols[, 3]) without patient geometry -> Volume in file order, pixel spacing kept."""
    spacing = getattr(ds, "PixelSpacing", None) or getattr(ds, "ImagerPixelSpacing", None) or [1.0, 1.0]
    try:
        dy, dx = (float(v) for v in spacing)
    except (TypeError, ValueError):
        dy, dx = 1.0, 1.0
    dy, dx = (dy if dy > 0 else 1.0), (dx if dx > 0 else 1.0)
    affine = np.array([[0.0, 0, dx, 0], [0, dy, 0, 0], [1, 0, 0, 0], [0, 0, 0, 1]])
    geometry = Geometry(
        affine=affine,
        shape=tuple(int(s) for s in frames.shape[:3]),  # type: ignore[arg-type]
        source_affine=np.diag([dx, dy, 1.0, 1.0]),
        source_shape=(frames.shape[2], frames.shape[1], frames.shape[0]),
        source_format="2d",
    )
    return Volume(frames, geometry, _modality(ds))


def _has_frame_positions(ds: Dataset) -> bool:
    for name in ("SharedFunctionalGroupsSequence", "PerFrameFunctionalGroupsSequence"):
        groups = ds.get(name) or []
        if groups and "PlanePositionSequence" in groups[0]:
            return True
    return False


def read_multiframe(ds: Dataset, where: str) -> Volume:
    """One multi-frame file: a volume when its frames carry plane positions (enhanced CT/MR), else a stack."""
    if not _has_frame_positions(ds):
        pixels = decode_pixels(ds, where)
        frames = int(getattr(ds, "NumberOfFrames", 1) or 1)
        if _is_colour(ds):
            array = colour_values(ds, pixels)
            array = array[None] if frames == 1 else array
        else:
            array = _compact(grey_values(ds, pixels), pixels.dtype)
            array = array[None] if array.ndim == 2 else array
        return _planar_volume(array, ds)
    import highdicom as hd

    try:
        image = hd.Image.from_dataset(ds, copy=False)
        regular = image.get_volume_geometry(allow_duplicate_positions=False) is not None
    except (RuntimeError, ValueError, AttributeError, KeyError) as exc:
        raise ReadError(f"{where}: frame positions cannot be read ({exc})") from exc
    if not regular:
        raise ReadError(
            f"{where}: the {ds.get('NumberOfFrames', '?')} frames do not form one regularly "
            "spaced volume (gaps, repeated positions or several stacks)"
        )
    volume = decoding(
        ds,
        where,
        lambda: image.get_volume(
            dtype=np.float32,
            apply_modality_transform=True,
            apply_real_world_transform=False,
            apply_voi_transform=False,
            apply_presentation_lut=False,
        ),
    )
    array_ijk = np.transpose(_compact(np.asarray(volume.array)), (2, 1, 0))
    affine_lps = np.asarray(volume.affine, dtype=float)[:, [2, 1, 0, 3]]
    modality = _modality(ds)
    return canonical_volume(
        array_ijk,
        LPS_TO_RAS @ affine_lps,
        modality=modality if modality in ("CT", "MR") else None,
        source_format="dicom",
    )


def _geometry_of(ds: Dataset) -> tuple[np.ndarray, np.ndarray]:
    orientation = np.asarray(getattr(ds, "ImageOrientationPatient", None) or DEFAULT_ORIENTATION, dtype=float)
    position = np.asarray(getattr(ds, "ImagePositionPatient", None) or (0.0, 0.0, 0.0), dtype=float)
    if orientation.shape != (6,) or position.shape != (3,):
        raise ReadError("ImageOrientationPatient/ImagePositionPatient have the wrong number of values")
    return orientation, position


def _slice_vector(positions_mm: np.ndarray, normal: np.ndarray, first: Dataset, where: str) -> np.ndarray:
    """The step between consecutive sorted slices (LPS mm), refusing duplicates, gaps and uneven steps."""
    if len(positions_mm) == 1:
        thickness = float(getattr(first, "SliceThickness", None) or 1.0)
        return normal * (thickness if thickness > 0 else 1.0)
    along = positions_mm @ normal
    steps = np.diff(along)
    if np.any(steps <= 1e-3):
        raise ReadError(
            f"{where}: {int(np.sum(steps <= 1e-3)) + 1} slices share a position (several "
            "acquisitions, echoes or phases in one series); split them before annotating"
        )
    median = float(np.median(steps[steps <= 1.5 * steps.min()]))  # the regular step; gaps are multiples
    gaps = np.nonzero(steps > 1.5 * median)[0]
    if gaps.size:
        i = int(gaps[0])
        missing = int(round(steps[i] / median)) - 1
        more = f"; {gaps.size} gaps in all" if gaps.size > 1 else ""
        raise ReadError(
            f"{where}: {max(missing, 1)} slice{'s' if missing > 1 else ''} missing between "
            f"z={along[i]:.2f} mm and z={along[i + 1]:.2f} mm (step {steps[i]:.2f} mm, "
            f"usual step {median:.2f} mm){more}"
        )
    uneven = np.nonzero(np.abs(steps - median) > IRREGULAR_STEP * median)[0]
    if uneven.size:
        i = int(uneven[0])
        raise ReadError(
            f"{where}: uneven slice spacing: step {steps[i]:.2f} mm at z={along[i]:.2f} mm where "
            f"the usual step is {median:.2f} mm"
        )
    step: np.ndarray = (positions_mm[-1] - positions_mm[0]) / (len(positions_mm) - 1)
    return step


def read_series(datasets: list[Any], where: str, names: list[str] | None = None) -> Volume:
    """Single-frame datasets of one series -> canonical Volume (sorted along the normal; see module doc)."""
    names = names or [f"file {k + 1}" for k in range(len(datasets))]
    first = datasets[0]
    orientation, _ = _geometry_of(first)
    row_dir, col_dir = orientation[:3], orientation[3:]
    normal = np.cross(row_dir, col_dir)
    if not np.isclose(np.linalg.norm(normal), 1.0, atol=1e-2):
        raise ReadError(f"{where}: ImageOrientationPatient is not two orthogonal unit vectors")
    positions, size = [], (int(first.Rows), int(first.Columns))
    for ds, name in zip(datasets, names, strict=True):
        this_orientation, position = _geometry_of(ds)
        if (int(ds.Rows), int(ds.Columns)) != size or np.max(np.abs(this_orientation - orientation)) > 1e-3:
            raise ReadError(f"{where}: {name} differs in size or orientation from the rest of the series")
        positions.append(position)
    order = np.argsort(np.asarray(positions) @ normal, kind="stable")
    positions_mm = np.asarray(positions)[order]
    slice_vector = _slice_vector(positions_mm, normal, first, where)
    frames = []
    for index in order:
        ds = datasets[index]
        pixels = native_grey_frame(ds)
        if pixels is None:
            pixels = decode_pixels(ds, where if names[index] == where else f"{where}, {names[index]}")
        if pixels.shape != size:
            raise ReadError(f"{where}: {names[index]} decodes to {pixels.shape}, not one {size} slice")
        frames.append((ds, pixels))
    row_spacing, col_spacing = (float(v) for v in (getattr(first, "PixelSpacing", None) or [1.0, 1.0]))
    affine_lps = np.eye(4)
    affine_lps[:3, 0] = row_dir * col_spacing  # i: column index
    affine_lps[:3, 1] = col_dir * row_spacing  # j: row index
    affine_lps[:3, 2] = slice_vector
    affine_lps[:3, 3] = positions_mm[0]
    affine_ras = LPS_TO_RAS @ affine_lps
    flips = canonical_flips(affine_ras)  # an axial series: reoriented while its planes are stacked
    stack = _modality_stack(frames, flips)  # (k, rows, cols)
    modality = _modality(first)
    return canonical_volume(
        np.transpose(stack, (2, 1, 0)),
        affine_ras,
        flipped=flips is not None,
        modality=modality if modality in ("CT", "MR") else None,
        source_format="dicom",
    )


def _read_dataset(path: Path, where: str) -> Dataset:
    import pydicom

    try:
        return pydicom.dcmread(str(path))
    except Exception as exc:  # corrupt files make the parser raise many types
        what = "the file" if path.name == where else path.name
        raise ReadError(
            f"{where}: {what} is not a readable DICOM file ({type(exc).__name__}: {str(exc)[:160]})"
        ) from exc


def read_dicom_files(files: list[Path], *, where: str) -> Volume:
    """The files of one group (see dicom_scan.group_series) -> Volume."""
    if not files:
        raise ReadError(f"{where}: no DICOM files")
    datasets = [_read_dataset(Path(f), where) for f in files]
    names = [Path(f).name for f in files]
    for ds, name in zip(datasets, names, strict=True):
        what = "" if name == where else f"{name} "
        sop_class = str(ds.get("SOPClassUID", ""))
        if sop_class in NOT_ANNOTATED_CLASSES:
            kind = NOT_ANNOTATED_CLASSES[sop_class]
            raise ReadError(f"{where}: {what}is a DICOM {kind} object, not an image")
        if "Rows" not in ds or "Columns" not in ds:
            raise ReadError(f"{where}: {what}is not an image (no Rows/Columns)")
    planes = sum(
        int(ds.get("NumberOfFrames", 1) or 1) * int(ds.get("SamplesPerPixel", 1) or 1) for ds in datasets
    )
    check_voxels((int(datasets[0].Rows or 0), int(datasets[0].Columns or 0), planes), where)
    multi = [ds for ds in datasets if int(ds.get("NumberOfFrames", 1) or 1) > 1 or _has_frame_positions(ds)]
    if multi:
        if len(datasets) > 1:
            raise ReadError(f"{where}: a multi-frame file is mixed with {len(datasets) - 1} other files")
        return read_multiframe(datasets[0], where)
    if len(datasets) == 1 and (
        "ImagePositionPatient" not in datasets[0] or "ImageOrientationPatient" not in datasets[0]
    ):
        ds = datasets[0]
        pixels = decode_pixels(ds, where)
        if _is_colour(ds):
            array = colour_values(ds, pixels)
        else:
            array = _compact(grey_values(ds, pixels), pixels.dtype)
        return _planar_volume(array[None], ds)
    return read_series(datasets, where, names)


def read_dicom_series(path: Path, *, keep_localizers: bool = False, keep_derived: bool = False) -> Volume:
    """Read one series given as a folder or a single file; a folder with several series is refused."""
    path = Path(path)
    if path.is_file():
        return read_dicom_files([path], where=path.name)
    files = sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))
    if not files:
        raise ReadError(f"{path.name}: folder holds no files")
    scan = scan_headers(files)
    groups, dropped = group_series(scan.headers, keep_localizers=keep_localizers, keep_derived=keep_derived)
    if not groups:
        skipped = dict(dropped + scan.ignored)
        raise ReadError(
            f"{path.name}: no DICOM image series found ({len(files)} files"
            + (f"; skipped {skipped}" if skipped else "")
            + ")"
        )
    if len(groups) > 1:
        sizes = sorted((len(g.files) for g in groups), reverse=True)
        raise ReadError(
            f"{path.name}: holds {len(groups)} series or orientations (files per series "
            f"{sizes}); discovery splits such folders into one case per series"
        )
    return read_dicom_files([Path(f) for f in groups[0].files], where=path.name)
