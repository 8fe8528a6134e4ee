"""Label volumes of committed cases in millilitres: a label's voxel count times the voxel volume (the product
of the case's (z, y, x) spacing in mm, / 1000). The counts are the ``label_voxels`` every commit records
beside the label map (pipeline/store/ome_zarr.py); a case committed without them (by an older engine) is
counted from its stored label map.
"""

from __future__ import annotations

import math
from typing import Any, cast

from medsam_engine.pipeline.store.case_store import LABELS_PATH, CaseStore


def label_volumes_ml(
    store: CaseStore, case_ids: list[str], *, from_maps: bool = False
) -> dict[str, dict[int, float]]:
    """Per committed case: label value -> volume in mL (voxels x voxel volume); cases not committed are left
    out. ``from_maps``: count every case from its stored label map, which also proves each map readable
    (an error names the first that is not)."""
    counted: dict[str, dict[int, int]] = {}
    voxel_ml: dict[str, float] = {}
    unrecorded: list[str] = []
    for case_id in case_ids:
        attrs = store.case_attrs(case_id)
        if attrs is None:
            continue
        spacing = cast(dict[str, Any], attrs["geometry"])["spacing_zyx_mm"]
        voxel_ml[case_id] = math.prod(float(s) for s in spacing) / 1000.0
        if not from_maps and isinstance(attrs.get("label_voxels"), dict):
            counted[case_id] = {int(v): int(n) for v, n in attrs["label_voxels"].items()}
        else:
            unrecorded.append(case_id)
    counted.update(_count_stored(store, unrecorded))
    return {
        case_id: {v: round(n * voxel_ml[case_id], 3) for v, n in sorted(counted[case_id].items()) if v != 0}
        for case_id in case_ids
        if case_id in counted
    }


def _count_stored(store: CaseStore, case_ids: list[str]) -> dict[str, dict[int, int]]:
    """Voxels per label value of the stored label maps of ``case_ids``: one dask graph over every slice chunk
    of every case, reduced by ``da.unique`` with counts on threads, so no label map is held whole and chunks
    decompress in parallel."""
    if not case_ids:
        return {}
    import dask.array as da
    from dask.base import compute

    lazy = {
        case_id: da.unique(
            da.from_zarr(store.open_case(case_id)[f"{LABELS_PATH}/0"]),  # type: ignore[no-untyped-call]
            return_counts=True,
        )
        for case_id in case_ids
    }
    (found,) = compute(lazy, scheduler="threads")  # type: ignore[no-untyped-call]
    return {case_id: {int(v): int(n) for v, n in zip(*found[case_id], strict=True)} for case_id in found}
