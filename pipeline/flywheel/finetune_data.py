"""Fine-tuning data: options, and per-slice samples (with each object's kind) from accepted cases or
image/label-map pairs (see pipeline/flywheel/finetune.py for the method, selection.py for folds and kinds)."""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch

from medsam_engine.detectors.coarse_mask import admitted_objects, slice_boxes, widen_box
from medsam_engine.pipeline.annotate.config import EngineConfig
from medsam_engine.pipeline.annotate.rendering import renderings
from medsam_engine.pipeline.core.geometry import align_to
from medsam_engine.pipeline.core.types import BoxPrompt, CaseAttributes, Volume
from medsam_engine.pipeline.flywheel.detector_training import read_case_volume, stored_label_names
from medsam_engine.pipeline.flywheel.selection import is_instance_map, kind_of
from medsam_engine.pipeline.io.readers import read_volume
from medsam_engine.pipeline.model.framing import Framing
from medsam_engine.pipeline.store.case_store import CaseStore
from medsam_engine.pipeline.store.queries import select_cases

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FinetuneOptions:
    epochs: int = 12  # at most; cross-validation chooses how many, within ``minutes``
    minutes: float = 9.0  # the run's time budget: fewer epochs at most when the first one shows it is needed
    lr: float = 1e-4
    weight_decay: float = 0.01
    patience: int = 3  # a fold stops once this many epochs in a row did not beat its best held-out Dice
    folds: int = 2  # cross-validation folds that choose the epochs and judge the model (selection.py)
    tolerance: float = 0.01  # held-out Dice a kind may lose against the parent
    min_kind_boxes: int = 5  # held-out boxes a kind needs to be judged on its own
    eval_boxes: int = 48  # held-out boxes a fold is scored on after each epoch (on slices spread evenly)
    max_slices: int = 48  # embedded (slice, window) pairs per case, evenly spaced
    boxes_per_epoch: int = (
        32  # drawn as boxes_per_epoch // boxes_per_step slices of up to boxes_per_step boxes
    )
    boxes_per_step: int = 4
    box_jitter: float = 0.05
    seed: int = 0
    train_encoder: bool = False
    encoder_stages: int = 1  # last TinyViT stages trained (+ neck) from activations cached per slice; 0: none
    augment: bool = False  # training slices also flipped left-right, up-down and turned 90 degrees
    weight_by_edit: bool = True  # objects of labels the reviewer changed more are drawn more often
    device: str = "cpu"
    promote: str = "if-better"  # if-better (beats the current model on the held-out cases), always, never


@dataclass
class SliceSample:
    """One embedded slice (one window) with its objects: (K, 4) voxel XYXY boxes and (K, H, W) masks."""

    case_id: str
    z: int
    embedding: torch.Tensor | None  # (1, 256, 64, 64) float16 on the CPU (decoder-only training)
    image: (
        np.ndarray | None
    )  # (size, size, 3) float32 model input of the kind's framing (whole-model training)
    boxes: np.ndarray
    masks: np.ndarray
    targets: np.ndarray  # (K, h, w) float32: the masks on the low-res logits' part that covers the slice
    features: torch.Tensor | None = (
        None  # (1, tokens, C) float16: what enters the first trained encoder stage
    )
    source: np.ndarray | None = None  # the rendered slice (kept only to make augmented copies of it)
    weights: np.ndarray | None = (
        None  # (K,) how often each box is drawn for training, relative (None: evenly)
    )
    kinds: np.ndarray | None = None  # (K,) str: each object's kind (selection.kind_of)

    @property
    def original_hw(self) -> tuple[int, int]:
        return self.masks.shape[1], self.masks.shape[2]

    def subset(self, keep: np.ndarray) -> SliceSample:
        return dataclasses.replace(
            self,
            boxes=self.boxes[keep],
            masks=self.masks[keep],
            targets=self.targets[keep],
            weights=None if self.weights is None else self.weights[keep],
            kinds=None if self.kinds is None else self.kinds[keep],
        )


def slice_objects(
    labels: np.ndarray, rules, spacing: tuple[float, float, float]
) -> list[tuple[int, int, tuple, np.ndarray]]:
    """(label, z, box XYXY widened by the rules' margins, (H, W) mask) for every object of a (z, y, x) label
    map on each slice where it is present: the objects, size filters and margins of the coarse-mask box
    compiler (detectors/coarse_mask.py), so fine-tuning learns from the boxes that annotate would give."""
    out = []
    margins = rules.margins(spacing[1:])
    no_jitter = dataclasses.replace(rules, jitter_mm=0.0)  # fine-tuning jitters boxes its own way
    for label, _, component, found in admitted_objects(labels, spacing=spacing, rules=rules):
        for z, box in slice_boxes(component, found):
            mask = np.zeros(labels.shape[1:], dtype=bool)
            mask[found[1], found[2]] = component[z - found[0].start]
            out.append((label, z, widen_box(box, no_jitter, margins, (0, 0), None, labels.shape[1:]), mask))
    return out


