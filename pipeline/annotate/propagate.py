"""Propagate mode: one 3D box per object, segmented from its middle slice outwards.

The official LiteMedSAM 3D algorithm: the middle slice of the object's z range gets the object's box there;
each next slice (up, then down) gets the box of the previous slice's predicted mask widened by
``box_margin_px``, falling back to the middle box when that mask is empty. We add a stop rule: a direction
ends after ``stop_after_empty`` empty slices in a row, or when the mask's IoU with the previous slice's mask
drops below ``min_slice_iou`` (the object ended, or the mask jumped to a neighbour).

Objects whose z range is only a bound (``open_range``: seeds from marks, whose extent nobody gave) also stop
where the object stops looking like its seed: the model finds something in almost every box, so past the
end of a lesion it outlines whatever tissue the box holds. The seed's look is two medians of its rendered
slice: inside the seed's mask, and in a ring of ``RING_PX`` pixels around it. A later mask with less than
``min_likeness`` of its pixels nearer the inside median than the ring's is unlike the seed and counts as an
empty slice (not painted; the next slice falls back to the seed box), so ``stop_after_empty`` empty or
unlike slices in a row end the direction. A seed whose medians lie under ``MIN_CONTRAST`` grey levels apart
gives no look: the rule is off for it. An open range's boxes are also never wider or taller than its seed
box (a marked lesion is largest on its key slice, where RECIST measures it): a previous mask's box that
outgrows it, as the margin makes it do where a small lesion tapers off, is shrunk about its centre. With
``tighten_ends``, an open range's last painted slice in a direction that stopped (not its seed), where the
mask was smaller than the slice before's, is decoded once more from its own mask's box without the margin:
towards its end a lesion shrinks faster than a box drawn from the slice before, and the model fills the box
it is given. The tighter mask is painted if it looks no less like the seed (the likeness above), so a box
that cuts into the object keeps the first mask. Only the end is decoded again: tight boxes chained from
slice to slice would shrink the object.

Objects advance in lock-step: an upward sweep visits slices in ascending z and, on each slice, decodes every
object that needs it in one decoder call per intensity window; a downward sweep does the same in descending
z. So each slice is embedded once per window (the runner's cache serves the second sweep), and overlaps are
resolved voxel by voxel by the highest logit, as in slice mode.

With a jitter check (pipeline/quality.JitterCheck), each object's seed, its middle slice, is decoded once more
with its box's edges moved at random, in the same decoder call batch as the other seeds of that slice; the
IoU of the two masks is the object's ``jitter_iou``. The seed decides the whole propagation, so its
robustness to the box is the one worth paying a decode for. The extra masks are never painted.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

from medsam_engine.pipeline.annotate.quality import JitterCheck, mask_ious, stability_scores
from medsam_engine.pipeline.core.boxes import jitter_boxes
from medsam_engine.pipeline.core.types import InstanceRecord, ObjectBox
from medsam_engine.pipeline.model.runner import LiteMedSAMRunner, foreground


@dataclass(frozen=True)
class PropagateRules:
    box_margin_px: int = 3
    stop_after_empty: int = 2
    min_slice_iou: float = 0.1
    min_likeness: float = 0.5
    tighten_ends: bool = True


RING_PX = 3  # width of the ring around the seed's mask that gives its surroundings' median
MIN_CONTRAST = 5.0  # grey levels between a seed's inside and its ring below which it has no look to compare


@dataclass(frozen=True)
class _Pending:
    """An open range's latest mask, painted once the next slices tell whether it ends its direction."""

    z: int
    logits: np.ndarray
    mask: np.ndarray
    position: int  # its index in the track's slices, boxes, iou and stability
    tapering: bool  # smaller than the previous slice's mask


