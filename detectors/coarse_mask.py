"""Coarse-mask prompt compiler: a label map on the image grid -> boxes, one per object per slice.

Each label value is split into 3D connected components (two lesions are two instances), or taken from an
instance map when the caller already separated touching objects. Every slice where an instance is present
gets its tight box (MedSAM's protocol), optionally widened by a margin (pixels plus millimetres, so the same
setting means the same physical margin at any in-plane spacing) and always clipped to the image. Optional
jitter (off by default) perturbs each box edge for robustness checks.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from medsam_engine.pipeline.core.metrics import present_labels
from medsam_engine.pipeline.core.types import BoxPrompt, ObjectBox
from medsam_engine.postprocess import label_boxes, label_components

SOURCE = "coarse-mask"


@dataclass(frozen=True)
class BoxRules:
    """How objects become boxes. Margins and jitter are added on every side; sizes filter objects."""

    margin_px: int = 0
    margin_mm: float = 0.0
    min_voxels: int = 1
    min_size_mm3: float = 0.0
    jitter_mm: float = 0.0
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("margin_px", "margin_mm", "min_size_mm3", "jitter_mm"):
            if getattr(self, name) < 0:
                raise ValueError(f"Argument '{name}' must be >= 0; got {getattr(self, name)}.")
        if self.min_voxels < 1:
            raise ValueError(f"Argument 'min_voxels' must be >= 1; got {self.min_voxels}.")

    def margins(self, spacing_yx: tuple[float, float]) -> tuple[int, int]:
        """(margin_y, margin_x) in pixels for a slice with this pixel size in mm."""
        return (
            self.margin_px + int(round(self.margin_mm / spacing_yx[0])),
            self.margin_px + int(round(self.margin_mm / spacing_yx[1])),
        )


CC3D_CONNECTIVITY = {1: 6, 2: 18, 3: 26}  # scipy's connectivity rank -> cc3d's neighbour count


def label_objects(
    label_map: np.ndarray, instances: np.ndarray | None = None, connectivity: int = 3
) -> Iterator[tuple[int, np.ndarray, tuple[slice, ...]]]:
    """Yield (label, boolean sub-volume, its slices) per object: labels in ascending order, each label's
    objects in order of their first voxel.

    Each label is searched within its own bounding box (a few labels: a comparison and projections each;
    an instance map with hundreds of labels: one ``find_objects`` pass), and split into components by cc3d
    (scipy's labels, in the same order, at less cost; measured: docs/benchmarks.md)."""
    if connectivity not in CC3D_CONNECTIVITY:
        raise ValueError(f"Argument 'connectivity' must be 1, 2 or 3; got {connectivity}.")
    values = present_labels(label_map)
    whole = tuple(slice(0, n) for n in label_map.shape)
    regions = label_boxes(label_map, values) if label_map.dtype.kind in "ui" else {}
    for label in values:
        region = regions.get(label) or whole
        inside = label_map[region] == label
        if instances is None:
            components, count = label_components(inside, CC3D_CONNECTIVITY[connectivity])
            if count == 1 and label in regions:  # one object: it fills the label's own box
                yield label, inside, region
                continue
        else:
            components = np.where(inside, instances[region], 0)
        for index, found in enumerate(ndimage.find_objects(components), start=1):
            if found is not None:
                yield (
                    label,
                    components[found] == index,
                    tuple(
                        slice(part.start + outer.start, part.stop + outer.start)
                        for part, outer in zip(found, region, strict=False)
                    ),
                )


def admitted_objects(
    label_map: np.ndarray,
    *,
    spacing: tuple[float, float, float],
    rules: BoxRules,
    instances: np.ndarray | None = None,
    connectivity: int = 3,
) -> Iterator[tuple[int, int, np.ndarray, tuple[slice, ...]]]:
    """:func:`label_objects` that the rules' size filters admit, as (label, instance, boolean sub-volume,
    its slices); instances are numbered 1.. per label."""
    voxel_mm3 = float(np.prod(spacing))
    counters: dict[int, int] = {}
    for label, component, found in label_objects(label_map, instances, connectivity):
        size = int(np.count_nonzero(component))
        if size < rules.min_voxels or size * voxel_mm3 < rules.min_size_mm3:
            continue
        counters[label] = counters.get(label, 0) + 1
        yield label, counters[label], component, found


def slice_boxes(component: np.ndarray, found: tuple[slice, ...]) -> Iterator[tuple[int, tuple[int, ...]]]:
    """Yield (z, (x0, y0, x1, y1)) for each slice of a boolean sub-volume that has foreground."""
    ys_any = component.any(axis=2)  # (z, y)
    xs_any = component.any(axis=1)  # (z, x)
    z0, y0, x0 = (s.start for s in found)
    for z in np.nonzero(ys_any.any(axis=1))[0]:
        ys = np.nonzero(ys_any[z])[0]
        xs = np.nonzero(xs_any[z])[0]
        yield int(z + z0), (int(xs[0] + x0), int(ys[0] + y0), int(xs[-1] + x0), int(ys[-1] + y0))


def widen_box(
    box: tuple[int, ...],
    rules: BoxRules,
    margins: tuple[int, int],
    jitter: tuple[int, int],
    rng: np.random.Generator | None,
    shape_yx: tuple[int, int],
) -> tuple[int, int, int, int]:
    """A slice's tight box widened by ``margins`` (y, x) px, moved by up to ``jitter`` (y, x) px per edge when
    ``rules.jitter_mm`` is set, and clipped to the slice."""
    my, mx = margins
    x0, y0, x1, y1 = box[0] - mx, box[1] - my, box[2] + mx, box[3] + my
    if rules.jitter_mm > 0:
        jy, jx = jitter
        dx0, dx1 = rng.integers(-jx, jx + 1, size=2)
        dy0, dy1 = rng.integers(-jy, jy + 1, size=2)
        x0, x1, y0, y1 = x0 + dx0, x1 + dx1, y0 + dy0, y1 + dy1
        x0, x1 = min(x0, x1), max(x0, x1)
        y0, y1 = min(y0, y1), max(y0, y1)
    height, width = shape_yx
    return (
        int(np.clip(x0, 0, width - 1)),
        int(np.clip(y0, 0, height - 1)),
        int(np.clip(x1, 0, width - 1)),
        int(np.clip(y1, 0, height - 1)),
    )


def compile_boxes(
    label_map: np.ndarray,
    *,
    spacing: tuple[float, float, float] = (1.0, 1.0, 1.0),
    rules: BoxRules = BoxRules(),
    instances: np.ndarray | None = None,
    connectivity: int = 3,
    source: str = SOURCE,
) -> list[BoxPrompt]:
    """Boxes for every (label, object, slice) of a (z, y, x) integer label map with voxel ``spacing`` in mm.

    Objects are 3D connected components per label (``connectivity`` 1..3 as in scipy), or the ids of the
    optional (z, y, x) ``instances`` map within each label. Instances are numbered 1.. per label in order
    of their first voxel; objects smaller than ``rules.min_voxels`` or ``rules.min_size_mm3`` are ignored.
    Boxes are XYXY voxel indices, inclusive, clipped to the slice.
    """
    if label_map.ndim != 3:
        raise ValueError(f"Argument 'label_map' must be (z, y, x); got shape {label_map.shape}.")
    if instances is not None and instances.shape != label_map.shape:
        raise ValueError(
            f"Argument 'instances' must have the label map's shape {label_map.shape}; got {instances.shape}."
        )
    margins = rules.margins(spacing[1:])
    jitter = (int(round(rules.jitter_mm / spacing[1])), int(round(rules.jitter_mm / spacing[2])))
    rng = np.random.default_rng(rules.seed)
    prompts: list[BoxPrompt] = []
    for label, instance, component, found in admitted_objects(
        label_map, spacing=spacing, rules=rules, instances=instances, connectivity=connectivity
    ):
        for z, box in slice_boxes(component, found):
            prompts.append(
                BoxPrompt(
                    label=label,
                    instance=instance,
                    z=z,
                    source=source,
                    box=widen_box(box, rules, margins, jitter, rng, label_map.shape[1:]),
                )
            )
    return prompts


def object_boxes(prompts: list[BoxPrompt]) -> list[ObjectBox]:
    """One 3D box per (label, instance) from its per-slice boxes: the z range, the middle slice's box
    (the official propagate protocol starts there) and the union of all boxes."""
    grouped: dict[tuple[int, int], list[BoxPrompt]] = {}
    for prompt in prompts:
        grouped.setdefault((prompt.label, prompt.instance), []).append(prompt)
    objects = []
    for (label, instance), group in sorted(grouped.items()):
        group.sort(key=lambda p: p.z)
        middle = group[len(group) // 2]
        boxes = np.array([p.box for p in group])
        union = (
            int(boxes[:, 0].min()),
            int(boxes[:, 1].min()),
            int(boxes[:, 2].max()),
            int(boxes[:, 3].max()),
        )
        objects.append(
            ObjectBox(
                label=label,
                instance=instance,
                z_range=(group[0].z, group[-1].z),
                z_middle=middle.z,
                box_middle=middle.box,
                box_union=union,
                source=middle.source,
            )
        )
    return objects


def boxes_from_label_map(
    label_map: np.ndarray, *, margin_px: int = 0, min_voxels: int = 1, connectivity: int = 3
) -> list[BoxPrompt]:
    """:func:`compile_boxes` with a margin in pixels and a minimum size in voxels only."""
    if margin_px < 0:
        raise ValueError(f"Argument 'margin_px' must be >= 0; got {margin_px}.")
    return compile_boxes(
        label_map, rules=BoxRules(margin_px=margin_px, min_voxels=min_voxels), connectivity=connectivity
    )
