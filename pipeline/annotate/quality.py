"""Quality per instance, its calibration against reviewer edits, and routing (numpy only).

Features (each in [0, 1], higher is better; None where it does not apply):

* ``predicted_iou``  the model's own IoU estimate, mean over the instance's slices;
* ``stability``      SAM's stability score: IoU of (logits > +1) and (logits > -1), mean over slices;
* ``jitter_iou``     agreement of the mask with masks from jittered boxes (optional, sampled slices);
* ``coverage``       fraction of the prompted slices where the final mask is not empty;
* ``box_agreement``  IoU of each slice's prompt box with the bounding box of the final mask there, mean;
* ``slice_iou``      IoU of the in-plane masks of consecutive slices, mean (3D only);
* ``area_steadiness`` 1 - mean relative area change between consecutive slices (3D only);
* ``drift_steadiness`` 1 - mean shift of the mask's box centre between consecutive slices, in box sizes (3D).

Without review data the score is a weighted mean of the available features. Once reviewers have corrected
earlier proposals, :func:`fit_calibration` fits a logistic regression of "the correction kept Dice >= t with
the proposal" on the features, and the score becomes that probability. Routing compares the score with
per-label thresholds: auto-accepted / review / rejected.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import numpy as np

from medsam_engine.pipeline.core.boxes import box_iou
from medsam_engine.pipeline.store.case_store import CaseStore
from medsam_engine.pipeline.store.records import QUALITY, current_round, read_record

STABILITY_OFFSET = 1.0  # logit offset of SAM's stability score
FEATURES = (
    "predicted_iou",
    "stability",
    "jitter_iou",
    "coverage",
    "box_agreement",
    "slice_iou",
    "area_steadiness",
    "drift_steadiness",
)
WEIGHTS = {
    "predicted_iou": 1.0,
    "stability": 1.0,
    "jitter_iou": 1.0,
    "coverage": 1.0,
    "box_agreement": 1.0,
    "slice_iou": 0.5,
    "area_steadiness": 0.5,
    "drift_steadiness": 0.5,
}
ROUTES = ("auto-accepted", "review", "rejected")


def stability_scores(logits: np.ndarray, offset: float = STABILITY_OFFSET) -> np.ndarray:
    """(B,) stability of (B, H, W) logits: |logits > +offset| / |logits > -offset| (0.0 where both empty)."""
    flat = logits.reshape(len(logits), -1)
    inner = np.array([np.count_nonzero(row > offset) for row in flat], dtype=np.int64)
    outer = np.array([np.count_nonzero(row > -offset) for row in flat], dtype=np.int64)
    return np.where(outer > 0, inner / np.maximum(outer, 1), 0.0).astype(np.float32)


def mask_ious(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(B,) IoU of two stacks of (B, H, W) boolean masks (1.0 where both are empty)."""
    flat_a, flat_b = a.reshape(len(a), -1), b.reshape(len(b), -1)
    union = np.logical_or(flat_a, flat_b).sum(axis=1)
    inter = np.logical_and(flat_a, flat_b).sum(axis=1)
    return np.where(union > 0, inter / np.maximum(union, 1), 1.0).astype(np.float32)


@dataclass(frozen=True)
class JitterCheck:
    """Re-decode sampled slices with each box edge moved by up to ``fraction`` of the box size."""

    fraction: float = 0.1
    slices: int = 4
    seed: int = 0


# -- 3D and box checks from the final label map ------------------------------------------------------------
def box_region(box, shape_yx: tuple[int, int], grow: float = 0.1) -> tuple[slice, slice]:
    """(rows, columns) slices of an XYXY voxel box grown by ``grow`` of its size + 2 px, clipped."""
    x0, y0, x1, y1 = box
    gy, gx = int(round((y1 - y0 + 1) * grow)) + 2, int(round((x1 - x0 + 1) * grow)) + 2
    rows = slice(max(0, y0 - gy), min(shape_yx[0], y1 + gy + 1))
    return rows, slice(max(0, x0 - gx), min(shape_yx[1], x1 + gx + 1))


def instance_masks(label_map: np.ndarray, record: dict, *, alone: bool) -> dict[int, np.ndarray]:
    """{z: (H, W) bool} of one instance on its prompted slices: the label's voxels on the slice when it is
    the label's only instance (``alone``), else those inside its prompt box grown by 10 % + 2 px."""
    out: dict[int, np.ndarray] = {}
    label = int(record["label"])
    for z, box in zip(record["slices"], record.get("boxes_xyxy", []), strict=False):
        plane = label_map[int(z)] == label
        if not alone:
            ys, xs = box_region(box, plane.shape)
            inside = np.zeros_like(plane)
            inside[ys, xs] = plane[ys, xs]
            plane = inside
        out[int(z)] = plane
    return out