@dataclass
class _Track:
    """One object's state along one direction."""

    obj: ObjectBox
    index: int
    previous: np.ndarray | None = None  # the previous slice's mask, None after an empty slice
    middle_mask: np.ndarray | None = None
    look: tuple[float, float] | None = None  # the seed's (inside, ring) medians, for open ranges
    empties: int = 0
    done: bool = False
    stop_reason: str = ""
    slices: list = field(default_factory=list)
    boxes: list = field(default_factory=list)
    iou: list = field(default_factory=list)
    stability: list = field(default_factory=list)
    jitter_iou: float | None = None
    pending: _Pending | None = None


def _mask_box(mask: np.ndarray, margin: int) -> tuple[int, int, int, int]:
    ys, xs = np.nonzero(mask.any(axis=1))[0], np.nonzero(mask.any(axis=0))[0]
    height, width = mask.shape
    return (
        max(0, int(xs[0]) - margin),
        max(0, int(ys[0]) - margin),
        min(width - 1, int(xs[-1]) + margin),
        min(height - 1, int(ys[-1]) + margin),
    )


def seed_look(image: np.ndarray, mask: np.ndarray) -> tuple[float, float] | None:
    """Medians of an (H, W) or (H, W, 3) rendered slice inside a non-empty (H, W) mask and in a ring of
    ``RING_PX`` pixels around it; None when they differ by less than ``MIN_CONTRAST``."""
    grey = image.mean(axis=-1) if image.ndim == 3 else image
    ring = ndimage.binary_dilation(mask, iterations=RING_PX) & ~mask
    if not ring.any():
        return None
    inside, around = float(np.median(grey[mask])), float(np.median(grey[ring]))
    return (inside, around) if abs(inside - around) >= MIN_CONTRAST else None


def likeness(image: np.ndarray, mask: np.ndarray, look: tuple[float, float]) -> float:
    """The share of a non-empty mask's pixels nearer the seed's inside median than its ring's."""
    grey = image.mean(axis=-1) if image.ndim == 3 else image
    inside, around = look
    values = grey[mask].astype(np.float32)
    return float(np.mean(np.abs(values - inside) < np.abs(values - around)))


def no_larger(box: tuple[int, int, int, int], seed: tuple[int, int, int, int]) -> tuple[int, int, int, int]:
    """XYXY ``box`` shrunk about its centre where it is wider or taller than ``seed``."""
    out = list(box)
    for low, high in ((0, 2), (1, 3)):
        extra = (out[high] - out[low]) - (seed[high] - seed[low])
        if extra > 0:
            out[low] += extra // 2
            out[high] -= extra - extra // 2
    return out[0], out[1], out[2], out[3]


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 0.0


class _Canvas:
    """Running overlap resolution: best logit and winning object per voxel of touched slices."""

    def __init__(self, shape: tuple[int, int, int]) -> None:
        self.best: dict[int, np.ndarray] = {}
        self.winner = np.full(shape, -1, dtype=np.int32)

    def paint(self, z: int, logits: np.ndarray, mask: np.ndarray, index: int) -> None:
        best = self.best.setdefault(z, np.full(logits.shape, -np.inf, dtype=np.float32))
        better = mask & (logits > best)
        best[better] = logits[better]
        self.winner[z][better] = index


@dataclass
class _Run:
    """What every sweep of one propagate_volume call shares."""

    runner: LiteMedSAMRunner
    renderings: dict[str, np.ndarray]
    window_of: dict[int, str]
    rules: PropagateRules
    canvas: _Canvas
    on_slice: Callable[[], None] | None = None
    jitter: JitterCheck | None = None
    rng: np.random.Generator | None = None
    open_range: bool = False


