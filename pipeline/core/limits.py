"""Bounds on what one input may claim, checked from its header before any pixel is read.

A corrupt or hostile header (a NIfTI claiming 30000³ voxels, a gzip bomb of zeros, a DICOM with 60000 rows)
must fail its case with a reason, not exhaust the node's memory. ``MEDSAM_ENGINE_MAX_VOXELS`` (default 2³⁰,
about 1.07 billion voxels: a 512×512×4096 CT) sets the limit per image.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

from medsam_engine.pipeline.core.errors import ReadError

DEFAULT_MAX_VOXELS = 1 << 30


def max_voxels() -> int:
    value = os.environ.get("MEDSAM_ENGINE_MAX_VOXELS")
    try:
        return int(float(value)) if value else DEFAULT_MAX_VOXELS
    except ValueError as exc:
        raise ReadError(f"MEDSAM_ENGINE_MAX_VOXELS must be a number (got {value!r})") from exc


def check_voxels(shape: Sequence[int], where: str) -> None:
    """ReadError when an image of ``shape`` (as its header claims) is empty or beyond :func:`max_voxels`."""
    dims = [int(s) for s in shape]
    if any(s <= 0 for s in dims):
        raise ReadError(f"{where}: the header claims an empty image ({'×'.join(map(str, dims))} voxels)")
    count, limit = math.prod(dims), max_voxels()
    if count > limit:
        raise ReadError(
            f"{where}: the header claims {'×'.join(map(str, dims))} = {count:,} voxels, beyond the "
            f"limit of {limit:,} (MEDSAM_ENGINE_MAX_VOXELS); the header is probably corrupt"
        )
