"""Learned detector: a small convolutional head on LiteMedSAM's image embedding (256 x 64 x 64 per slice).

The head predicts one heat map per label on the embedding's 64 x 64 grid (each cell is 4 x 4 pixels of the
model's 256-pixel frame); heat maps are brought back to the slice, thresholded, split into 3D components and
compiled into boxes like a coarse mask. The embedding is the one the segmentation needs anyway, so with the
runner's embedding cache detection costs one small head per slice on top of the encoder pass.

Artefacts are single torch files holding tensors and a JSON string only (loadable with
``weights_only=True``): the head's weights and its metadata (labels, intensity rendering, metrics, training
data, parent version). Their version is the sha256 of the file.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from torch import nn

from medsam_engine.detectors.coarse_mask import BoxRules, compile_boxes
from medsam_engine.detectors.protocol import Detection
from medsam_engine.pipeline.core.atomic import atomic_file
from medsam_engine.pipeline.core.intensity import IntensityConfig, to_uint8
from medsam_engine.pipeline.core.provenance import file_sha256
from medsam_engine.pipeline.core.types import Volume
from medsam_engine.pipeline.model.framing import Framing

GRID = 64  # the embedding is GRID x GRID over the model's square input frame (LiteMedSAM and SAM ViT alike)
EMBED_DIM = 256


class DetectorHead(nn.Module):
    """(N, 256, 64, 64) embeddings -> (N, L, 64, 64) logits, one heat map per label."""

    def __init__(self, labels: int, hidden: int = 32) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            nn.Conv2d(EMBED_DIM, hidden, 1),
            nn.GELU(),
            nn.Conv2d(hidden, hidden, 3, padding=1),
            nn.GELU(),
            nn.Conv2d(hidden, hidden, 3, padding=1),
            nn.GELU(),
            nn.Conv2d(hidden, labels, 1),
        )

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        return self.layers(embeddings)


def grid_targets(label_slice: np.ndarray, labels: list[int], framing: Framing) -> np.ndarray:
    """(L, 64, 64) float32 fraction of each grid cell covered by each label, in the model's input frame
    (``framing``: the checkpoint kind's), for an (H, W) integer label slice."""
    new_h, new_w = framing.resized_hw(*label_slice.shape)
    out = np.zeros((len(labels), framing.size, framing.size), dtype=np.float32)
    for index, label in enumerate(labels):
        mask = (label_slice == label).astype(np.float32)
        out[index, :new_h, :new_w] = cv2.resize(mask, (new_w, new_h), interpolation=cv2.INTER_AREA)
    cell = framing.size // GRID
    return out.reshape(len(labels), GRID, cell, GRID, cell).mean(axis=(2, 4))


def grid_to_slice(heat: np.ndarray, original_hw: tuple[int, int], framing: Framing) -> np.ndarray:
    """(L, 64, 64) heat maps -> (L, H, W) on the slice grid (bilinear), cropping the padding of
    ``framing``."""
    height, width = original_hw
    new_h, new_w = framing.resized_hw(height, width)
    side = framing.size
    frame = np.stack([cv2.resize(h, (side, side), interpolation=cv2.INTER_LINEAR) for h in heat])
    return np.stack(
        [cv2.resize(f[:new_h, :new_w], (width, height), interpolation=cv2.INTER_LINEAR) for f in frame]
    )


def soft_dice_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    probs = torch.sigmoid(logits)
    inter = (probs * targets).sum(dim=(0, 2, 3))
    total = probs.sum(dim=(0, 2, 3)) + targets.sum(dim=(0, 2, 3))
    return (1 - (2 * inter + 1) / (total + 1)).mean()


def _loss(head: DetectorHead, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    logits = head(x)
    return nn.functional.binary_cross_entropy_with_logits(logits, y) + soft_dice_loss(logits, y)


def train_head(
    train: tuple[torch.Tensor, torch.Tensor],
    val: tuple[torch.Tensor, torch.Tensor] | None,
    *,
    epochs: int = 200,
    lr: float = 3e-3,
    patience: int = 30,
    seed: int = 0,
    batch: int = 16,
) -> tuple[DetectorHead, list[dict]]:
    """Fit a head on (embeddings (N, 256, 64, 64), targets (N, L, 64, 64)); early stopping on the
    validation loss (on the training loss without ``val``). Returns the best head and the loss history."""
    torch.manual_seed(seed)
    x, y = train
    head = DetectorHead(y.shape[1])
    optimiser = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=1e-4)
    best, best_state, waited, history = float("inf"), None, 0, []
    generator = torch.Generator().manual_seed(seed)
    for epoch in range(epochs):
        head.train()
        for chunk in torch.randperm(len(x), generator=generator).split(batch):
            optimiser.zero_grad()
            loss = _loss(head, x[chunk], y[chunk])
            loss.backward()
            optimiser.step()
        head.eval()
        with torch.no_grad():
            train_loss = float(_loss(head, x, y))
            val_loss = float(_loss(head, *val)) if val is not None else train_loss
        history.append({"epoch": epoch, "train_loss": train_loss, "val_loss": val_loss})
        if val_loss < best - 1e-4:
            best, waited = val_loss, 0
            best_state = {k: v.detach().clone() for k, v in head.state_dict().items()}
        else:
            waited += 1
            if waited >= patience:
                break
    if best_state is not None:
        head.load_state_dict(best_state)
    return head.eval(), history


def save_artefact(path: str | Path, head: DetectorHead, meta: dict) -> str:
    """Write the head and its metadata; returns the artefact's sha256 (its version)."""
    with atomic_file(path) as temp:
        torch.save({"state_dict": head.state_dict(), "meta": json.dumps(meta, sort_keys=True)}, temp)
    return file_sha256(path)


def load_artefact(path: str | Path) -> tuple[DetectorHead, dict, str]:
    """(head, metadata, sha256) of an artefact written by :func:`save_artefact`."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"detector artefact not found: {path}")
    raw = path.read_bytes()
    try:
        content = torch.load(path, map_location="cpu", weights_only=True)
        meta = json.loads(content["meta"])
        head = DetectorHead(len(meta["labels"]), hidden=int(meta.get("hidden", 32)))
        head.load_state_dict(content["state_dict"], strict=True)
    except Exception as exc:  # torch raises several types for corrupt files
        raise ValueError(f"detector artefact {path.name} cannot be loaded: {exc}") from exc
    return head.eval(), meta, hashlib.sha256(raw).hexdigest()


def render(volume: Volume, meta: dict) -> np.ndarray:
    """The uint8 rendering the head was trained on (CT window or percentile clip) of a Volume."""
    level, width = meta.get("ct_window", (40.0, 400.0))
    modality = "CT" if volume.modality == "CT" else "2D" if volume.is_2d else "MR"
    return to_uint8(volume.array, modality, IntensityConfig(ct_level=level, ct_width=width))


@dataclass
class LearnedDetector:
    """Heat maps from a trained head -> thresholded label map -> boxes (per 3D component, per slice)."""

    head: DetectorHead
    meta: dict
    version: str
    rules: BoxRules
    runner: Any
    threshold: float = 0.5
    batch: int = 4
    name: str = "learned"

    @classmethod
    def from_artefact(
        cls, path: str | Path, *, rules: BoxRules, runner: Any, threshold: float = 0.5
    ) -> LearnedDetector:
        head, meta, sha = load_artefact(path)
        return cls(head=head, meta=meta, version=sha, rules=rules, runner=runner, threshold=threshold)

    @torch.inference_mode()
    def heat_maps(self, volume: Volume) -> np.ndarray:
        """(L, z, y, x) float32 probabilities per label."""
        rendered = render(volume, self.meta)
        model = self.runner.get()
        out = np.zeros((len(self.meta["labels"]), *volume.shape), dtype=np.float32)
        for start in range(0, volume.shape[0], self.batch):
            embedded = model.encode(
                [rendered[z] for z in range(start, min(start + self.batch, volume.shape[0]))]
            )
            grids = torch.sigmoid(self.head(torch.cat([e.tensor().float().cpu() for e in embedded]))).numpy()
            for offset, (grid, e) in enumerate(zip(grids, embedded, strict=False)):
                out[:, start + offset] = grid_to_slice(grid, e.original_hw, model.model.framing)
        return out

    def __call__(self, volume: Volume, coarse: np.ndarray | None = None) -> Detection:
        heat = self.heat_maps(volume)
        labels = np.asarray(self.meta["labels"], dtype=np.uint16)
        best = heat.argmax(axis=0)
        label_map = np.where(heat.max(axis=0) > self.threshold, labels[best], 0).astype(np.uint16)
        prompts = compile_boxes(
            label_map, spacing=volume.spacing, rules=self.rules, source=f"learned:{self.version[:12]}"
        )
        names = {int(k): v for k, v in self.meta.get("label_names", {}).items()}
        return Detection(prompts, label_map, names)