def _advance(
    track: _Track, z: int, logits: np.ndarray, iou: float, rules: PropagateRules, box, canvas, image=None
) -> None:
    """One slice's mask for one track; ``image`` (the rendered slice) is given for open ranges only."""
    mask = foreground(logits[None])[0]
    track.slices.append(z)
    track.boxes.append(box)
    track.iou.append(iou)
    track.stability.append(float(stability_scores(logits[None])[0]))
    unlike = False
    if image is not None and mask.any():
        if z == track.obj.z_middle:
            track.look = seed_look(image, mask)
        elif track.look is not None and likeness(image, mask, track.look) < rules.min_likeness:
            unlike, mask = True, np.zeros_like(mask)  # not the seed's object: as if the slice were empty
    if not mask.any():
        track.previous = None  # the next slice falls back to the middle box, as the official script does
        track.empties += 1
        if track.empties >= rules.stop_after_empty:
            why = "slices empty or unlike the seed" if unlike else "empty slices"
            track.done, track.stop_reason = True, f"{track.empties} {why}"
        return
    if track.previous is not None and _iou(mask, track.previous) < rules.min_slice_iou:
        track.done, track.stop_reason = True, "slice-to-slice IoU drop"
        return  # the jumped mask is not kept
    track.empties = 0
    tapering = track.previous is not None and mask.sum() < track.previous.sum()
    track.previous = mask
    if z == track.obj.z_middle:
        track.middle_mask = mask
    _flush(track, canvas)
    if image is not None and rules.tighten_ends and z != track.obj.z_middle:
        track.pending = _Pending(z, logits, mask, len(track.slices) - 1, tapering)
    else:
        canvas.paint(z, logits, mask, track.index)


def _flush(track: _Track, canvas: _Canvas) -> None:
    """Paint the track's pending mask as it is (the object went on past it, or the z range ended)."""
    if track.pending is not None:
        canvas.paint(track.pending.z, track.pending.logits, track.pending.mask, track.index)
        track.pending = None


def _tighten_end(run: _Run, track: _Track) -> None:
    """Paint the pending mask of an open range whose direction stopped: where the object was shrinking into
    that slice, the mask decoded from its own box without the margin if it looks no less like the seed."""
    end, track.pending = track.pending, None
    if end is None:
        return
    logits, mask = end.logits, end.mask
    if end.tapering and track.look is not None:
        image = run.renderings[_window(run, track.obj)][end.z]
        box = _mask_box(end.mask, 0)
        tight_logits, score = run.runner.decode(run.runner.encode([image])[0], np.array([box], np.float32))
        tight = foreground(tight_logits)[0]
        if tight.any() and likeness(image, tight, track.look) >= likeness(image, mask, track.look):
            logits, mask = tight_logits[0], tight
            track.boxes[end.position], track.iou[end.position] = box, float(score[0])
            track.stability[end.position] = float(stability_scores(tight_logits)[0])
    run.canvas.paint(end.z, logits, mask, track.index)


def _next_box(run: _Run, track: _Track, z: int) -> tuple[int, int, int, int]:
    """The box ``track`` decodes on slice ``z``: the middle box on the middle slice and after an empty
    slice, else the previous mask's box widened by the margin; for an open range no larger than the seed
    box."""
    if track.previous is None or z == track.obj.z_middle:
        return track.obj.box_middle
    box = _mask_box(track.previous, run.rules.box_margin_px)
    return no_larger(box, track.obj.box_middle) if run.open_range else box


def _window(run: _Run, obj: ObjectBox) -> str:
    """The intensity window ``obj`` is decoded in: its label's, else the first rendering's."""
    return run.window_of.get(obj.label, next(iter(run.renderings)))


def _sweep(run: _Run, tracks: list[_Track], order: list[int], step: int) -> None:
    """Visit slices in ``order``; on each, decode every live track whose next slice it is, grouped by
    intensity window."""
    for z in order:
        live = [
            t
            for t in tracks
            if not t.done
            and (
                t.obj.z_middle <= z <= t.obj.z_range[1]
                if step > 0
                else t.obj.z_range[0] <= z < t.obj.z_middle
            )
        ]
        if not live:
            continue
        by_window: dict[str, list[_Track]] = defaultdict(list)
        for track in live:
            by_window[_window(run, track.obj)].append(track)
        for window, group in by_window.items():
            _decode(run, run.renderings[window][z], z, group, jittered=step > 0)
        if run.on_slice is not None:
            run.on_slice()
    for track in tracks:
        _flush(track, run.canvas)