def _target(mask: np.ndarray, framing: Framing) -> np.ndarray:
    """The mask resized onto the part of the low-resolution logits that covers its slice (float32)."""
    new_h, new_w = framing.logits_hw(*mask.shape)
    return cv2.resize(mask.astype(np.float32), (new_w, new_h), interpolation=cv2.INTER_AREA)


def case_samples(
    case_id: str,
    volume: Volume,
    labels: np.ndarray,
    config,
    runner,
    options: FinetuneOptions,
    edits: dict[int, float] | None = None,
    names: dict[int, str] | None = None,
) -> list[SliceSample]:
    """Embedded slices of one case with its objects, rendered per label window as ``config`` annotates.
    ``edits`` (label -> the reviewer's edit Dice, proposal vs correction) weights each object by how much
    the reviewer changed its label: 1 + (1 - edit Dice), so a label redrawn entirely counts twice. ``names``
    (label -> name) name the objects' kinds."""
    objects = slice_objects(labels, config.prompts.box_rules(), volume.spacing)
    instance_map = is_instance_map([o[0] for o in objects], flat=labels.shape[0] == 1)
    prompts = [BoxPrompt(label=o[0], instance=1, z=o[1], box=o[2]) for o in objects]
    rendered, window_of, _ = renderings(volume, labels, prompts, config)
    default = next(iter(rendered))
    grouped: dict[tuple[int, str], list] = {}
    for label, z, box, mask in objects:
        weight = 1.0 + (1.0 - float((edits or {}).get(label, 1.0))) if options.weight_by_edit else 1.0
        kind = kind_of(volume.modality, label, names, instance_map)
        grouped.setdefault((z, window_of.get(label, default)), []).append((box, mask, weight, kind))
    keys = sorted(grouped)
    if len(keys) > options.max_slices:
        keys = [keys[i] for i in np.linspace(0, len(keys) - 1, options.max_slices).round().astype(int)]
    samples = []
    for z, window in keys:
        slice_u8 = rendered[window][z]
        objects_here = grouped[(z, window)]
        boxes = np.array([o[0] for o in objects_here], dtype=np.float32)
        masks = np.stack([o[1] for o in objects_here])
        weights = np.array([o[2] for o in objects_here], dtype=np.float64)
        sample = _sample(case_id, z, slice_u8, boxes, masks, runner, options, weights)
        samples.append(dataclasses.replace(sample, kinds=np.array([o[3] for o in objects_here])))
    return samples


def _sample(
    case_id: str,
    z: int,
    slice_u8: np.ndarray,
    boxes: np.ndarray,
    masks: np.ndarray,
    runner,
    options: FinetuneOptions,
    weights: np.ndarray | None,
) -> SliceSample:
    """A slice with its objects and what the model needs of it: its embedding (decoder-only training), the
    activations entering the trained encoder stages, or the model input (whole-model training)."""
    embedding = image = features = None
    if options.train_encoder:
        image = runner.model.framing.prepare(slice_u8)[0]
    elif options.encoder_stages:
        features = encoder_features(
            runner.model.net, runner.model.framing.prepare(slice_u8)[0], options.encoder_stages
        )
    else:
        embedding = runner.encode([slice_u8])[0].tensor().detach().to("cpu", torch.float16)
    targets = np.stack([_target(m, runner.model.framing) for m in masks])
    return SliceSample(
        case_id,
        z,
        embedding,
        image,
        boxes,
        masks,
        targets,
        features,
        slice_u8 if options.augment else None,
        weights,
    )


AUGMENTATIONS = ("flip-x", "flip-y", "turn-90", "gamma")
GAMMA = 0.7  # the intensity copy: a brighter mid-range, as another window or scanner would render the slice


