"""Post-processing chains described as data, applied per label of a (z, y, x) label map.

A step is a mapping such as ``{"op": "remove_small_components", "min_volume_mm3": 50}``; a chain is a list
of steps; ``OPS`` (postprocess.registry) maps each op name to its function and parameter rules.
``apply_chain`` runs the chain on each label's bool mask (cropped to the label's bounding box) and merges the
results back without letting labels take each other's voxels; it returns a JSON-ready lineage with the
parameters and voxel counts of every step.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from numbers import Integral
from typing import Any

import numpy as np

from medsam_engine.postprocess._checks import check_spacing
from medsam_engine.postprocess._crop import bounding_box, label_boxes
from medsam_engine.postprocess.defaults import DEFAULT_CHAINS
from medsam_engine.postprocess.registry import OPS, REQUIRED

__all__ = ["DEFAULT_CHAINS", "OPS", "apply_chain", "default_chain", "validate_chain"]

Step = dict[str, Any]


def _validate_step(index: int, step: Any) -> Step:
    where = f"Step {index} of the chain"
    if not isinstance(step, Mapping):
        raise ValueError(f"{where} must be a mapping with an 'op' key; got {step!r}.")
    name = step.get("op")
    if name not in OPS:
        raise ValueError(f"{where}: unknown op {name!r}; known ops: {', '.join(sorted(OPS))}.")
    params = OPS[name].params
    where = f"{where} (op '{name}')"
    unknown = sorted(str(key) for key in step if key != "op" and key not in params)
    if unknown:
        allowed = ", ".join(params) or "none"
        raise ValueError(f"{where}: unknown parameter '{unknown[0]}'; allowed: {allowed}.")
    normalised: Step = {"op": name}
    for key, param in params.items():
        if key not in step:
            if param.default is REQUIRED:
                raise ValueError(f"{where}: parameter '{key}' is required.")
            normalised[key] = param.default
            continue
        try:
            normalised[key] = param.check(step[key], name=key)
        except ValueError as exc:
            raise ValueError(f"{where}: {exc}") from exc
    return normalised


def validate_chain(steps: Any) -> list[Step]:
    """Check a chain up front and return a normalised copy (defaults filled in, numbers as int/float).

    Raises ValueError naming the step, the op and the bad parameter: an unknown op, an unknown or missing
    parameter, or a value out of range.
    """
    if isinstance(steps, (str, bytes, Mapping)) or not isinstance(steps, Sequence):
        raise ValueError(f"Argument 'chain' must be a list of steps; got {type(steps).__name__}.")
    return [_validate_step(index, step) for index, step in enumerate(steps, start=1)]


def default_chain(modality: str) -> list[Step]:
    """A fresh, validated copy of the default chain for ``modality`` ("CT", "MR", "2D" or "OT")."""
    if not isinstance(modality, str) or modality.upper() not in DEFAULT_CHAINS:
        raise ValueError(f"Argument 'modality' must be one of {', '.join(DEFAULT_CHAINS)}; got {modality!r}.")
    return validate_chain(copy.deepcopy(DEFAULT_CHAINS[modality.upper()]))


def _validate_overrides(per_label: Any) -> dict[int, list[Step]]:
    if per_label is None:
        return {}
    if not isinstance(per_label, Mapping):
        kind = type(per_label).__name__
        raise ValueError(f"Argument 'per_label' must map label values to chains; got {kind}.")
    overrides = {}
    for label, steps in per_label.items():
        if isinstance(label, bool) or not isinstance(label, Integral) or label < 1:
            raise ValueError(f"Argument 'per_label' keys must be label values >= 1; got {label!r}.")
        try:
            overrides[int(label)] = validate_chain(steps)
        except ValueError as exc:
            raise ValueError(f"Argument 'per_label', label {label}: {exc}") from exc
    return overrides


def _check_label_map(label_map: Any) -> np.ndarray:
    if not isinstance(label_map, np.ndarray) or label_map.ndim != 3:
        shape = getattr(label_map, "shape", type(label_map).__name__)
        raise ValueError(f"Argument 'label_map' must be a (z, y, x) numpy array; got {shape}.")
    if label_map.dtype == np.bool_ or not np.issubdtype(label_map.dtype, np.integer):
        raise ValueError(f"Argument 'label_map' must have an integer dtype; got {label_map.dtype}.")
    if np.issubdtype(label_map.dtype, np.signedinteger) and label_map.size and label_map.min() < 0:
        raise ValueError("Argument 'label_map' must not hold negative labels.")
    return label_map


def _run_steps(
    mask: np.ndarray, steps: list[Step], spacing: tuple[float, float, float]
) -> tuple[np.ndarray, list[dict[str, Any]]]:
    """Apply ``steps`` to a bool (z, y, x) mask; the result and one record per step.

    No op moves voxels outside its input's bounding box, so after each step the work shrinks to the result's
    bounding box (specks removed by the first step no longer cost anything).
    """
    history = []
    box = tuple(slice(0, size) for size in mask.shape)
    work = mask
    for step in steps:
        params = {key: value for key, value in step.items() if key != "op"}
        before = int(np.count_nonzero(work))
        work = OPS[step["op"]].run(work, spacing=spacing, params=params)
        history.append(
            {
                "op": step["op"],
                "params": params,
                "voxels_before": before,
                "voxels_after": int(np.count_nonzero(work)),
            }
        )
        inner = bounding_box(work)
        if inner is not None:
            box = tuple(slice(b.start + i.start, b.start + i.stop) for b, i in zip(box, inner, strict=False))
            work = work[inner]
    result = np.zeros(mask.shape, dtype=bool)
    result[box] = work
    return result, history


def _process_label(
    label_map: np.ndarray,
    out: np.ndarray,
    box: tuple[slice, ...],
    value: int,
    steps: list[Step],
    spacing: tuple[float, float, float],
) -> tuple[np.ndarray, dict[str, Any]]:
    """Run ``steps`` on one label inside ``box``; write the voxels it keeps into ``out``.

    Returns the flat indices of the background voxels it adds (its claims) and its lineage record, whose
    ``voxels_after`` counts only the kept voxels until the claims are settled.
    """
    crop = label_map[box]
    original = crop == value
    result, history = _run_steps(original, steps, spacing)
    kept = result & original
    np.copyto(out[box], value, where=kept)
    after, kept_count = int(np.count_nonzero(result)), int(np.count_nonzero(kept))
    if after > kept_count:  # the steps added voxels: those on background are claims
        grown = np.nonzero(result & (crop == 0))
        claims = np.ravel_multi_index(
            tuple(axis + part.start for axis, part in zip(grown, box, strict=False)), label_map.shape
        )
    else:
        claims = np.zeros(0, dtype=np.intp)
    record = {
        "label": value,
        "voxels_before": int(np.count_nonzero(original)),
        "steps": history,
        "voxels_after": kept_count,
        "voxels_lost_in_merge": after,
    }  # settled in apply_chain
    return claims, record


def _grant_claims(out: np.ndarray, claims: list[tuple[np.ndarray, int]]) -> dict[int, int]:
    """Write voxels that exactly one label claims (flat indices into ``out``); the count granted per label."""
    if not claims:
        return {}
    indices = np.concatenate([flat for flat, _ in claims])
    owners = np.concatenate([np.full(flat.size, value, dtype=out.dtype) for flat, value in claims])
    unique, first, counts = np.unique(indices, return_index=True, return_counts=True)
    alone = counts == 1
    granted = owners[first[alone]]
    np.put(out, unique[alone], granted)
    values, amounts = np.unique(granted, return_counts=True)
    return dict(zip(values.tolist(), amounts.tolist(), strict=False))


def apply_chain(
    label_map: np.ndarray,
    *,
    spacing: Sequence[float],
    chain: Sequence[Mapping[str, Any]],
    per_label: Mapping[int, Sequence[Mapping[str, Any]]] | None = None,
    values: Sequence[int] | None = None,
) -> tuple[np.ndarray, dict[str, Any]]:
    """Run a chain on every label of a label map and merge the results into a new label map.

    Each label value's bool mask, cropped to its bounding box, goes through ``chain`` (or its override in
    ``per_label``). Merging never lets one label take another's voxels: a voxel keeps its original label if
    that label's result still holds it; voxels a label gives up become background; voxels a label adds are
    written only where the input was background and no other label adds the same voxel (a voxel claimed by
    two labels stays background).

    Args:
        label_map: integer (z, y, x) array (typically uint16), 0 = background; a 2D image has z == 1.
        spacing: voxel size (z, y, x) in mm.
        chain: the steps for every label, e.g. ``[{"op": "closing", "radius_mm": 2}]``; [] changes nothing.
        per_label: optional chains for particular label values, replacing ``chain`` for those labels
            (values absent from the map are ignored).
        values: the non-zero values present in ``label_map``, when the caller knows them exactly (saves a
            counting pass over the map); by default they are counted.

    Returns:
        The new label map (same shape and dtype; it holds no label absent from the input) and the lineage:
        ``{"spacing_mm": [z, y, x], "labels": [{"label", "chain", "voxels_before", "steps", "voxels_after",
        "voxels_lost_in_merge"}, ...]}`` where each step is ``{"op", "params", "voxels_before",
        "voxels_after"}``; all JSON-serialisable.

    Raises:
        ValueError: on a bad label map, spacing or chain, before any work is done.
    """
    _check_label_map(label_map)
    zyx = check_spacing(spacing, name="spacing", ndim=3)
    default = validate_chain(chain)
    overrides = _validate_overrides(per_label)
    out = np.zeros(label_map.shape, dtype=label_map.dtype)
    claims: list[tuple[np.ndarray, int]] = []
    records = []
    for value, box in label_boxes(
        label_map, None if values is None else sorted({int(v) for v in values})
    ).items():
        claimed, record = _process_label(label_map, out, box, value, overrides.get(value, default), zyx)
        claims.append((claimed, value))
        records.append({"chain": "per_label" if value in overrides else "default", **record})
    granted = _grant_claims(out, claims)
    for record in records:
        record["voxels_after"] += granted.get(record["label"], 0)
        record["voxels_lost_in_merge"] -= record["voxels_after"]
    return out, {"spacing_mm": list(zyx), "labels": records}
