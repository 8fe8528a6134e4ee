"""Intensity-rule detector: prompts with no labels at all, from intensity ranges and connected components.

* CT (HU): ``body`` = largest component above ``body_hu`` with holes filled per slice; ``lungs`` = air
  below ``lung_hu`` inside the body, in components of at least ``min_lung_mm3``; ``right lung`` /
  ``left lung`` split per slice by the side of the body's midline each 2D component lies on (patient right
  is RAS +x, read from the affine); ``bone`` = components above ``bone_hu`` of at least ``min_bone_mm3``.
* MR and other 3D scalars: ``head`` = largest component above Otsu's threshold of the non-zero voxels,
  holes filled per slice.
* 2D images: ``foreground`` blobs by Otsu (polarity: the minority class unless told), holes filled, touching
  blobs split by a watershed on the distance transform; each blob is one instance.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
from pydantic import Field
from scipy import ndimage

from medsam_engine.detectors.coarse_mask import BoxRules, compile_boxes
from medsam_engine.detectors.protocol import Detection, DetectorOptions
from medsam_engine.pipeline.core.types import Volume

SOURCE = "intensity"
CT_TARGETS = ("body", "lungs", "right lung", "left lung", "bone")
DEFAULT_TARGETS = {
    "CT": {"right lung": 1, "left lung": 2, "bone": 3},
    "3D": {"head": 1},
    "2D": {"foreground": 1},
}


class IntensityOptions(DetectorOptions):
    """Thresholds of the intensity rules: CT in HU and mm³, 2D blobs in pixels."""

    targets: dict[str, int] | None = Field(None, description="target name -> label value; None: per modality")
    body_hu: float = Field(-300.0, description="CT: the body is the largest component above this HU")
    lung_hu: float = Field(-400.0, description="CT: lungs are air below this HU inside the body")
    bone_hu: float = Field(200.0, description="CT: bone is above this HU inside the body")
    min_lung_mm3: float = Field(5000.0, ge=0, description="CT: smaller air components are not lung")
    min_bone_mm3: float = Field(500.0, ge=0, description="CT: smaller bright components are not bone")
    polarity: Literal["auto", "bright", "dark"] = Field(
        "auto", description="2D: whether blobs are brighter or darker; auto: Otsu's minority class"
    )
    split_touching: bool = Field(True, description="2D: split touching blobs by a watershed")
    min_distance_px: int = Field(4, ge=1, description="watershed seeds at least this far apart")
    min_area_px: int = Field(12, ge=1, description="2D blobs smaller than this are ignored")


def _largest(mask: np.ndarray) -> np.ndarray:
    components, count = ndimage.label(mask)
    if count == 0:
        return mask.copy()
    sizes = np.bincount(components.ravel())
    sizes[0] = 0
    return components == int(np.argmax(sizes))


def _fill_per_slice(mask: np.ndarray) -> np.ndarray:
    return np.stack([ndimage.binary_fill_holes(plane) for plane in mask])


def _keep_large(mask: np.ndarray, min_voxels: float) -> np.ndarray:
    components, count = ndimage.label(mask)
    if count == 0:
        return mask.copy()
    sizes = np.bincount(components.ravel())
    keep = sizes >= min_voxels
    keep[0] = False
    return keep[components]


def ct_regions(
    hu: np.ndarray, *, spacing: tuple[float, float, float], right_is_low_x: bool, options: IntensityOptions
) -> dict[str, np.ndarray]:
    """Boolean (z, y, x) masks of the CT targets from a HU volume with ``spacing`` in mm."""
    voxel = float(np.prod(spacing))
    body = _fill_per_slice(_largest(hu > options.body_hu))
    lungs = _keep_large(ndimage.binary_opening((hu < options.lung_hu) & body), options.min_lung_mm3 / voxel)
    right, left = np.zeros_like(lungs), np.zeros_like(lungs)
    for z in range(hu.shape[0]):
        if not body[z].any():
            continue
        middle = np.nonzero(body[z].any(axis=0))[0].mean()
        components, _count = ndimage.label(lungs[z])
        for index, found in enumerate(ndimage.find_objects(components), start=1):
            centre = (found[1].start + found[1].stop - 1) / 2.0
            side = right if (centre < middle) == right_is_low_x else left
            side[z][found] |= components[found] == index
    bone = _keep_large((hu > options.bone_hu) & body, options.min_bone_mm3 / voxel)
    return {"body": body, "lungs": lungs, "right lung": right, "left lung": left, "bone": bone}


def foreground_3d(array: np.ndarray) -> np.ndarray:
    """Largest component above Otsu's threshold of the non-zero voxels, holes filled per slice."""
    from skimage.filters import threshold_otsu

    values = array[array != 0]
    if values.size == 0 or values.min() == values.max():
        return np.zeros(array.shape, dtype=bool)
    return _fill_per_slice(_largest(array > threshold_otsu(values)))


