"""Volume + prompts -> label map and per-instance lineage, with one encoder pass per prompted slice.

Overlaps between boxes of one slice are resolved voxel by voxel in favour of the highest logit among the
boxes that claim the voxel (the official script lets later labels overwrite earlier ones instead).
"""
from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable

import numpy as np

from pipeline.model import LiteMedSAMRunner, foreground
from pipeline.types import BoxPrompt, InstanceRecord


def resolve_slice(logits: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(B, H, W) logits of B boxes with label values (B,) -> (H, W) label slice and winner index (-1: none)."""
    claimed = foreground(logits)
    scores = np.where(claimed, logits, -np.inf)
    winner = np.argmax(scores, axis=0)
    winner[~claimed.any(axis=0)] = -1
    out = np.where(winner >= 0, np.asarray(labels)[np.maximum(winner, 0)], 0)
    return out.astype(np.uint16), winner


def by_slice(prompts: Iterable[BoxPrompt]) -> dict[int, list[BoxPrompt]]:
    grouped: dict[int, list[BoxPrompt]] = defaultdict(list)
    for prompt in prompts:
        grouped[prompt.z].append(prompt)
    return dict(sorted(grouped.items()))


def segment_volume(runner: LiteMedSAMRunner, volume_u8: np.ndarray | dict[str, np.ndarray],
                   prompts: list[BoxPrompt], *, window_of: dict[int, str] | None = None, model_name: str = "",
                   on_slice: Callable[[], None] | None = None) -> tuple[np.ndarray, list[InstanceRecord]]:
    """Segment every prompted slice of a (z, y, x[, 3]) uint8 volume.

    ``volume_u8`` may instead map intensity-window names to uint8 renderings of the same volume, with
    ``window_of`` giving each label's window: each slice is then encoded once per window in use on it, and
    overlaps are still resolved across all of the slice's boxes. Returns the (z, y, x) uint16 label map and
    one InstanceRecord per (label, instance) with boxes, slices, mean predicted IoU and voxels claimed.
    """
    renderings = volume_u8 if isinstance(volume_u8, dict) else {"default": volume_u8}
    default = next(iter(renderings))
    window_of = window_of or {}
    shape = next(iter(renderings.values())).shape[:3]
    label_map = np.zeros(shape, dtype=np.uint16)
    lineage: dict[tuple[int, int], dict] = defaultdict(lambda: {"slices": [], "boxes": [], "iou": [], "voxels": 0,
                                                                "source": ""})
    for z, slice_prompts in by_slice(prompts).items():
        slice_prompts = sorted(slice_prompts, key=lambda p: window_of.get(p.label, default))
        logits, iou = [], []
        for window in dict.fromkeys(window_of.get(p.label, default) for p in slice_prompts):
            group = [p for p in slice_prompts if window_of.get(p.label, default) == window]
            embedded = runner.encode([renderings[window][z]])[0]
            group_logits, group_iou = runner.decode(embedded, np.array([p.box for p in group], dtype=np.float32))
            logits.append(group_logits)
            iou.append(group_iou)
        label_map[z], winner = resolve_slice(np.concatenate(logits), np.array([p.label for p in slice_prompts]))
        _record(lineage, z, slice_prompts, np.concatenate(iou), winner)
        if on_slice is not None:
            on_slice()
    records = [
        InstanceRecord(label=label, instance=instance, prompt_source=e["source"], slices=tuple(e["slices"]),
                       boxes=tuple(e["boxes"]), predicted_iou=float(np.mean(e["iou"])), voxels=e["voxels"],
                       model=model_name)
        for (label, instance), e in sorted(lineage.items())
    ]
    return label_map, records


def _record(lineage: dict, z: int, prompts: list[BoxPrompt], iou: np.ndarray, winner: np.ndarray) -> None:
    counts = np.bincount(winner[winner >= 0].ravel(), minlength=len(prompts))
    for index, prompt in enumerate(prompts):
        entry = lineage[(prompt.label, prompt.instance)]
        entry["slices"].append(z)
        entry["boxes"].append(prompt.box)
        entry["iou"].append(float(iou[index]))
        entry["voxels"] += int(counts[index])
        entry["source"] = prompt.source