def transform_slice(
    kind: str, image: np.ndarray, boxes: np.ndarray, masks: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A slice (H, W[, C]; uint8 as rendered), its (K, 4) XYXY boxes (pixel edges) and (K, H, W) masks,
    flipped left-right, up-down or turned 90 degrees counter-clockwise (np.rot90) together, so every box still
    frames its mask; or its intensities bent by a gamma curve ("gamma": boxes and masks as they are)."""
    height, width = image.shape[:2]
    x1, y1, x2, y2 = boxes.T
    if kind == "flip-x":
        return image[:, ::-1], np.stack([width - x2, y1, width - x1, y2], axis=1), masks[:, :, ::-1]
    if kind == "flip-y":
        return image[::-1], np.stack([x1, height - y2, x2, height - y1], axis=1), masks[:, ::-1]
    if kind == "turn-90":  # (row y, column x) -> (row W - x, column y)
        return (
            np.rot90(image, axes=(0, 1)),
            np.stack([y1, width - x2, y2, width - x1], axis=1),
            np.rot90(masks, axes=(1, 2)),
        )
    if kind == "gamma":
        curve = (255.0 * (np.arange(256) / 255.0) ** GAMMA).round().astype(np.uint8)
        return curve[image] if image.dtype == np.uint8 else image**GAMMA, boxes, masks
    raise ValueError(f"Argument 'kind' must be one of {AUGMENTATIONS}; got {kind!r}")


def augmented(samples: list[SliceSample], runner, options: FinetuneOptions) -> dict[int, list[SliceSample]]:
    """Flipped, turned and brightened copies of each of ``samples``, keyed by ``id`` of the original (a fold
    trains on the copies of its whole training slices only), embedded as the originals are; boxes, masks and
    targets follow the image."""
    out: dict[int, list[SliceSample]] = {}
    for sample in samples:
        if sample.source is None:
            continue
        for kind in AUGMENTATIONS:
            image, boxes, masks = transform_slice(kind, sample.source, sample.boxes, sample.masks)
            copy = _sample(
                sample.case_id,
                sample.z,
                np.ascontiguousarray(image),
                boxes.astype(np.float32),
                np.ascontiguousarray(masks),
                runner,
                dataclasses.replace(options, augment=False),
                sample.weights,
            )
            out.setdefault(id(sample), []).append(dataclasses.replace(copy, kinds=sample.kinds))
    return out


@torch.no_grad()
def encoder_features(net, image: np.ndarray, stages: int) -> torch.Tensor:
    """What enters the last ``stages`` stages of the image encoder (TinyViT) for one (size, size, 3) model
    input: computed once per slice, so fine-tuning those stages costs only their own forward and backward."""
    encoder = net.image_encoder
    if not 1 <= stages < len(encoder.layers):
        raise ValueError(f"Argument 'encoder_stages' must lie in 1..{len(encoder.layers) - 1}; got {stages}")
    device = next(net.parameters()).device
    hidden = encoder.patch_embed(torch.from_numpy(image).permute(2, 0, 1)[None].to(device, torch.float32))
    for layer in encoder.layers[: len(encoder.layers) - stages]:
        hidden = layer(hidden)
    return hidden.to("cpu", torch.float16)


def _case_config(attrs: CaseAttributes) -> EngineConfig:
    """The configuration the case was annotated with (defaults when it is missing or no longer valid)."""
    from pydantic import ValidationError

    try:
        return EngineConfig.model_validate(attrs.config)
    except ValidationError:
        log.warning("case %s: stored configuration no longer validates; using defaults", attrs.case_id)
        return EngineConfig()


def store_samples(store: CaseStore, runner, options: FinetuneOptions) -> tuple[list[SliceSample], list[str]]:
    """Samples from every accepted case of ``store``; ValueError when there is none."""
    case_ids = select_cases(store, "accepted")[0]
    if not case_ids:
        raise ValueError(f"no accepted case in {store.url}: import reviewed corrections first")
    samples = []
    for case_id in case_ids:
        volume, labels, attrs = read_case_volume(store, case_id)
        edits = (attrs.raw.get("review") or {}).get("edit_dice_per_label") or {}
        samples += case_samples(
            case_id,
            volume,
            labels,
            _case_config(attrs),
            runner,
            options,
            edits={int(label): float(value) for label, value in edits.items()},
            names=stored_label_names(store, case_id),
        )
    return samples, case_ids


def pair_samples(
    images: list[str | Path], label_maps: list[str | Path], runner, options: FinetuneOptions, config=None
) -> tuple[list[SliceSample], list[str]]:
    """Samples from image/label-map pairs on the same grid (case ids "pair0", "pair1", ... in order)."""
    if len(images) != len(label_maps) or not images:
        raise ValueError(
            f"give one label map per image; got {len(images)} images and {len(label_maps)} label maps"
        )
    samples, ids = [], []
    for n, (image, label_map) in enumerate(zip(images, label_maps, strict=False)):
        volume = read_volume(image)
        labels = align_to(read_volume(label_map), volume, what=f"label map {Path(label_map).name}")
        if not np.issubdtype(labels.dtype, np.integer):
            labels = np.rint(labels).astype(np.int64)
        ids.append(f"pair{n}")
        samples += case_samples(ids[-1], volume, labels, config or EngineConfig(), runner, options)
    return samples, ids