def _decode(run: _Run, image: np.ndarray, z: int, group: list[_Track], *, jittered: bool) -> None:
    """One decoder call for the tracks of ``group`` on slice ``z`` (rendered as ``image``); with the run's
    jitter check (``jittered``), the seeds on it once more with jittered boxes."""
    boxes = np.array([_next_box(run, t, z) for t in group], dtype=np.float32)
    embedded = run.runner.encode([image])[0]
    jitter = run.jitter if jittered else None
    seeds = [i for i, t in enumerate(group) if z == t.obj.z_middle] if jitter is not None else []
    moved = (
        jitter_boxes(boxes[seeds], jitter.fraction, run.rng, embedded.original_hw)
        if jitter and seeds
        else None
    )
    logits, iou = run.runner.decode(embedded, boxes if moved is None else np.concatenate([boxes, moved]))
    if seeds:
        agreement = mask_ious(foreground(logits[seeds]), foreground(logits[len(group) :]))
        for i, value in zip(seeds, agreement, strict=False):
            group[i].jitter_iou = float(value)
    look_at = image if run.open_range else None
    for track, box, slice_logits, score in zip(group, boxes, logits, iou, strict=False):
        _advance(
            track, z, slice_logits, float(score), run.rules, tuple(int(v) for v in box), run.canvas, look_at
        )
        if track.done:
            _tighten_end(run, track)


def propagate_volume(
    runner: LiteMedSAMRunner,
    renderings: dict[str, np.ndarray],
    objects: list[ObjectBox],
    *,
    window_of: dict[int, str] | None = None,
    rules: PropagateRules = PropagateRules(),
    model_name: str = "",
    on_slice: Callable[[], None] | None = None,
    jitter: JitterCheck | None = None,
    open_range: bool = False,
) -> tuple[np.ndarray, list[InstanceRecord]]:
    """Segment each object from its middle slice up and down its z range; returns the (z, y, x) uint16
    label map and one InstanceRecord per object (slices visited, boxes used, mean predicted IoU, voxels, and
    with ``jitter`` the seed's mask agreement under jittered boxes). ``open_range``: the z ranges are only
    bounds (seeds from marks), so the likeness rule may end an object before them."""
    shape = next(iter(renderings.values())).shape[:3]
    rng = np.random.default_rng(jitter.seed if jitter else 0)
    run = _Run(runner, renderings, window_of or {}, rules, _Canvas(shape), on_slice, jitter, rng, open_range)
    up = [_Track(obj, i) for i, obj in enumerate(objects)]
    low = min((o.z_range[0] for o in objects), default=0)
    high = max((o.z_range[1] for o in objects), default=-1)
    _sweep(run, up, list(range(low, high + 1)), +1)
    down = [_Track(t.obj, t.index, previous=t.middle_mask, look=t.look) for t in up]  # from the middle mask
    _sweep(run, down, list(range(high, low - 1, -1)), -1)
    canvas = run.canvas
    labels = np.array([o.label for o in objects] + [0], dtype=np.uint16)
    label_map = labels[canvas.winner]  # winner -1 picks the trailing 0
    voxels = np.bincount(canvas.winner[canvas.winner >= 0].ravel(), minlength=len(objects))
    records = []
    for obj, u, d in zip(objects, up, down, strict=False):
        order = sorted(range(len(u.slices) + len(d.slices)), key=lambda i: (u.slices + d.slices)[i])
        slices, boxes, ious = u.slices + d.slices, u.boxes + d.boxes, u.iou + d.iou
        stability = u.stability + d.stability
        records.append(
            InstanceRecord(
                label=obj.label,
                instance=obj.instance,
                prompt_source=obj.source,
                slices=tuple(slices[i] for i in order),
                boxes=tuple(tuple(boxes[i]) for i in order),
                predicted_iou=float(np.mean(ious)) if ious else 0.0,
                voxels=int(voxels[u.index]),
                model=model_name,
                stage="auto-propagate",
                stability=float(np.mean(stability)) if stability else None,
                jitter_iou=u.jitter_iou,
            )
        )
    return label_map, records
