"""Label volumes of committed cases in millilitres, read straight from the stored label maps: a label's
voxel count times the voxel volume (the product of the case's (z, y, x) spacing in mm, / 1000).
"""

from __future__ import annotations

import math
from typing import Any, cast

from medsam_engine.pipeline.store.case_store import LABELS_PATH, CaseStore


def label_volumes_ml(store: CaseStore, case_ids: list[str]) -> dict[str, dict[int, float]]:
    """Per committed case: label value -> volume in mL (voxels x voxel volume); cases not committed are left
    out. One dask graph over every slice chunk of every case, reduced by ``da.unique`` with counts on
    threads, so no label map is held whole and chunks decompress in parallel."""
    import dask.array as da
    from dask.base import compute

    lazy: dict[str, Any] = {}
    voxel_ml: dict[str, float] = {}
    for case_id in case_ids:
        try:
            group = store.open_case(case_id)
        except KeyError:
            continue
        labels = da.from_zarr(group[f"{LABELS_PATH}/0"])  # type: ignore[no-untyped-call]
        lazy[case_id] = da.unique(labels, return_counts=True)
        spacing = cast(dict[str, Any], group.attrs["medsam"])["geometry"]["spacing_zyx_mm"]
        voxel_ml[case_id] = math.prod(float(s) for s in spacing) / 1000.0
    (counted,) = compute(lazy, scheduler="threads")  # type: ignore[no-untyped-call]
    return {
        case_id: {
            int(v): round(int(n) * voxel_ml[case_id], 3)
            for v, n in zip(*counted[case_id], strict=True)
            if v != 0
        }
        for case_id in counted
    }