def blobs_2d(image: np.ndarray, *, options: IntensityOptions) -> np.ndarray:
    """Instance map (int32, 0 = background) of Otsu blobs in an (H, W) or (H, W, 3) image."""
    from skimage.feature import peak_local_max
    from skimage.filters import threshold_otsu
    from skimage.segmentation import watershed

    grey = image.mean(axis=-1) if image.ndim == 3 else image.astype(np.float64)
    if grey.min() == grey.max():
        return np.zeros(grey.shape, dtype=np.int32)
    bright = grey > threshold_otsu(grey)
    if options.polarity == "dark" or (options.polarity == "auto" and bright.mean() > 0.5):
        bright = ~bright
    mask = _keep_large(ndimage.binary_fill_holes(bright), options.min_area_px)
    components, _ = ndimage.label(mask)
    if not options.split_touching or not mask.any():
        return components.astype(np.int32)
    distance = ndimage.distance_transform_edt(mask)
    peaks = peak_local_max(
        distance, min_distance=options.min_distance_px, labels=components, exclude_border=False
    )
    markers = np.zeros(mask.shape, dtype=np.int32)
    markers[tuple(peaks.T)] = np.arange(1, len(peaks) + 1)
    split = watershed(-distance, markers, mask=mask)
    # a component without a peak (too small for min_distance) keeps its own id
    orphans = mask & (split == 0)
    split[orphans] = components[orphans] + split.max()
    return split.astype(np.int32)


@dataclass(frozen=True)
class IntensityDetector:
    """Prompts from intensity rules; see the module docstring for what each target means."""

    rules: BoxRules
    options: IntensityOptions
    name: str = "intensity"

    def _targets(self, kind: str) -> dict[str, int]:
        targets = self.options.targets or DEFAULT_TARGETS[kind]
        allowed = {"CT": CT_TARGETS, "3D": ("head",), "2D": ("foreground",)}[kind]
        unknown = sorted(set(targets) - set(allowed))
        if unknown:
            raise ValueError(
                f"intensity targets {unknown} do not exist for {kind} images; use {list(allowed)}"
            )
        return targets

    def __call__(self, volume: Volume, coarse: np.ndarray | None = None) -> Detection:
        kind = "2D" if volume.is_2d else "CT" if volume.modality == "CT" else "3D"
        targets = self._targets(kind)
        label_map = np.zeros(volume.shape, dtype=np.uint16)
        instances = None
        if kind == "2D":
            instances = blobs_2d(volume.array[0], options=self.options)[None]
            label_map[instances > 0] = targets["foreground"]
        elif kind == "3D":
            label_map[foreground_3d(volume.array)] = targets["head"]
        else:
            right_is_low_x = float(volume.geometry.affine[0, 2]) < 0  # RAS+ x grows toward patient right
            regions = ct_regions(
                volume.array, spacing=volume.spacing, right_is_low_x=right_is_low_x, options=self.options
            )
            for name, value in targets.items():
                label_map[regions[name] & (label_map == 0)] = value
        prompts = compile_boxes(
            label_map, spacing=volume.spacing, rules=self.rules, instances=instances, source=SOURCE
        )
        return Detection(prompts, label_map, {value: name for name, value in targets.items()})
