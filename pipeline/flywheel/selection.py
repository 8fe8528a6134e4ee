"""How much to fine-tune, and whether it helps: folds over the reviewed data, Dice per kind, the choice of
epochs and the promotion rule (pipeline/flywheel/finetune.py runs the training).

Every reviewed object is learned from: the folds only *choose* (how many epochs, whether to train at all) and
*judge* (Dice per kind before and after); the model that is written is then trained on everything.

* Folds: whole cases when there are at least ``CASE_FOLDS_FROM`` cases and every kind with enough boxes lies
  in two cases or more (then a held-out case is a new case of a kind the model also trains on); otherwise
  blocks within each case, so every case (and kind) is in every fold's training part: contiguous z blocks of
  a volume's slices, or x blocks of the objects of a single 2D image.
* Kind: the case's modality and the object's label (its name where the store has one), e.g. ``MR caudate``
  or ``CT label 5``. An instance map (nuclei, cells: pipeline/store/labels_meta.py's ``is_instance_map``)
  holds one kind, ``<modality> objects``.
* Choice: the epoch count (0 = the parent as it is) whose held-out Dice, averaged over kinds, is highest
  among those where no kind with at least ``min_kind_boxes`` held-out boxes loses more than ``tolerance``
  against the parent; 0 unless that beats the parent by ``MIN_GAIN``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from medsam_engine.pipeline.store.labels_meta import is_instance_map as is_instance_map

CASE_FOLDS_FROM = 4  # fewer cases: blocks within each case
MIN_GAIN = 1e-3  # mean Dice over kinds a trained model must gain over its parent to be chosen


def kind_of(modality: str, label: int, names: dict[int, str] | None, instance_map: bool) -> str:
    """The kind an object is scored under: modality + label name (or value); one kind per instance map."""
    if instance_map:
        return f"{modality} objects"
    name = (names or {}).get(int(label))
    return f"{modality} {name}" if name else f"{modality} label {int(label)}"


@dataclass(frozen=True)
class Folds:
    """``parts``: (training samples, held-out samples) per fold; ``how``: "cases" or "blocks"."""

    how: str
    parts: tuple[tuple[list, list], ...]


def _kinds(sample) -> list[str]:
    return list(sample.kinds) if sample.kinds is not None else ["objects"] * len(sample.boxes)


def kinds_of(samples: list) -> np.ndarray:
    """(N,) the kind of every box of ``samples``, in order ("objects" where a sample has no kinds)."""
    return np.array([kind for sample in samples for kind in _kinds(sample)], dtype=str)


def count_kinds(kinds: np.ndarray) -> dict[str, int]:
    """Kind -> how many of ``kinds`` (boxes) are of it, sorted by kind."""
    names, counts = np.unique(kinds, return_counts=True)
    return {str(k): int(n) for k, n in zip(names, counts, strict=True)}


def use_case_folds(samples: list, *, min_kind_boxes: int) -> bool:
    """Whether cases can be the folds: enough cases, and every kind with enough boxes in two cases or more."""
    cases_of: dict[str, set[str]] = {}
    boxes_of: dict[str, int] = {}
    for sample in samples:
        for kind in _kinds(sample):
            cases_of.setdefault(kind, set()).add(sample.case_id)
            boxes_of[kind] = boxes_of.get(kind, 0) + 1
    if len({s.case_id for s in samples}) < CASE_FOLDS_FROM:
        return False
    return all(len(cases_of[k]) >= 2 for k in cases_of if boxes_of[k] >= min_kind_boxes)


def make_folds(samples: list, folds: int, *, min_kind_boxes: int = 5) -> Folds:
    """``folds`` (>= 2) train/held-out parts of ``samples`` (per-slice samples with ``case_id``, ``z`` and
    XYXY ``boxes``); parts whose held-out side is empty are left out (a case too small to split)."""
    if folds < 2:
        raise ValueError(f"Argument 'folds' must be at least 2; got {folds}")
    held: list[list] = [[] for _ in range(folds)]
    train: list[list] = [[] for _ in range(folds)]
    if use_case_folds(samples, min_kind_boxes=min_kind_boxes):
        cases = sorted({s.case_id for s in samples})
        fold_of = {case: n % folds for n, case in enumerate(cases)}
        for sample in samples:
            for f in range(folds):
                (held if fold_of[sample.case_id] == f else train)[f].append(sample)
        how = "cases"
    else:
        for case in sorted({s.case_id for s in samples}):
            _block_folds([s for s in samples if s.case_id == case], folds, train, held)
        how = "blocks"
    parts = tuple((t, h) for t, h in zip(train, held, strict=False) if h and t)
    return Folds(how, parts)


def _block_folds(case_samples: list, folds: int, train: list[list], held: list[list]) -> None:
    """One case's samples dealt into the folds: contiguous z blocks, or x blocks of one slice's objects."""
    zs = sorted({s.z for s in case_samples})
    if len(zs) >= folds:
        block = {z: n * folds // len(zs) for n, z in enumerate(zs)}
        for sample in case_samples:
            for f in range(folds):
                (held if block[sample.z] == f else train)[f].append(sample)
        return
    for sample in case_samples:  # a 2D image (or fewer slices than folds): blocks of objects along x
        centres = (sample.boxes[:, 0] + sample.boxes[:, 2]) / 2
        order = np.argsort(centres, kind="stable")
        block = np.empty(len(order), dtype=int)
        block[order] = np.arange(len(order)) * folds // max(len(order), 1)
        for f in range(folds):
            inside = block == f
            if inside.any():
                held[f].append(sample.subset(inside))
            if (~inside).any():
                train[f].append(sample.subset(~inside))


def balance_weights(samples: list) -> list[np.ndarray]:
    """Per sample, (K,) draw weights that give each case a share of the draws growing with the square root of
    its boxes, and each kind within a case likewise, so a small case or a rare kind (one lesion beside an
    atlas of many structures) is trained on; multiplied by the samples' own (edit) weights."""
    case_boxes: dict[str, int] = {}
    kind_boxes: dict[tuple[str, str], int] = {}
    for sample in samples:
        for kind in _kinds(sample):
            case_boxes[sample.case_id] = case_boxes.get(sample.case_id, 0) + 1
            kind_boxes[(sample.case_id, kind)] = kind_boxes.get((sample.case_id, kind), 0) + 1
    kind_root: dict[str, float] = {}
    for (case, _), count in kind_boxes.items():
        kind_root[case] = kind_root.get(case, 0.0) + float(np.sqrt(count))
    out = []
    for sample in samples:
        case = sample.case_id
        weights = np.array(
            [
                np.sqrt(case_boxes[case]) / (kind_root[case] * np.sqrt(kind_boxes[(case, kind)]))
                for kind in _kinds(sample)
            ]
        )
        out.append(weights * (1.0 if sample.weights is None else sample.weights))
    return out


