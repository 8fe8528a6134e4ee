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


def segment_volume(runner: LiteMedSAMRunner, volume_u8: np.ndarray, prompts: list[BoxPrompt], *,
                   model_name: str = "", on_slice: Callable[[], None] | None = None
                   ) -> tuple[np.ndarray, list[InstanceRecord]]:
    """Segment every prompted slice of a (z, y, x[, 3]) uint8 volume.

    Returns the (z, y, x) uint16 label map and one InstanceRecord per (label, instance) with its boxes,
    slices, mean predicted IoU and voxel count (after overlap resolution).
    """
    label_map = np.zeros(volume_u8.shape[:3], dtype=np.uint16)
    lineage: dict[tuple[int, int], dict] = defaultdict(lambda: {"slices": [], "boxes": [], "iou": [], "voxels": 0,
                                                                "source": ""})
    for z, slice_prompts in by_slice(prompts).items():
        embedded = runner.encode([volume_u8[z]])[0]
        boxes = np.array([p.box for p in slice_prompts], dtype=np.float32)
        logits, iou = runner.decode(embedded, boxes)
        label_map[z], winner = resolve_slice(logits, np.array([p.label for p in slice_prompts]))
        counts = np.bincount(winner[winner >= 0].ravel(), minlength=len(slice_prompts))
        for index, prompt in enumerate(slice_prompts):
            entry = lineage[(prompt.label, prompt.instance)]
            entry["slices"].append(z)
            entry["boxes"].append(prompt.box)
            entry["iou"].append(float(iou[index]))
            entry["voxels"] += int(counts[index])
            entry["source"] = prompt.source
        if on_slice is not None:
            on_slice()
    records = [
        InstanceRecord(label=label, instance=instance, prompt_source=e["source"], slices=tuple(e["slices"]),
                       boxes=tuple(e["boxes"]), predicted_iou=float(np.mean(e["iou"])), voxels=e["voxels"],
                       model=model_name)
        for (label, instance), e in sorted(lineage.items())
    ]
    return label_map, records
