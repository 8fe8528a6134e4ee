"""Shards: cases grouped so that every shard holds about as many slices (a slice never crosses shards).

The slice count of a case is read from headers only (NIfTI/NRRD headers, the number of files of a DICOM
series, NumberOfFrames of a multi-frame object), in a thread pool: no pixel data is decoded here.
No Prefect and no Ray in this module.
"""

from __future__ import annotations

import heapq
import logging
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from medsam_engine.pipeline.core.types import CaseRef
from medsam_engine.pipeline.io.readers import NIFTI_SUFFIXES, NRRD_SUFFIXES, suffix_of

log = logging.getLogger(__name__)


def _nifti_slices(path: Path) -> int:
    import nibabel as nib

    image = nib.load(str(path))  # reads the header; the data stays on disk
    shape = image.shape
    if len(shape) < 3:
        return 1
    codes = nib.aff2axcodes(image.affine)
    axial = [i for i, code in enumerate(codes[:3]) if code in ("S", "I")]
    return int(shape[axial[0]] if axial else shape[2])


def _nrrd_slices(path: Path) -> int:
    import nrrd
    import numpy as np

    header = nrrd.read_header(str(path))
    sizes = [int(s) for s in header["sizes"]]
    if len(sizes) < 3:
        return 1
    directions = header.get("space directions")
    try:
        spatial = [i for i, d in enumerate(directions) if d is not None and np.all(np.isfinite(d))]
        axial = max(spatial, key=lambda i: abs(float(np.asarray(directions[i])[2])))
        return sizes[axial]
    except (TypeError, ValueError, IndexError):
        return sizes[-1]


def _frames(path: Path) -> int:
    import pydicom

    header = pydicom.dcmread(str(path), stop_before_pixels=True, specific_tags=["NumberOfFrames"])
    return int(getattr(header, "NumberOfFrames", 1) or 1)


def estimate_slices(case: CaseRef) -> int:
    """The number of axial slices the case has, from headers; 0 for a case that will fail at reading, 1 when
    the headers do not say."""
    if case.error:
        return 0
    try:
        if case.kind == "dicom-series":
            return len(case.files)
        if case.kind == "dicom-multiframe":
            return _frames(Path(case.files[0]))
        suffix = suffix_of(case.image)
        if suffix in NIFTI_SUFFIXES:
            return _nifti_slices(Path(case.image))
        if suffix in NRRD_SUFFIXES or suffix == ".seg.nrrd":
            return _nrrd_slices(Path(case.image))
    except Exception as exc:
        log.debug("case %s: no slice count from its header (%s)", case.case_id, type(exc).__name__)
    return 1


def slice_counts(cases: list[CaseRef], *, workers: int = 8) -> list[int]:
    """:func:`estimate_slices` of every case, in the order given (headers read in ``workers`` threads)."""
    if not cases:
        return []
    with ThreadPoolExecutor(max_workers=min(workers, len(cases))) as pool:
        return list(pool.map(estimate_slices, cases))


def balance(weights: list[int], shards: int) -> list[list[int]]:
    """Indices of ``weights`` split into at most ``shards`` non-empty groups of near-equal total (largest
    first into the lightest group; each case also costs 1 for its fixed overhead). Order within a group
    follows the input order."""
    if shards < 1:
        raise ValueError(f"Argument 'shards' must be at least 1; got {shards}")
    heap = [(0, index) for index in range(min(shards, len(weights)))]
    groups: list[list[int]] = [[] for _ in heap]
    for item in sorted(range(len(weights)), key=lambda i: -weights[i]):
        load, index = heapq.heappop(heap)
        groups[index].append(item)
        heapq.heappush(heap, (load + weights[item] + 1, index))
    return [sorted(group) for group in groups if group]
