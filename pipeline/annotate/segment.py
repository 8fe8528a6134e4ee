"""Volume + prompts -> label map and per-instance lineage, with one encoder pass per prompted slice.

Overlaps between boxes of one slice are resolved voxel by voxel in favour of the highest logit among the
boxes that claim the voxel (the official script lets later labels overwrite earlier ones instead).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable

import numpy as np

from medsam_engine.pipeline.annotate.quality import JitterCheck, mask_ious, stability_scores
from medsam_engine.pipeline.core.boxes import jitter_boxes
from medsam_engine.pipeline.core.types import BoxPrompt, InstanceRecord
from medsam_engine.pipeline.model.runner import SIGMOID_HALF, LiteMedSAMRunner, foreground


def resolve_slice(logits: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(B, H, W) logits of B boxes with label values (B,) -> (H, W) label slice and winner index (-1:
    none)."""
    claimed = foreground(logits)
    scores = np.where(claimed, logits, -np.inf)
    winner = np.argmax(scores, axis=0)
    winner[~claimed.any(axis=0)] = -1
    out = np.where(winner >= 0, np.asarray(labels)[np.maximum(winner, 0)], 0)
    return out.astype(np.uint16), winner


class SliceResolver:
    """Incremental :func:`resolve_slice`: feed (B, H, W) logits in parts; ``winner`` is the index (over all
    parts, in order) of the box with the highest logit among those claiming each pixel, -1 where none does.
    Ties go to the earlier box, exactly as ``argmax`` over the concatenated logits.

    With fewer than 255 ``boxes`` announced, the winners are kept as uint8 (box index + 1, 0 for none), so the
    slice's labels and each box's pixel count come from an OpenCV look-up table and histogram (one fast pass
    each) instead of int32 indexing."""

    def __init__(self, shape_hw: tuple[int, int], boxes: int | None = None) -> None:
        self.shape = tuple(shape_hw)
        self.best = np.empty(self.shape, dtype=np.float32)
        self._won: dict[bool, np.ndarray] = {}
        self.reset(boxes)

    def reset(self, boxes: int | None = None) -> None:
        """Start a new slice with the same shape (the buffers are reused: no fresh pages per slice)."""
        # the best logit so far starts at the foreground threshold: "above it" is then "claims the pixel and
        # beats every earlier box" in one comparison per box (ties stay with the earlier box)
        self.best.fill(SIGMOID_HALF)
        self.small = boxes is not None and boxes < 255
        if self.small not in self._won:
            self._won[self.small] = np.empty(self.shape, dtype=np.uint8 if self.small else np.int32)
        self.won = self._won[self.small]  # box index + 1; 0: none
        self.won.fill(0)
        self.count = 0

    def add(self, logits: np.ndarray) -> None:
        for plane in np.asarray(logits, dtype=np.float32):
            if self.small and self.count >= 254:
                raise ValueError("more boxes than the resolver was announced")
            better = plane > self.best
            np.copyto(self.best, plane, where=better)
            np.copyto(self.won, self.count + 1, where=better)
            self.count += 1

    @property
    def winner(self) -> np.ndarray:
        """(H, W) int32: the winning box's index, -1 where no box claims the pixel."""
        return self.won.astype(np.int32) - 1

    def labels(self, values: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """(H, W) uint16 label slice (written into ``out`` when given): ``values[k]`` where box k won, 0 where
        none did."""
        table = np.zeros(256 if self.small else self.count + 1, dtype=np.uint16)
        table[1 : self.count + 1] = values[: self.count]
        if self.small and (out is None or out.flags.c_contiguous):
            import cv2

            result = cv2.LUT(self.won, table, dst=out)
            if out is not None and result is not out and not np.shares_memory(result, out):
                out[...] = result  # OpenCV made its own array instead of writing into ``out``
                return out
            return result
        return np.take(table, self.won, out=out)

    def pixels_won(self) -> np.ndarray:
        """(count,) int64: the number of pixels each box won."""
        if self.small:
            import cv2

            counts = cv2.calcHist([self.won], [0], None, [self.count + 1], [0, self.count + 1]).ravel()
            return counts[1:].astype(np.int64)
        return np.bincount(self.won.ravel(), minlength=self.count + 1)[1:]


def by_slice(prompts: Iterable[BoxPrompt]) -> dict[int, list[BoxPrompt]]:
    grouped: dict[int, list[BoxPrompt]] = defaultdict(list)
    for prompt in prompts:
        grouped[prompt.z].append(prompt)
    return dict(sorted(grouped.items()))


def segment_volume(
    runner: LiteMedSAMRunner,
    volume_u8: np.ndarray | dict[str, np.ndarray],
    prompts: list[BoxPrompt],
    *,
    window_of: dict[int, str] | None = None,
    model_name: str = "",
    on_slice: Callable[[], None] | None = None,
    encoder_batch: int = 1,
    decoder_batch: int = 16,
    jitter: JitterCheck | None = None,
) -> tuple[np.ndarray, list[InstanceRecord]]:
    """Segment every prompted slice of a (z, y, x[, 3]) uint8 volume.

    ``volume_u8`` may instead map intensity-window names to uint8 renderings of the same volume, with
    ``window_of`` giving each label's window: each slice is then encoded once per window in use on it, and
    overlaps are still resolved across all of the slice's boxes. ``encoder_batch`` slices go through the
    encoder together (pays on a GPU); at most ``decoder_batch`` boxes are decoded per call, and overlaps are
    resolved as the calls come, so memory stays bounded with hundreds of boxes on a large 2D image.
    Returns the (z, y, x) uint16 label map and one InstanceRecord per
    (label, instance) with boxes, slices, mean predicted IoU, mean stability score and voxels claimed.
    With ``jitter``, up to ``jitter.slices`` prompted slices (evenly spaced) are decoded again with jittered
    boxes and each instance records the mean IoU of its masks under jitter (one extra decoder call per box).
    """
    renderings = volume_u8 if isinstance(volume_u8, dict) else {"default": volume_u8}
    default = next(iter(renderings))
    window_of = window_of or {}
    shape = next(iter(renderings.values())).shape[:3]
    label_map = np.zeros(shape, dtype=np.uint16)
    lineage: dict[tuple[int, int], dict] = defaultdict(
        lambda: {
            "slices": [],
            "boxes": [],
            "iou": [],
            "voxels": 0,
            "source": "",
            "stability": [],
            "jitter": [],
        }
    )
    grouped = list(by_slice(prompts).items())
    checked = _jitter_slices([z for z, _ in grouped], jitter)
    rng = np.random.default_rng(jitter.seed if jitter else 0)
    resolver: SliceResolver | None = None
    for start in range(0, len(grouped), max(1, encoder_batch)):
        chunk = grouped[start : start + max(1, encoder_batch)]
        embeddings = _embed_chunk(runner, renderings, chunk, lambda p: window_of.get(p.label, default))
        for z, slice_prompts in chunk:
            slice_prompts = sorted(slice_prompts, key=lambda p: window_of.get(p.label, default))
            if resolver is None:
                resolver = SliceResolver(shape[1:], boxes=len(slice_prompts))
            else:
                resolver.reset(boxes=len(slice_prompts))
            iou, stability, agreement = [], [], []
            for window in dict.fromkeys(window_of.get(p.label, default) for p in slice_prompts):
                group = [p for p in slice_prompts if window_of.get(p.label, default) == window]
                for part in range(0, len(group), decoder_batch):
                    boxes = np.array([p.box for p in group[part : part + decoder_batch]], dtype=np.float32)
                    part_logits, part_iou = runner.decode(embeddings[(z, window)], boxes)
                    resolver.add(part_logits)
                    iou.append(part_iou)
                    stability.append(stability_scores(part_logits))
                    if z in checked:
                        fraction = jitter.fraction  # type: ignore[union-attr]
                        moved = jitter_boxes(boxes, fraction, rng, shape[1:])
                        moved_logits, _ = runner.decode(embeddings[(z, window)], moved)
                        agreement.append(mask_ious(foreground(part_logits), foreground(moved_logits)))
            resolver.labels(np.array([p.label for p in slice_prompts], dtype=np.uint16), out=label_map[z])
            _record(
                lineage,
                z,
                slice_prompts,
                np.concatenate(iou),
                resolver.pixels_won(),
                np.concatenate(stability),
                np.concatenate(agreement) if agreement else None,
            )
            if on_slice is not None:
                on_slice()
    records = [
        InstanceRecord(
            label=label,
            instance=instance,
            prompt_source=e["source"],
            slices=tuple(e["slices"]),
            boxes=tuple(e["boxes"]),
            predicted_iou=float(np.mean(e["iou"])),
            voxels=e["voxels"],
            model=model_name,
            stability=float(np.mean(e["stability"])),
            jitter_iou=float(np.mean(e["jitter"])) if e["jitter"] else None,
        )
        for (label, instance), e in sorted(lineage.items())
    ]
    return label_map, records


def _embed_chunk(
    runner: LiteMedSAMRunner, renderings: dict[str, np.ndarray], chunk, window_of_prompt
) -> dict:
    """{(z, window): embedding} for a chunk of (z, prompts), one encoder call per window."""
    wanted: dict[str, list[int]] = defaultdict(list)
    for z, slice_prompts in chunk:
        for window in dict.fromkeys(window_of_prompt(p) for p in slice_prompts):
            wanted[window].append(z)
    out = {}
    for window, zs in wanted.items():
        for z, embedded in zip(zs, runner.encode([renderings[window][z] for z in zs]), strict=False):
            out[(z, window)] = embedded
    return out


def _jitter_slices(zs: list[int], jitter: JitterCheck | None) -> set[int]:
    """The slices the jitter check re-decodes: up to ``jitter.slices``, evenly spaced over ``zs``."""
    if jitter is None or not zs:
        return set()
    picks = np.linspace(0, len(zs) - 1, min(jitter.slices, len(zs))).round().astype(int)
    return {zs[i] for i in picks}


def _record(
    lineage: dict,
    z: int,
    prompts: list[BoxPrompt],
    iou: np.ndarray,
    counts: np.ndarray,
    stability: np.ndarray,
    agreement: np.ndarray | None,
) -> None:
    for index, prompt in enumerate(prompts):
        entry = lineage[(prompt.label, prompt.instance)]
        entry["slices"].append(z)
        entry["boxes"].append(prompt.box)
        entry["iou"].append(float(iou[index]))
        entry["stability"].append(float(stability[index]))
        if agreement is not None:
            entry["jitter"].append(float(agreement[index]))
        entry["voxels"] += int(counts[index])
        entry["source"] = prompt.source
