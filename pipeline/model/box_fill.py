"""A runner with no network: each box prompt comes back filled.

``model.runner: box-fill`` runs every other part of a run (reading, prompts, clean-up, quality records,
commits, exports) exactly as with LiteMedSAM, in a fraction of the time and with no weights: the filled-box
baseline that segmentation papers compare against, and a quick check that an archive reads and prompts
before the model's hours are spent on it. Its masks are the boxes; the lineage says so (model ``box-fill``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from medsam_engine.pipeline.model.runner import RunnerStats, SliceEmbedding

BOX_FILL = "box-fill"  # the runner's name, and the model identity in signatures and lineage
_INSIDE, _OUTSIDE = np.float32(8.0), np.float32(-8.0)  # logits: sigmoid 0.9997 inside, 0.0003 outside


@dataclass(frozen=True)
class BoxFillModel:
    """The identity a runner's ``model`` carries (name, sha256, kind) for a run without a network."""

    name: str = BOX_FILL
    sha256: str = BOX_FILL
    kind: str = BOX_FILL


@dataclass
class BoxFillRunner:
    """The runner interface (``encode``, ``decode``, ``stats``, ``memory_batch``) over no network."""

    model: BoxFillModel = field(default_factory=BoxFillModel)
    device: str = "cpu"
    backend: str = BOX_FILL
    stats: RunnerStats = field(default_factory=RunnerStats)

    def memory_batch(self, **_: object) -> int:
        return 1

    def encode(self, slices_u8: list[np.ndarray]) -> list[SliceEmbedding]:
        """Nothing to embed: each slice's shape is all ``decode`` needs."""
        self.stats.encoder_calls += 1
        self.stats.encoded_slices += len(slices_u8)
        empty = np.zeros(0, dtype=np.float32)
        return [SliceEmbedding(empty, s.shape[:2], s.shape[:2]) for s in slices_u8]

    def decode(self, embedded: SliceEmbedding, boxes_xyxy: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Logits (B, H, W) positive exactly inside each inclusive voxel box, and a predicted IoU of 1."""
        height, width = embedded.original_hw
        boxes = np.asarray(boxes_xyxy, dtype=np.float64).reshape(-1, 4)
        logits = np.full((len(boxes), height, width), _OUTSIDE, dtype=np.float32)
        for plane, (x0, y0, x1, y1) in zip(logits, np.rint(boxes).astype(int), strict=True):
            plane[max(y0, 0) : max(y1 + 1, 0), max(x0, 0) : max(x1 + 1, 0)] = _INSIDE
        self.stats.decoder_calls += 1
        self.stats.decoded_boxes += len(boxes)
        return logits, np.ones(len(boxes), dtype=np.float32)