def _bbox(mask: np.ndarray) -> tuple[int, int, int, int] | None:
    ys, xs = np.nonzero(mask.any(axis=1))[0], np.nonzero(mask.any(axis=0))[0]
    return None if len(ys) == 0 else (int(xs[0]), int(ys[0]), int(xs[-1]), int(ys[-1]))


def geometry_checks(masks: dict[int, np.ndarray], boxes: dict[int, tuple]) -> dict[str, float | None]:
    """Coverage and box agreement per instance, plus slice-to-slice checks when it spans several slices.

    ``masks``: {z: (H, W) bool}; ``boxes``: {z: prompt box XYXY}. Also returns the worst transition
    (``slice_iou_min``, ``area_jump_max``, ``drift_max``) for people to read; those are not features.
    """
    zs = sorted(masks)
    areas = {z: int(np.count_nonzero(masks[z])) for z in zs}
    filled = [z for z in zs if areas[z]]
    extent = {z: _bbox(masks[z]) for z in filled}
    out: dict[str, float | None] = {"coverage": len(filled) / len(zs) if zs else 0.0}
    out["box_agreement"] = (
        float(np.mean([box_iou(boxes[z], extent[z]) if areas[z] else 0.0 for z in zs])) if zs else 0.0
    )
    pairs = [(a, b) for a, b in itertools.pairwise(filled) if b - a == 1]
    for key in (
        "slice_iou",
        "area_steadiness",
        "drift_steadiness",
        "slice_iou_min",
        "area_jump_max",
        "drift_max",
    ):
        out[key] = None
    if not pairs:
        return out
    ious, jumps, drifts = [], [], []
    for a, b in pairs:
        area_a, area_b = areas[a], areas[b]
        ba, bb = np.array(extent[a], float), np.array(extent[b], float)
        x0, y0 = int(max(ba[0], bb[0])), int(max(ba[1], bb[1]))  # the overlap of the two extents
        x1, y1 = int(min(ba[2], bb[2])), int(min(ba[3], bb[3]))
        both = (
            int(np.count_nonzero(masks[a][y0 : y1 + 1, x0 : x1 + 1] & masks[b][y0 : y1 + 1, x0 : x1 + 1]))
            if x0 <= x1 and y0 <= y1
            else 0
        )
        ious.append(both / (area_a + area_b - both))
        jumps.append(abs(area_a - area_b) / max(area_a, area_b))
        size = max(1.0, float(np.mean(np.concatenate([ba[2:] - ba[:2], bb[2:] - bb[:2]]) + 1)))
        drifts.append(float(np.linalg.norm((ba[:2] + ba[2:]) / 2 - (bb[:2] + bb[2:]) / 2)) / size)
    out.update(
        slice_iou=float(np.mean(ious)),
        area_steadiness=1.0 - float(np.mean(jumps)),
        drift_steadiness=1.0 - min(1.0, float(np.mean(drifts))),
        slice_iou_min=float(min(ious)),
        area_jump_max=float(max(jumps)),
        drift_max=float(max(drifts)),
    )
    return out


def instance_features(label_map: np.ndarray, record: dict, *, alone: bool) -> dict[str, float | None]:
    """All features (see the module docstring) and the diagnostics of one instance record (a to_json dict)."""
    masks = instance_masks(label_map, record, alone=alone)
    boxes = {int(z): tuple(b) for z, b in zip(record["slices"], record.get("boxes_xyxy", []), strict=False)}
    features: dict[str, float | None] = {
        "predicted_iou": float(np.clip(record.get("predicted_iou", 0.0), 0.0, 1.0)),
        "stability": record.get("stability"),
        "jitter_iou": record.get("jitter_iou"),
    }
    features.update(geometry_checks(masks, boxes))
    return {k: (None if v is None else round(float(v), 5)) for k, v in features.items()}


def heuristic_score(features: dict) -> float:
    """Weighted mean of the available features (the score before any reviewer data exists)."""
    used = [(WEIGHTS[k], float(features[k])) for k in FEATURES if features.get(k) is not None]
    return sum(w * v for w, v in used) / sum(w for w, _ in used) if used else 0.0