@dataclass(frozen=True)
class Curve:
    """Held-out Dice per box, pooled over the folds: ``scores`` (epochs + 1, N), row 0 the parent; ``kinds``
    (N,) the kind of each box."""

    scores: np.ndarray
    kinds: np.ndarray

    @staticmethod
    def pooled(per_fold: list[tuple[np.ndarray, np.ndarray]]) -> Curve:
        """From each fold's (rows, N_f) scores (a fold stopped early keeps its last row) and (N_f,) kinds."""
        rows = max(scores.shape[0] for scores, _ in per_fold)
        padded = [np.vstack([s, np.repeat(s[-1:], rows - s.shape[0], axis=0)]) for s, _ in per_fold]
        return Curve(np.hstack(padded), np.concatenate([k for _, k in per_fold]))

    def by_kind(self, epoch: int) -> dict[str, float]:
        return {str(k): float(self.scores[epoch, self.kinds == k].mean()) for k in np.unique(self.kinds)}

    def mean(self, epoch: int) -> float:
        """Mean over kinds of the kinds' mean Dice (each kind counts once, however many boxes it has)."""
        return float(np.mean(list(self.by_kind(epoch).values())))

    def boxes(self) -> dict[str, int]:
        return count_kinds(self.kinds)


@dataclass(frozen=True)
class Choice:
    epochs: int
    before: float
    after: float
    per_kind: dict[str, dict]
    why: str


def choose_epochs(curve: Curve, *, tolerance: float, min_kind_boxes: int) -> Choice:
    """The epoch count to train on all the data (see the module docstring), with the held-out Dice per kind
    before (the parent) and after (that many epochs) and why."""
    boxes, before = curve.boxes(), curve.by_kind(0)
    judged = [k for k, n in boxes.items() if n >= min_kind_boxes]
    best, best_mean, refused = 0, curve.mean(0), []
    for epoch in range(1, curve.scores.shape[0]):
        after = curve.by_kind(epoch)
        worse = [k for k in judged if after[k] < before[k] - tolerance]
        if worse:
            refused.append(epoch)
        elif curve.mean(epoch) > best_mean + (MIN_GAIN if best == 0 else 0.0):
            best, best_mean = epoch, curve.mean(epoch)
    after = curve.by_kind(best)
    per_kind = {
        k: {
            "boxes": boxes[k],
            "before": round(before[k], 5),
            "after": round(after[k], 5),
            "judged": k in judged,
        }
        for k in sorted(boxes)
    }
    if best:
        why = (
            f"{best} epoch(s): held-out Dice {curve.mean(0):.4f} -> {best_mean:.4f} (mean over "
            f"{len(boxes)} kind(s)), no kind with >= {min_kind_boxes} boxes worse by more than {tolerance}"
        )
    elif curve.scores.shape[0] == 1:
        why = "no epoch was run"
    else:
        why = f"no training: no epoch beat the parent's held-out Dice {curve.mean(0):.4f} by {MIN_GAIN}" + (
            f" without a kind losing more than {tolerance}" if refused else ""
        )
    return Choice(best, round(curve.mean(0), 5), round(best_mean, 5), per_kind, why)