# -- calibration against reviewer edits ------------------------------------------------------------------
@dataclass(frozen=True)
class Calibration:
    """Logistic regression P(edit Dice >= threshold | features) on standardised features."""

    features: tuple[str, ...]
    mean: tuple[float, ...]
    scale: tuple[float, ...]
    weights: tuple[float, ...]
    bias: float
    threshold: float
    report: dict = field(default_factory=dict)

    def matrix(self, rows: list[dict]) -> np.ndarray:
        """(N, F) standardised features; a missing value takes the training mean (0 after scaling)."""
        x = np.array(
            [
                [
                    row.get(f) if row.get(f) is not None else m
                    for f, m in zip(self.features, self.mean, strict=False)
                ]
                for row in rows
            ],
            dtype=float,
        ).reshape(len(rows), len(self.features))
        return (x - np.asarray(self.mean)) / np.asarray(self.scale)

    def probability(self, rows: list[dict]) -> np.ndarray:
        return _sigmoid(self.matrix(rows) @ np.asarray(self.weights) + self.bias)

    def to_json(self) -> dict:
        return {
            "features": list(self.features),
            "mean": list(self.mean),
            "scale": list(self.scale),
            "weights": list(self.weights),
            "bias": self.bias,
            "threshold": self.threshold,
            "report": self.report,
        }

    @classmethod
    def from_json(cls, data: dict) -> Calibration:
        return cls(
            tuple(data["features"]),
            tuple(data["mean"]),
            tuple(data["scale"]),
            tuple(data["weights"]),
            float(data["bias"]),
            float(data["threshold"]),
            dict(data.get("report", {})),
        )


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.clip(x, -30, 30)))


def _logistic(x: np.ndarray, y: np.ndarray, ridge: float) -> tuple[np.ndarray, float]:
    """Newton iterations for L2-regularised logistic regression (the bias is not penalised)."""
    design = np.hstack([x, np.ones((len(x), 1))])
    beta = np.zeros(design.shape[1])
    penalty = np.diag([ridge] * x.shape[1] + [0.0])
    for _ in range(50):
        p = _sigmoid(design @ beta)
        gradient = design.T @ (p - y) + penalty @ beta
        hessian = design.T @ (design * (p * (1 - p))[:, None]) + penalty + 1e-9 * np.eye(len(beta))
        step = np.linalg.solve(hessian, gradient)
        beta -= step
        if np.max(np.abs(step)) < 1e-8:
            break
    return beta[:-1], float(beta[-1])


def auc(scores: np.ndarray, good: np.ndarray) -> float | None:
    """Area under the ROC curve of ``scores`` for separating good (True) from bad; None with one class."""
    good = np.asarray(good, bool)
    if good.all() or not good.any():
        return None
    ranks = np.argsort(np.argsort(scores, kind="mergesort"), kind="mergesort") + 1.0
    for value in np.unique(scores):  # average ranks of ties
        tied = scores == value
        ranks[tied] = ranks[tied].mean()
    n_good, n_bad = good.sum(), (~good).sum()
    return float((ranks[good].sum() - n_good * (n_good + 1) / 2) / (n_good * n_bad))


def fit_calibration(
    rows: list[dict],
    edit_dice: list[float],
    *,
    threshold: float = 0.9,
    ridge: float = 1.0,
    min_rows: int = 8,
    folds: int = 5,
    seed: int = 0,
) -> Calibration | None:
    """Fit P(edit Dice >= threshold) on reviewed instances' features; None (with no fit) when there are
    fewer than ``min_rows`` rows or fewer than two of either outcome. The report has the out-of-fold AUC and
    Brier score of the fit next to the AUC of the uncalibrated heuristic score, and a reliability table."""
    good = np.asarray(edit_dice, float) >= threshold
    if len(rows) < min_rows or good.sum() < 2 or (~good).sum() < 2:
        return None
    names = tuple(f for f in FEATURES if any(r.get(f) is not None for r in rows))
    raw = np.array([[r.get(f) if r.get(f) is not None else np.nan for f in names] for r in rows], dtype=float)
    mean = np.nanmean(raw, axis=0)
    scale = np.nanstd(raw, axis=0)
    scale = np.where(scale > 1e-6, scale, 1.0)
    x = (np.where(np.isnan(raw), mean, raw) - mean) / scale
    weights, bias = _logistic(x, good.astype(float), ridge)
    held = _out_of_fold(x, good, ridge, folds, seed)
    heuristic = np.array([heuristic_score(r) for r in rows])
    report = {
        "rows": len(rows),
        "good": int(good.sum()),
        "edit_dice_threshold": threshold,
        "ridge": ridge,
        "coefficients": {n: round(float(w), 4) for n, w in zip(names, weights, strict=False)},
        "auc_out_of_fold": _round(auc(held, good)),
        "brier_out_of_fold": round(float(np.mean((held - good) ** 2)), 4),
        "auc_heuristic": _round(auc(heuristic, good)),
        "brier_base_rate": round(float(good.mean() * (1 - good.mean())), 4),
        "reliability": reliability(held, good),
    }
    return Calibration(
        names,
        tuple(float(m) for m in mean),
        tuple(float(s) for s in scale),
        tuple(float(w) for w in weights),
        bias,
        threshold,
        report,
    )


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 4)


def _out_of_fold(x: np.ndarray, good: np.ndarray, ridge: float, folds: int, seed: int) -> np.ndarray:
    """Each row's probability from a fit that did not see it (k folds, at most one per row)."""
    order = np.random.default_rng(seed).permutation(len(x))
    out = np.zeros(len(x))
    for part in np.array_split(order, min(folds, len(x))):
        train = np.setdiff1d(order, part)
        if good[train].all() or not good[train].any():
            out[part] = good[train].mean()
            continue
        weights, bias = _logistic(x[train], good[train].astype(float), ridge)
        out[part] = _sigmoid(x[part] @ weights + bias)
    return out


def reliability(probability: np.ndarray, good: np.ndarray, bins: int = 5) -> list[dict]:
    """Per probability bin: rows, mean predicted P(good) and the observed fraction good."""
    edges = np.linspace(0, 1, bins + 1)
    table = []
    for low, high in itertools.pairwise(edges):
        inside = (probability >= low) & ((probability < high) | (high == 1.0))
        if inside.any():
            table.append(
                {
                    "bin": f"{low:.1f}-{high:.1f}",
                    "rows": int(inside.sum()),
                    "predicted": round(float(probability[inside].mean()), 3),
                    "observed": round(float(good[inside].mean()), 3),
                }
            )
    return table


# -- scoring and routing --------------------------------------------------------------------------------
def score(features: dict, calibration: Calibration | None) -> float:
    """The instance's quality score in [0, 1]: calibrated probability of needing no real edit, or the
    heuristic mean of the features before any calibration exists."""
    if calibration is None:
        return heuristic_score(features)
    return float(calibration.probability([features])[0])


def route(
    value: float,
    label: int,
    *,
    accept_above: float,
    reject_below: float,
    per_label: dict[int, tuple[float, float]] | None = None,
) -> str:
    """auto-accepted (score >= accept), rejected (score < reject) or review; ``per_label`` maps a label
    value to its own (reject_below, accept_above)."""
    reject, accept = (per_label or {}).get(int(label), (reject_below, accept_above))
    if value >= accept:
        return "auto-accepted"
    return "rejected" if value < reject else "review"


def case_status(routes: list[str]) -> str:
    """A case's review status from its instances' routes: auto-accepted when all are, rejected when all
    are, otherwise review (a person looks at it)."""
    if routes and all(r == "auto-accepted" for r in routes):
        return "auto-accepted"
    if routes and all(r == "rejected" for r in routes):
        return "rejected"
    return "review"


def assess_instances(
    label_map: np.ndarray, instances: list[dict], *, calibration: Calibration | None, thresholds: dict | None
) -> tuple[list[dict], dict]:
    """Add a ``quality`` entry (features, score, route when ``thresholds`` is given) to copies of the
    instance dicts; returns them and a case summary (worst and mean score, routes, review status).

    ``thresholds``: {"accept_above", "reject_below", "per_label"} as for :func:`route`, or None (no routing).
    """
    counts: dict[int, int] = {}
    for inst in instances:
        counts[int(inst["label"])] = counts.get(int(inst["label"]), 0) + 1
    out, scores, routes = [], [], []
    for inst in instances:
        features = instance_features(label_map, inst, alone=counts[int(inst["label"])] == 1)
        value = score(features, calibration)
        quality = {"features": features, "score": round(value, 5), "calibrated": calibration is not None}
        if thresholds is not None:
            quality["route"] = route(value, inst["label"], **thresholds)
            routes.append(quality["route"])
        scores.append(value)
        out.append(dict(inst, quality=quality))
    summary: dict = {
        "worst_score": round(min(scores), 5) if scores else None,
        "mean_score": round(float(np.mean(scores)), 5) if scores else None,
        "calibrated": calibration is not None,
    }
    if thresholds is not None:
        summary["routes"] = {r: routes.count(r) for r in ROUTES}
        summary["review_status"] = case_status(routes)
    return out, summary


def load_calibration(store: CaseStore):
    """The store's score calibration (pipeline.annotate.quality.Calibration), or None when none was fitted."""
    data = read_record(store, QUALITY, "calibration.json")
    return Calibration.from_json(data) if data and data.get("weights") is not None else None


def quality_attrs(store: CaseStore, config, label_map: np.ndarray, records) -> dict:
    """The case attributes the flywheel adds at commit: instances with quality scores (and the current
    round); with ``config.quality.route``, the case's ``review_status`` and ``round`` too."""
    instances = [r.to_json() for r in records]
    number = current_round(store)
    if number:
        instances = [dict(i, round=number) for i in instances]
    section = config.quality
    instances, summary = assess_instances(
        label_map,
        instances,
        calibration=load_calibration(store),
        thresholds=section.thresholds() if section.route else None,
    )
    out: dict = {"instances": instances, "quality": summary}
    if section.route:
        out["review_status"] = summary["review_status"]
        out["round"] = max(number, 1)
    return out
